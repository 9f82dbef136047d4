// Selected attention (nsa-spec §2.4, §3): each query attends to the tokens of the blocks chosen for its kv
// head, causally inside its own block. The G query heads of a kv group share their blocks, so per
// (token, kv head) the chosen keys are gathered once into a contiguous tile and used by one GEMM for the group.
// The backward owns dq per query row and dk/dv per key block: each block collects the queries that selected
// it in token order, so no two threads ever add into the same gradient row and results are bit-identical
// for any thread count.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "reference/attention_tiles.h"
#include "reference/reference.h"

namespace nsa::ref {
namespace {

using namespace tiles;

constexpr int64_t kTokensPerTask = 16;

// The blocks a query reads: the first block_counts[row] entries of its index row (or all S).
int64_t used_entries(const int32_t* block_counts, int64_t index_row, int64_t S) {
  return block_counts ? block_counts[index_row] : S;
}

// Copies the keys and values that position t of sequence `seq` reads through kv head h into contiguous
// tiles keys [n, K], values [n, V]; returns n. Entries -1 and blocks starting after t are skipped; the current
// block is cut at t.
int64_t gather_selected(double* keys, double* values, const double* k, const double* v, const int32_t* entries,
                        int64_t count, const Sequence& seq, int64_t t, int64_t h, const Layout& L) {
  const Dims& d = L.dims;
  const int64_t BS = L.BS();
  int64_t n = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t c = entries[j];
    if (c < 0 || c * BS > t) continue;
    const int64_t last = std::min(c * BS + BS - 1, t);
    for (int64_t pos = c * BS; pos <= last; ++pos, ++n) {
      const int64_t kv_row = (seq.batch * d.T + seq.start + pos) * d.H + h;
      std::memcpy(keys + n * d.K, k + kv_row * d.K, sizeof(double) * d.K);
      std::memcpy(values + n * d.V, v + kv_row * d.V, sizeof(double) * d.V);
    }
  }
  return n;
}

// The most keys one query can gather: S blocks, each at most BS tokens and no longer than its sequence.
int64_t max_selected_keys(const Layout& L) { return L.S() * std::min(L.BS(), longest_sequence(L)); }

// Per-thread scratch of the query side: the keys [n, K] and values [n, V] that one (token, kv head) reads.
class SelectedKeys {
 public:
  SelectedKeys(const double* k, const double* v, const int32_t* block_indices, const int32_t* block_counts,
               const Layout& L)
      : k_(k), v_(v), block_indices_(block_indices), block_counts_(block_counts), L_(L),
        keys_(max_selected_keys(L) * L.dims.K), values_(max_selected_keys(L) * L.dims.V) {}

  // Gathers what position t of `seq` reads through kv head h.
  void gather(const Sequence& seq, int64_t t, int64_t h) {
    const Dims& d = L_.dims;
    const int64_t S = L_.S(), index_row = (seq.batch * d.T + seq.start + t) * d.H + h;
    n_ = gather_selected(keys_.data(), values_.data(), k_, v_, block_indices_ + index_row * S,
                         used_entries(block_counts_, index_row, S), seq, t, h, L_);
  }
  ConstTile keys() const { return const_tile(keys_.data(), n_, L_.dims.K, L_.dims.K); }
  ConstTile values() const { return const_tile(values_.data(), n_, L_.dims.V, L_.dims.V); }

  Workspace ws;

 private:
  const double *k_, *v_;
  const int32_t *block_indices_, *block_counts_;
  const Layout& L_;
  Buffer keys_, values_;
  int64_t n_ = 0;
};

// For one (sequence, kv head): the tokens that selected each block, in token order (compressed rows).
struct BlockReaders {
  std::vector<int64_t> begin;   // [NB + 1] offsets into `tokens`
  std::vector<int64_t> tokens;  // positions within the sequence
};

BlockReaders block_readers(const int32_t* block_indices, const int32_t* block_counts, const Sequence& seq, int64_t h,
                           const Layout& L) {
  const Dims& d = L.dims;
  const int64_t BS = L.BS(), S = L.S(), NB = ceil_div(seq.length, BS);
  BlockReaders r;
  r.begin.assign(NB + 1, 0);
  auto for_each_read = [&](auto&& visit) {
    for (int64_t t = 0; t < seq.length; ++t) {
      const int64_t index_row = (seq.batch * d.T + seq.start + t) * d.H + h;
      const int32_t* entries = block_indices + index_row * S;
      const int64_t count = used_entries(block_counts, index_row, S);
      for (int64_t j = 0; j < count; ++j)
        if (entries[j] >= 0 && entries[j] * BS <= t) visit(entries[j], t);
    }
  };
  for_each_read([&](int64_t c, int64_t) { ++r.begin[c + 1]; });
  for (int64_t c = 0; c < NB; ++c) r.begin[c + 1] += r.begin[c];
  r.tokens.resize(r.begin[NB]);
  std::vector<int64_t> fill(r.begin.begin(), r.begin.end() - 1);
  for_each_read([&](int64_t c, int64_t t) { r.tokens[fill[c]++] = t; });
  return r;
}

}  // namespace

void selected_attention_forward(double* o_slc, double* lse_slc, const double* q, const double* k, const double* v,
                                const int32_t* block_indices, const int32_t* block_counts, const Layout& L,
                                const RowMask& rows, const RowSlots& o_slots, const RowSlots& q_slots) {
  const Dims& d = L.dims;
  const int64_t G = d.G();
  for_each_query_group(
      L, kTokensPerTask, [&] { return SelectedKeys(k, v, block_indices, block_counts, L); },
      [&](SelectedKeys& s, const Sequence& seq, int64_t t, int64_t h) {
        const int64_t token = seq.batch * d.T + seq.start + t;
        if (!rows.empty() && !rows[token]) return;
        s.gather(seq, t, h);
        const int64_t head0 = token * d.HQ + h * G;  // first query head of the group
        const int64_t o_head0 = output_row(o_slots, token) * d.HQ + h * G;
        const int64_t q_head0 = output_row(q_slots, token) * d.HQ + h * G;
        attend_forward(tile(o_slc + o_head0 * d.V, G, d.V, d.V), lse_slc + head0,
                       const_tile(q + q_head0 * d.K, G, d.K, d.K), s.keys(), s.values(), L.scale(), s.ws);
      });
}

void selected_attention_backward(double* dq, double* dk, double* dv, const double* do_slc, const double* q,
                                 const double* k, const double* v, const double* o_slc, const double* lse_slc,
                                 const int32_t* block_indices, const int32_t* block_counts, const Layout& L) {
  const Dims& d = L.dims;
  const int64_t G = d.G(), BS = L.BS();
  const std::vector<double> delta = row_deltas(do_slc, o_slc, d.B * d.T * d.HQ, d.V);

  // dq: each (token, kv head) owns the G query rows of its group.
  for_each_query_group(
      L, kTokensPerTask, [&] { return SelectedKeys(k, v, block_indices, block_counts, L); },
      [&](SelectedKeys& s, const Sequence& seq, int64_t t, int64_t h) {
        s.gather(seq, t, h);
        const int64_t head0 = (seq.batch * d.T + seq.start + t) * d.HQ + h * G;
        attend_backward_queries(tile(dq + head0 * d.K, G, d.K, d.K), const_tile(q + head0 * d.K, G, d.K, d.K),
                                const_tile(do_slc + head0 * d.V, G, d.V, d.V), lse_slc + head0, delta.data() + head0,
                                s.keys(), s.values(), L.scale(), s.ws);
      });

  // dk, dv: each (sequence, kv head, key block) owns its key rows and visits its readers in token order.
  struct BlockTask {
    int64_t sequence, kv_head, block;
  };
  std::vector<std::vector<BlockReaders>> readers(L.sequences.size());
  std::vector<BlockTask> block_tasks;
  for (int64_t s = 0; s < int64_t(L.sequences.size()); ++s)
    for (int64_t h = 0; h < d.H; ++h) {
      readers[s].push_back(block_readers(block_indices, block_counts, L.sequences[s], h, L));
      const BlockReaders& r = readers[s].back();
      for (int64_t c = 0; c + 1 < int64_t(r.begin.size()); ++c)
        if (r.begin[c + 1] > r.begin[c]) block_tasks.push_back({s, h, c});
    }
  const int64_t chunk_tokens = query_tokens_per_chunk(G);
#pragma omp parallel
  {
    QueryChunk chunk(chunk_tokens, d, q, do_slc, lse_slc, delta.data());
    Workspace ws;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < int64_t(block_tasks.size()); ++i) {
      const BlockTask& task = block_tasks[i];
      const Sequence& seq = L.sequences[task.sequence];
      const BlockReaders& r = readers[task.sequence][task.kv_head];
      const int64_t h = task.kv_head, first = task.block * BS;
      const int64_t nk = std::min(BS, seq.length - first);
      const int64_t kv_row0 = (seq.batch * d.T + seq.start + first) * d.H + h;
      Tile dk_block = tile(dk + kv_row0 * d.K, nk, d.K, d.H * d.K);
      Tile dv_block = tile(dv + kv_row0 * d.V, nk, d.V, d.H * d.V);
      const ConstTile k_block = const_tile(k + kv_row0 * d.K, nk, d.K, d.H * d.K);
      const ConstTile v_block = const_tile(v + kv_row0 * d.V, nk, d.V, d.H * d.V);
      for (int64_t at = r.begin[task.block]; at < r.begin[task.block + 1]; at += chunk_tokens) {
        const int64_t m_tokens = std::min(chunk_tokens, r.begin[task.block + 1] - at);
        for (int64_t j = 0; j < m_tokens; ++j) {
          const int64_t t = r.tokens[at + j];
          const int64_t head0 = (seq.batch * d.T + seq.start + t) * d.HQ + h * G;
          chunk.set_token(j, head0, 0, std::min(nk, t - first + 1));  // causal inside the query's own block
        }
        chunk.backward_keys(dk_block, dv_block, k_block, v_block, m_tokens, L.scale(), ws);
      }
    }
  }
}

}  // namespace nsa::ref
