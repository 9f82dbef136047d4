// Gated output (nsa-spec §2.6, §3): o = g_slc * o_slc + g_cmp * o_cmp + g_swa * o_swa, gates broadcast over
// V. A branch whose gate (or output) is null is dropped. Every row is independent, so the work is split by
// query token.
#include <omp.h>

#include <array>

#include "reference/reference.h"

namespace nsa::ref {
namespace {

struct Branch {
  const double* gate;  // [B, T, HQ]
  const double* out;   // [B, T, HQ, V]
  bool present() const { return gate && out; }
};

}  // namespace

void gate_forward(double* o, const double* o_cmp, const double* o_slc, const double* o_swa, const double* g_cmp,
                  const double* g_slc, const double* g_swa, const Layout& L, const RowMask& rows,
                  const RowSlots& o_slots) {
  const Dims& d = L.dims;
  const std::array<Branch, 3> branches{Branch{g_slc, o_slc}, Branch{g_cmp, o_cmp}, Branch{g_swa, o_swa}};
  const int64_t tokens = d.B * d.T;
#pragma omp parallel for schedule(static)
  for (int64_t token = 0; token < tokens; ++token) {
    if (!rows.empty() && !rows[token]) continue;
    const int64_t o_row = output_row(o_slots, token);
    for (int64_t head = 0; head < d.HQ; ++head) {
      const int64_t i = token * d.HQ + head, at = (o_row * d.HQ + head) * d.V;  // gate index, output offset
      double* out = o + at;
      for (int64_t x = 0; x < d.V; ++x) out[x] = 0;
      for (const Branch& b : branches)
        if (b.present())
          for (int64_t x = 0; x < d.V; ++x) out[x] += b.gate[i] * b.out[at + x];
    }
  }
}

void gate_backward(double* dg_cmp, double* dg_slc, double* dg_swa, double* do_cmp, double* do_slc, double* do_swa,
                   const double* d_o, const double* o_cmp, const double* o_slc, const double* o_swa,
                   const double* g_cmp, const double* g_slc, const double* g_swa, const Layout& L) {
  const Dims& d = L.dims;
  struct BranchGrad {
    Branch branch;
    double* dg;    // [B, T, HQ], accumulated
    double* d_out; // [B, T, HQ, V] = gate * do, written
  };
  const std::array<BranchGrad, 3> grads{BranchGrad{{g_cmp, o_cmp}, dg_cmp, do_cmp},
                                        BranchGrad{{g_slc, o_slc}, dg_slc, do_slc},
                                        BranchGrad{{g_swa, o_swa}, dg_swa, do_swa}};
  const int64_t heads = d.B * d.T * d.HQ;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < heads; ++i) {
    const double* up = d_o + i * d.V;
    for (const BranchGrad& g : grads) {
      if (!g.branch.present()) continue;
      const double* out = g.branch.out + i * d.V;
      double dot = 0;
      for (int64_t x = 0; x < d.V; ++x) dot += up[x] * out[x];
      if (g.dg) g.dg[i] += dot;
      if (g.d_out)
        for (int64_t x = 0; x < d.V; ++x) g.d_out[i * d.V + x] = g.branch.gate[i] * up[x];
    }
  }
}

}  // namespace nsa::ref
