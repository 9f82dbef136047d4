// Sliding-window attention (nsa-spec §2.5, §3): query t attends to keys [max(0, t-W+1), t] of its sequence.
// The window is a contiguous run of tokens, used in place as a strided tile (no gather). The backward owns dq
// per query row and dk/dv per tile of key tokens, visiting the queries that see the tile in token order, so
// results are bit-identical for any thread count. W == 0 (no window) leaves every output untouched.
#include <omp.h>

#include <algorithm>

#include "reference/attention_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

using namespace tiles;

constexpr int64_t kTokensPerTask = 16;
constexpr int64_t kKeysPerTask = 64;

// W capped at the longest sequence: a wider window sees the same keys, and t + W cannot overflow.
int64_t effective_window(const Layout& L) { return std::min(L.config.window, longest_sequence(L)); }

// The run of key (or value) rows [max(0, t-W+1), t] of `seq` for kv head h, in place: x is [B, T, H, D].
ConstTile window_rows(const double* x, int64_t D, const Sequence& seq, int64_t t, int64_t h, int64_t W,
                      const Layout& L) {
  const Dims& d = L.dims;
  const int64_t first = std::max<int64_t>(0, t - W + 1);
  const int64_t row0 = (seq.batch * d.T + seq.start + first) * d.H + h;
  return const_tile(x + row0 * D, t - first + 1, D, d.H * D);
}

}  // namespace

void sliding_window_forward(double* o_swa, double* lse_swa, const double* q, const double* k, const double* v,
                            const Layout& L, const RowMask& rows, const RowSlots& o_slots, const RowSlots& q_slots) {
  const int64_t W = effective_window(L);
  if (W <= 0) return;
  const Dims& d = L.dims;
  const int64_t G = d.G();
  for_each_query_group(
      L, kTokensPerTask, [] { return Workspace(); },
      [&](Workspace& ws, const Sequence& seq, int64_t t, int64_t h) {
        const int64_t token = seq.batch * d.T + seq.start + t;
        if (!rows.empty() && !rows[token]) return;
        const int64_t head0 = token * d.HQ + h * G;
        const int64_t o_head0 = output_row(o_slots, token) * d.HQ + h * G;
        const int64_t q_head0 = output_row(q_slots, token) * d.HQ + h * G;
        attend_forward(tile(o_swa + o_head0 * d.V, G, d.V, d.V), lse_swa + head0,
                       const_tile(q + q_head0 * d.K, G, d.K, d.K), window_rows(k, d.K, seq, t, h, W, L),
                       window_rows(v, d.V, seq, t, h, W, L), L.scale(), ws);
      });
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
  for_each_query_group(
      L, kTokensPerTask, [] { return Workspace(); },
      [&](Workspace& ws, const Sequence& seq, int64_t t, int64_t h) {
        const int64_t head0 = (seq.batch * d.T + seq.start + t) * d.HQ + h * G;
        attend_backward_queries(tile(dq + head0 * d.K, G, d.K, d.K), const_tile(q + head0 * d.K, G, d.K, d.K),
                                const_tile(do_swa + head0 * d.V, G, d.V, d.V), lse_swa + head0, delta.data() + head0,
                                window_rows(k, d.K, seq, t, h, W, L), window_rows(v, d.V, seq, t, h, W, L),
                                L.scale(), ws);
      });

  // dk, dv: each (sequence, key tile, kv head) owns its key rows; the queries that see key j are [j, j+W-1].
  const std::vector<TokenTask> key_tasks = token_tasks(L, kKeysPerTask);
  const int64_t chunk_tokens = query_tokens_per_chunk(G);
#pragma omp parallel
  {
    QueryChunk chunk(chunk_tokens, d, q, do_swa, lse_swa, delta.data());
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
          chunk.set_token(j, head0, t - W + 1 - first, t - first + 1);
        }
        chunk.backward_keys(dk_tile, dv_tile, k_tile, v_tile, m_tokens, L.scale(), ws);
      }
    }
  }
}

}  // namespace nsa::ref
