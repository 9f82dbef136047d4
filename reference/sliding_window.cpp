// Sliding-window attention (nsa-spec §2.5, §3): query t attends to keys [max(0, t-W+1), t] of its sequence.
// The window is a contiguous run of tokens, used in place as a strided tile (no gather). The backward owns dq
// per query row and dk/dv per tile of key tokens, visiting the queries that see the tile in token order, so
// results are bit-identical for any thread count. W == 0 (no window) leaves every output untouched.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "reference/attention_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

using namespace tiles;

constexpr int64_t kTokensPerTask = 16;
constexpr int64_t kKeysPerTask = 64;

// W capped at the longest sequence: a wider window sees the same keys, and t + W cannot overflow.
int64_t effective_window(const Layout& L) { return std::min(L.config.window, longest_sequence(L)); }

}  // namespace

void sliding_window_forward(double* o_swa, double* lse_swa, const double* q, const double* k, const double* v,
                            const Layout& L, const RowMask& rows) {
  const int64_t W = effective_window(L);
  if (W <= 0) return;
  const Dims& d = L.dims;
  const int64_t G = d.G();
  const std::vector<TokenTask> tasks = token_tasks(L, kTokensPerTask);
#pragma omp parallel
  {
    Workspace ws;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(tasks.size()); ++i) {
      const TokenTask& task = tasks[i];
      const Sequence& seq = L.sequences[task.sequence];
      const int64_t h = task.kv_head;
      for (int64_t t = task.t_begin; t < task.t_end; ++t) {
        const int64_t token = seq.batch * d.T + seq.start + t;
        if (!rows.empty() && !rows[token]) continue;
        const int64_t first = std::max<int64_t>(0, t - W + 1);
        const int64_t kv_row0 = (seq.batch * d.T + seq.start + first) * d.H + h;
        const int64_t n = t - first + 1;
        const int64_t head0 = token * d.HQ + h * G;
        attend_forward(tile(o_swa + head0 * d.V, G, d.V, d.V), lse_swa + head0, const_tile(q + head0 * d.K, G, d.K, d.K),
                       const_tile(k + kv_row0 * d.K, n, d.K, d.H * d.K), const_tile(v + kv_row0 * d.V, n, d.V, d.H * d.V),
                       L.scale(), ws);
      }
    }
  }
}

void sliding_window_backward(double* dq, double* dk, double* dv, const double* do_swa, const double* q,
                             const double* k, const double* v, const double* o_swa, const double* lse_swa,
                             const Layout& L) {
  const int64_t W = effective_window(L);
  if (W <= 0) return;
  const Dims& d = L.dims;
  const int64_t G = d.G();
  const std::vector<double> delta = row_deltas(do_swa, o_swa, d.B * d.T * d.HQ, d.V);

  // dq: each (token, kv head) owns the G query rows of its group.
  const std::vector<TokenTask> query_tasks = token_tasks(L, kTokensPerTask);
#pragma omp parallel
  {
    Workspace ws;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(query_tasks.size()); ++i) {
      const TokenTask& task = query_tasks[i];
      const Sequence& seq = L.sequences[task.sequence];
      const int64_t h = task.kv_head;
      for (int64_t t = task.t_begin; t < task.t_end; ++t) {
        const int64_t token = seq.batch * d.T + seq.start + t;
        const int64_t first = std::max<int64_t>(0, t - W + 1);
        const int64_t kv_row0 = (seq.batch * d.T + seq.start + first) * d.H + h;
        const int64_t n = t - first + 1;
        const int64_t head0 = token * d.HQ + h * G;
        attend_backward_queries(tile(dq + head0 * d.K, G, d.K, d.K), const_tile(q + head0 * d.K, G, d.K, d.K),
                                const_tile(do_swa + head0 * d.V, G, d.V, d.V), lse_swa + head0, delta.data() + head0,
                                const_tile(k + kv_row0 * d.K, n, d.K, d.H * d.K),
                                const_tile(v + kv_row0 * d.V, n, d.V, d.H * d.V), L.scale(), ws);
      }
    }
  }

  // dk, dv: each (sequence, key tile, kv head) owns its key rows; the queries that see key j are [j, j+W-1].
  const std::vector<TokenTask> key_tasks = token_tasks(L, kKeysPerTask);
  const int64_t chunk_tokens = query_tokens_per_chunk(G);
#pragma omp parallel
  {
    Buffer q_rows(chunk_tokens * G * d.K), do_rows(chunk_tokens * G * d.V);
    std::vector<double> lse_rows(chunk_tokens * G), delta_rows(chunk_tokens * G);
    std::vector<Index> visible_begin(chunk_tokens * G), visible_end(chunk_tokens * G);
    Workspace ws;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(key_tasks.size()); ++i) {
      const TokenTask& task = key_tasks[i];
      const Sequence& seq = L.sequences[task.sequence];
      const int64_t h = task.kv_head, first = task.t_begin, nk = task.t_end - task.t_begin;
      const int64_t kv_row0 = (seq.batch * d.T + seq.start + first) * d.H + h;
      const Tile dk_tile = tile(dk + kv_row0 * d.K, nk, d.K, d.H * d.K);
      const Tile dv_tile = tile(dv + kv_row0 * d.V, nk, d.V, d.H * d.V);
      const ConstTile k_tile = const_tile(k + kv_row0 * d.K, nk, d.K, d.H * d.K);
      const ConstTile v_tile = const_tile(v + kv_row0 * d.V, nk, d.V, d.H * d.V);
      const int64_t queries_end = std::min(seq.length, task.t_end - 1 + W);
      for (int64_t t0 = first; t0 < queries_end; t0 += chunk_tokens) {
        const int64_t m_tokens = std::min(chunk_tokens, queries_end - t0);
        for (int64_t j = 0; j < m_tokens; ++j) {
          const int64_t t = t0 + j;
          const int64_t head0 = (seq.batch * d.T + seq.start + t) * d.HQ + h * G;
          std::memcpy(&q_rows[j * G * d.K], q + head0 * d.K, sizeof(double) * G * d.K);
          std::memcpy(&do_rows[j * G * d.V], do_swa + head0 * d.V, sizeof(double) * G * d.V);
          for (int64_t g = 0; g < G; ++g) {
            lse_rows[j * G + g] = lse_swa[head0 + g];
            delta_rows[j * G + g] = delta[head0 + g];
            visible_begin[j * G + g] = t - W + 1 - first;  // clamped to [0, nk] by the tile
            visible_end[j * G + g] = t - first + 1;
          }
        }
        const int64_t m = m_tokens * G;
        attend_backward_keys(dk_tile, dv_tile, const_tile(q_rows.data(), m, d.K, d.K),
                             const_tile(do_rows.data(), m, d.V, d.V), lse_rows.data(), delta_rows.data(),
                             visible_begin.data(), visible_end.data(), k_tile, v_tile, L.scale(), ws);
      }
    }
  }
}

}  // namespace nsa::ref
