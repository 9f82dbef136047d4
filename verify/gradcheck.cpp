#include "verify/gradcheck.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include "core/errors.h"
#include "reference/reference.h"

namespace nsa {
namespace {

// One differentiable input: where it lives in the problem and where its gradient lives in the outputs.
struct Differentiable {
  const char* name;
  std::vector<double>* values;
  const std::vector<double>* gradient;
};

std::vector<Differentiable> differentiable_inputs(Problem& p, const Outputs& grads) {
  std::vector<Differentiable> v{{"q", &p.q, &grads.dq}, {"k", &p.k, &grads.dk}, {"v", &p.v, &grads.dv}};
  if (p.g_cmp) v.push_back({"g_cmp", &*p.g_cmp, &grads.dg_cmp});
  if (p.g_slc) v.push_back({"g_slc", &*p.g_slc, &grads.dg_slc});
  if (p.g_swa) v.push_back({"g_swa", &*p.g_swa, &grads.dg_swa});
  return v;
}

// L = sum(do * o) of the reference forward, summed with Neumaier's compensation so that the rounding of the
// sum itself stays far below the differences being measured.
double loss(const Problem& p) {
  RunOptions opt;
  opt.backward = false;
  const Outputs out = ref::run_reference(p, opt);
  const std::vector<double>& d_o = *p.d_o;
  double sum = 0, compensation = 0;
  for (std::size_t i = 0; i < out.o.size(); ++i) {
    const double term = d_o[i] * out.o[i], t = sum + term;
    compensation += std::abs(sum) >= std::abs(term) ? (sum - t) + term : (term - t) + sum;
    sum = t;
  }
  return sum + compensation;
}

double rms(const std::vector<double>& x) {
  if (x.empty()) return 0;
  double s = 0;
  for (double e : x) s += e * e;
  return std::sqrt(s / double(x.size()));
}

double relative_error(double analytic, double numeric, double scale) {
  const double diff = std::abs(analytic - numeric);
  if (diff == 0) return 0;
  return diff / std::max({std::abs(numeric), std::abs(analytic), scale});
}

// A seed per (input, direction), so adding an input never changes another input's directions.
uint64_t direction_seed(uint64_t seed, const std::string& name, int direction) {
  uint64_t h = 0xcbf29ce484222325ull ^ seed;
  for (char c : name) h = (h ^ uint8_t(c)) * 0x100000001b3ull;
  return h ^ (uint64_t(direction) * 0x9E3779B97F4A7C15ull);
}

void record(GradcheckInput& in, double err, double analytic, double numeric, const std::string& where) {
  ++in.checks;
  if (err > in.max_rel_error || std::isnan(err)) {
    in.max_rel_error = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
    in.worst_where = where;
    in.worst_analytic = analytic;
    in.worst_numeric = numeric;
  }
}

}  // namespace

double default_gradcheck_bound(const std::string& backend_name) { return backend_name == "cpu" ? 1e-7 : 1e-3; }

Problem freeze_block_indices(const Problem& p) {
  Problem frozen = p;
  if (!frozen.block_indices) {
    RunOptions opt;
    opt.backward = false;
    frozen.block_indices = ref::run_reference(p, opt).block_indices;
  }
  return frozen;
}

GradcheckReport gradcheck(const Problem& problem, Backend& backend, const GradcheckOptions& opt) {
  if (!problem.has_backward())
    throw InputError("gradcheck: the problem has no upstream gradient `do` (generate it with --with-grads)");
  if (!(opt.step > 0)) throw InputError("gradcheck: the step must be positive");
  Problem p = freeze_block_indices(problem);
  RunOptions run_opt;
  run_opt.backward = true;
  const Outputs grads = backend.run(p, run_opt);
  if (!grads.has_grads) throw InputError("gradcheck: backend '" + backend.name() + "' computed no gradients");

  GradcheckReport report;
  report.backend = backend.name();
  report.elementwise = opt.elementwise;
  report.step = opt.step;
  const double h = opt.step;
  for (const Differentiable& x : differentiable_inputs(p, grads)) {
    GradcheckInput in;
    in.name = x.name;
    in.bound = opt.bound;
    std::vector<double>& values = *x.values;
    const std::vector<double>& a = *x.gradient;
    if (a.size() != values.size()) {
      in.pass = false;
      in.max_rel_error = std::numeric_limits<double>::infinity();
      in.worst_where = "gradient missing or of the wrong size (" + std::to_string(a.size()) + " values for " +
                       std::to_string(values.size()) + ")";
      report.pass = false;
      report.inputs.push_back(in);
      continue;
    }
    const double scale = rms(a);
    if (opt.elementwise) {
      for (std::size_t j = 0; j < values.size(); ++j) {
        const double saved = values[j];
        values[j] = saved + h;
        const double up = loss(p);
        values[j] = saved - h;
        const double down = loss(p);
        values[j] = saved;
        const double numeric = (up - down) / (2 * h);
        record(in, relative_error(a[j], numeric, scale), a[j], numeric, "element " + std::to_string(j));
      }
    } else {
      const std::vector<double> saved = values;
      for (int dir = 0; dir < opt.directions; ++dir) {
        std::mt19937_64 rng(direction_seed(opt.seed, x.name, dir));
        std::normal_distribution<double> normal;
        std::vector<double> u(values.size());
        double norm = 0;
        for (double& e : u) {
          e = normal(rng);
          norm += e * e;
        }
        norm = std::sqrt(norm);
        double analytic = 0;
        for (std::size_t j = 0; j < u.size(); ++j) analytic += a[j] * (u[j] /= norm);
        for (std::size_t j = 0; j < u.size(); ++j) values[j] = saved[j] + h * u[j];
        const double up = loss(p);
        for (std::size_t j = 0; j < u.size(); ++j) values[j] = saved[j] - h * u[j];
        const double down = loss(p);
        values = saved;
        const double numeric = (up - down) / (2 * h);
        record(in, relative_error(analytic, numeric, scale), analytic, numeric, "direction " + std::to_string(dir));
      }
    }
    in.pass = in.max_rel_error <= in.bound;
    report.pass = report.pass && in.pass;
    report.inputs.push_back(in);
  }
  return report;
}

void print_gradcheck(std::ostream& os, const GradcheckReport& r) {
  char line[256];
  std::snprintf(line, sizeof line, "gradcheck %s: backend %s, %s, step %.1e -> %s\n", r.case_name.c_str(),
                r.backend.c_str(), r.elementwise ? "elementwise" : "random directions", r.step, r.pass ? "PASS" : "FAIL");
  os << line;
  std::snprintf(line, sizeof line, "  %-6s %7s %14s %9s  %s\n", "input", "checks", "max rel error", "bound", "result");
  os << line;
  for (const GradcheckInput& in : r.inputs) {
    std::snprintf(line, sizeof line, "  %-6s %7lld %14.3e %9.1e  %s", in.name.c_str(), (long long)in.checks,
                  in.max_rel_error, in.bound, in.pass ? "PASS" : "FAIL");
    os << line;
    if (!in.pass) {
      std::snprintf(line, sizeof line, "  (worst: %s, analytic %.17g, numeric %.17g)", in.worst_where.c_str(),
                    in.worst_analytic, in.worst_numeric);
      os << line;
    }
    os << "\n";
  }
}

nlohmann::json gradcheck_json(const std::vector<GradcheckReport>& reports) {
  nlohmann::json cases = nlohmann::json::array();
  bool pass = true;
  for (const GradcheckReport& r : reports) {
    nlohmann::json inputs = nlohmann::json::array();
    for (const GradcheckInput& in : r.inputs)
      inputs.push_back({{"input", in.name},
                        {"checks", in.checks},
                        {"max_rel_error", std::isfinite(in.max_rel_error) ? nlohmann::json(in.max_rel_error) : nlohmann::json("inf")},
                        {"bound", in.bound},
                        {"pass", in.pass},
                        {"worst_where", in.worst_where},
                        {"worst_analytic", in.worst_analytic},
                        {"worst_numeric", in.worst_numeric}});
    cases.push_back({{"case", r.case_name},
                     {"backend", r.backend},
                     {"mode", r.elementwise ? "elementwise" : "directional"},
                     {"step", r.step},
                     {"pass", r.pass},
                     {"inputs", inputs}});
    pass = pass && r.pass;
  }
  return {{"pass", pass}, {"cases", cases}};
}

}  // namespace nsa
