// Check reports: a table for people, JSON for scripts, JUnit XML for CI.
#include <cmath>
#include <cstdio>
#include <sstream>

#include "verify/check.h"

namespace nsa {
namespace {

std::string format(const char* fmt, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, x);
  return buf;
}

std::string topk_summary(const TopkCheck& t) {
  char buf[256];
  if (t.given)
    std::snprintf(buf, sizeof buf, "rows %lld: repeat the given selection on %lld, differ on %lld", (long long)t.rows,
                  (long long)t.exact_rows, (long long)t.bad_rows);
  else
    std::snprintf(buf, sizeof buf, "rows %lld: exact set %.2f%%, tie rows %lld, bad rows %lld, largest gap %.3g",
                  (long long)t.rows, t.rows ? 100.0 * double(t.exact_rows) / double(t.rows) : 100.0,
                  (long long)t.tie_rows, (long long)t.bad_rows, t.max_rel_gap);
  return buf;
}

// One line naming the first failing stage and why; empty when the report passes.
std::string failure_summary(const CheckReport& r) {
  if (r.pass) return "";
  std::string s = "first failing stage: " + r.first_failing_stage;
  if (r.first_failing_stage == "topk" && r.topk) return s + ": block_indices " + r.topk->first_problem;
  for (const TensorCheck& t : r.tensors) {
    if (t.stage != r.first_failing_stage || t.pass) continue;
    s += ": " + t.name + " rel_l2 " + format("%.3g", t.rel_l2) + " (tol " + format("%.3g", t.tol) + ")";
    if (t.nonfinite) s += ", " + std::to_string(t.nonfinite) + " NaN/Inf";
    return s + " worst at " + t.worst_where + ": expected " + format("%.9g", t.worst_expected) + ", actual " +
           format("%.9g", t.worst_actual);
  }
  return s;
}

// JSON has no NaN or Inf: those become the strings "nan", "inf", "-inf".
nlohmann::json number(double x) {
  if (std::isfinite(x)) return x;
  if (std::isnan(x)) return "nan";
  return x > 0 ? "inf" : "-inf";
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

}  // namespace

void print_report(std::ostream& os, const CheckReport& r) {
  os << "check " << (r.case_name.empty() ? "candidate" : r.case_name) << ": candidate dtype " << dtype_flag(r.candidate_dtype);
  if (r.baseline_relative) os << ", baseline-relative";
  if (r.sampled_rows) os << ", " << r.sampled_rows << " sampled query rows (forward only)";
  os << "\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-14s %-21s %-10s %-10s %-10s %-10s %-22s %-16s %-16s %s\n", "tensor", "stage", "rel_l2",
                "tol", "max_abs", "over_tol", "worst [b, t, head, d]", "expected", "actual", "result");
  os << line;
  auto print_topk = [&] {
    const TopkCheck& t = *r.topk;
    os << "block_indices  topk                  " << topk_summary(t) << "  " << (t.pass ? "PASS" : "FAIL") << "\n";
    if (!t.pass) os << "  first bad row " << t.first_problem << "\n";
  };
  bool topk_printed = false;
  for (const TensorCheck& t : r.tensors) {
    // The top-k line sits where its stage falls in the pipeline.
    if (r.topk && !topk_printed && t.stage != "mean_pool" && t.stage != "compressed_attention") {
      print_topk();
      topk_printed = true;
    }
    const std::string result = t.pass ? "PASS" : t.nonfinite ? "FAIL (" + std::to_string(t.nonfinite) + " NaN/Inf)" : "FAIL";
    std::snprintf(line, sizeof line, "%-14s %-21s %-10.3g %-10.3g %-10.3g %-10lld %-22s %-16.9g %-16.9g %s\n", t.name.c_str(),
                  t.stage.c_str(), t.rel_l2, t.tol, t.max_abs, (long long)t.count_over, t.worst_where.c_str(),
                  t.worst_expected, t.worst_actual, result.c_str());
    os << line;
  }
  if (r.topk && !topk_printed) print_topk();
  os << (r.pass ? "PASS: every stage agrees with the reference" : "FAIL: " + failure_summary(r)) << "\n";
}

nlohmann::json report_json(const std::vector<CheckReport>& reports) {
  nlohmann::json cases = nlohmann::json::array();
  bool all_pass = true;
  for (const CheckReport& r : reports) {
    all_pass = all_pass && r.pass;
    nlohmann::json tensors = nlohmann::json::array();
    for (const TensorCheck& t : r.tensors)
      tensors.push_back({{"name", t.name},
                         {"stage", t.stage},
                         {"pass", t.pass},
                         {"tol", t.tol},
                         {"rel_l2", number(t.rel_l2)},
                         {"max_abs", number(t.max_abs)},
                         {"max_rel", number(t.max_rel)},
                         {"baseline_rel_l2", t.baseline_rel_l2 < 0 ? nlohmann::json(nullptr) : number(t.baseline_rel_l2)},
                         {"count_over", t.count_over},
                         {"nonfinite", t.nonfinite},
                         {"compared", t.compared},
                         {"worst", {{"index", t.worst_where}, {"expected", number(t.worst_expected)}, {"actual", number(t.worst_actual)}}}});
    nlohmann::json topk = nullptr;
    if (r.topk) {
      const TopkCheck& t = *r.topk;
      topk = {{"pass", t.pass},         {"given", t.given},       {"rows", t.rows},
              {"exact_rows", t.exact_rows}, {"tie_rows", t.tie_rows}, {"bad_rows", t.bad_rows},
              {"max_rel_gap", number(t.max_rel_gap)}, {"first_problem", t.first_problem}};
    }
    cases.push_back({{"case", r.case_name},
                     {"pass", r.pass},
                     {"first_failing_stage", r.first_failing_stage.empty() ? nlohmann::json(nullptr) : nlohmann::json(r.first_failing_stage)},
                     {"failure", failure_summary(r)},
                     {"candidate_dtype", dtype_flag(r.candidate_dtype)},
                     {"baseline_relative", r.baseline_relative},
                     {"sampled_rows", r.sampled_rows},
                     {"tensors", std::move(tensors)},
                     {"topk", std::move(topk)}});
  }
  return {{"pass", all_pass}, {"cases", std::move(cases)}};
}

std::string report_junit(const std::vector<CheckReport>& reports, const std::string& suite_name) {
  int64_t failures = 0;
  for (const CheckReport& r : reports) failures += r.pass ? 0 : 1;
  std::ostringstream os;
  os << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  os << "<testsuite name=\"" << xml_escape(suite_name) << "\" tests=\"" << reports.size() << "\" failures=\"" << failures
     << "\" errors=\"0\">\n";
  for (const CheckReport& r : reports) {
    os << "  <testcase classname=\"" << xml_escape(suite_name) << "\" name=\"" << xml_escape(r.case_name) << "\"";
    if (r.pass) {
      os << "/>\n";
      continue;
    }
    std::ostringstream table;
    print_report(table, r);
    os << ">\n    <failure message=\"" << xml_escape(failure_summary(r)) << "\" type=\"" << xml_escape(r.first_failing_stage)
       << "\">" << xml_escape(table.str()) << "</failure>\n  </testcase>\n";
  }
  os << "</testsuite>\n";
  return os.str();
}

}  // namespace nsa
