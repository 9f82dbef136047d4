// nsa-verify: checks Native Sparse Attention kernels against a float64 reference.
#include <cstdio>
#include <iostream>

#include "core/errors.h"
#include "verify/cli/commands.h"

namespace nsa::cli {

int g_exit_code = 0;

void add_config_flags(CLI::App& cmd, ConfigOverrides& ov) {
  cmd.add_option("--block-size", ov.block_size, "block size BS (overrides nsa.block_size; default 64)");
  cmd.add_option("--block-count", ov.block_count, "selected blocks per query S (overrides nsa.block_count; default 16)");
  cmd.add_option("--window", ov.window, "sliding window W, 0 = off (overrides nsa.window_size)");
  cmd.add_option("--scale", ov.scale, "softmax scale (overrides nsa.scale; default 1/sqrt(K))");
  cmd.add_option("--policy", ov.policy, "top-k policy: seed or paper (overrides nsa.policy)")->check(CLI::IsMember({"seed", "paper"}));
}

void apply_config_flags(Config& c, const ConfigOverrides& ov) {
  if (ov.block_size) c.block_size = *ov.block_size;
  if (ov.block_count) c.block_count = *ov.block_count;
  if (ov.window) c.window = *ov.window;
  if (ov.scale) c.scale = *ov.scale;
  if (ov.policy) c.policy = policy_from_name(*ov.policy);
}

bool ShapeFlags::any() const {
  return batch || seqlen || heads_q || heads_kv || dim_k || dim_v || !varlen.empty();
}

void ShapeFlags::apply(gen::GenSpec& s) const {
  if (batch) s.batch = *batch;
  if (seqlen) s.seqlen = *seqlen;
  if (heads_q) s.heads_q = *heads_q;
  if (heads_kv) s.heads_kv = *heads_kv;
  if (dim_k) s.dim_k = *dim_k;
  if (dim_v) s.dim_v = *dim_v;
  if (!varlen.empty()) s.varlen = varlen;
}

void add_shape_flags(CLI::App& cmd, ShapeFlags& f, const gen::GenSpec& d) {
  auto def = [](int64_t v) { return " (default " + std::to_string(v) + ")"; };
  cmd.add_option("--batch", f.batch, "batch rows B" + def(d.batch));
  cmd.add_option("--seqlen", f.seqlen, "tokens per row T" + def(d.seqlen));
  cmd.add_option("--heads-q", f.heads_q, "query heads HQ" + def(d.heads_q));
  cmd.add_option("--heads-kv", f.heads_kv, "kv heads H, dividing HQ" + def(d.heads_kv));
  cmd.add_option("--dim-k", f.dim_k, "query/key head dim K" + def(d.dim_k));
  cmd.add_option("--dim-v", f.dim_v, "value head dim V" + def(d.dim_v));
  cmd.add_option("--varlen", f.varlen, "varlen sequence lengths, e.g. 100,0,257 (B = 1, T = their sum)")->delimiter(',');
}

}  // namespace nsa::cli

int main(int argc, char** argv) {
  using namespace nsa::cli;
  CLI::App app{"nsa-verify: verify Native Sparse Attention kernels against a float64 reference"};
  app.require_subcommand(1);
  setup_run(app);
  setup_gradcheck(app);
  setup_bench(app);
  setup_check(app);
  setup_gen(app);
  setup_inspect(app);
  setup_verify(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  } catch (const nsa::InputError& e) {
    std::fprintf(stderr, "nsa-verify: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "nsa-verify: error: out of memory\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nsa-verify: internal error: %s\n", e.what());
    return 3;
  }
  return g_exit_code;
}
