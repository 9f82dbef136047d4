// nsa-verify subcommands: one file each, with an options struct, a setup_* that binds the options and a
// run_* that does the work and returns the exit code (0 pass, 1 a comparison failed, 2 bad input/usage).
#pragma once
#include <functional>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "core/problem.h"
#include "verify/generator.h"

namespace nsa::cli {

// The process exit code of the subcommand that ran; set by each subcommand's callback.
extern int g_exit_code;

// --block-size --block-count --window --scale --policy, overriding the file's metadata.
void add_config_flags(CLI::App& cmd, ConfigOverrides& ov);
// Each flag that is set replaces that field of c (for generated problems, which have no metadata to override).
void apply_config_flags(Config& c, const ConfigOverrides& ov);

// --batch --seqlen --heads-q --heads-kv --dim-k --dim-v --varlen, each overriding a base spec when given.
struct ShapeFlags {
  std::optional<int64_t> batch, seqlen, heads_q, heads_kv, dim_k, dim_v;
  std::vector<int64_t> varlen;
  bool any() const;
  void apply(gen::GenSpec& s) const;
};
// `defaults` is the spec the flags override; its values are shown in the help.
void add_shape_flags(CLI::App& cmd, ShapeFlags& f, const gen::GenSpec& defaults);

void setup_run(CLI::App& app);
void setup_gen(CLI::App& app);
void setup_check(CLI::App& app);
void setup_verify(CLI::App& app);
void setup_gradcheck(CLI::App& app);
void setup_bench(CLI::App& app);
void setup_inspect(CLI::App& app);

}  // namespace nsa::cli
