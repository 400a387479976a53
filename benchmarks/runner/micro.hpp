#pragma once
// The Google Benchmark part: xax's micro-benchmarks (benchmarks/micro/*.cpp, linked in as object files so
// their static registrations are kept), shown in whatever format --benchmark_format asks for and captured in
// Google Benchmark's own JSON format for report.json at the same time.

#include <benchmark/benchmark.h>

#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "report/benchmark_json.hpp"
#include "runner/options.hpp"

namespace xax_bench {

/// What runs when the user passes no --benchmark_* flag: one or two sizes of each family, each measured
/// briefly, so that a default invocation stays within a few minutes on two cores.
inline constexpr const char* default_micro_filter =
    "^(Cast/(f32_to_bf16|bf16_to_f32)/|StreamingCopy/|UnscaleAndCheck/|StreamingRmw/|Matmul/"
    "(float32|bfloat16|float16)/"
    "1024/threads:1|Matmul/(float32|bfloat16)/1024/threads:2|TrainStep/)";
inline constexpr const char* default_micro_min_time = "0.05";

/// Hands the --benchmark_* flags (or the short defaults) to Google Benchmark. Returns false, having said why,
/// when one of them is not a flag Google Benchmark knows.
inline bool initialize_google_benchmark(const Options& options, char* program) {
  std::vector<std::string> args;
  if (options.benchmark_args.empty()) {
    args.push_back(std::string("--benchmark_filter=") + default_micro_filter);
    args.push_back(std::string("--benchmark_min_time=") + default_micro_min_time);
  } else {
    args.insert(args.end(), options.benchmark_args.begin(), options.benchmark_args.end());
  }
  // Google Benchmark copies the flags' values but keeps argv[0] as the executable's name for its report, so
  // argv[0] must be the process's own, which outlives every report.
  std::vector<char*> argv{program};
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  int argc = static_cast<int>(argv.size() - 1);
  benchmark::Initialize(&argc, argv.data());
  if (argc > 1) {
    std::cerr << "mixed_precision_benchmark: Google Benchmark does not know";
    for (int i = 1; i < argc; ++i) std::cerr << " '" << argv[static_cast<std::size_t>(i)] << "'";
    std::cerr << "; its flags are --benchmark_filter=REGEX, --benchmark_min_time=SECONDS, "
                 "--benchmark_repetitions=N, "
                 "--benchmark_format=console|json|csv, --benchmark_out=FILE, --benchmark_out_format=... (see "
                 "Google Benchmark's user guide)\n";
    return false;
  }
  return true;
}

namespace detail {

// Forwards every event to the display reporter the user's flags chose and to a JSON reporter writing into
// memory.
class TeeReporter final : public benchmark::BenchmarkReporter {
 public:
  explicit TeeReporter(benchmark::BenchmarkReporter* display) : display_(display) {
    json_.SetOutputStream(&json_text_);
    json_.SetErrorStream(&json_errors_);
  }

  bool ReportContext(const Context& context) override {
    json_.ReportContext(context);
    return display_->ReportContext(context);
  }
  void ReportRuns(const std::vector<Run>& runs) override {
    json_.ReportRuns(runs);
    display_->ReportRuns(runs);
  }
  void Finalize() override {
    json_.Finalize();
    display_->Finalize();
  }

  /// The captured results ({"context": ..., "benchmarks": [...]}), or null when nothing was reported (e.g.
  /// --benchmark_list_tests). Throws std::runtime_error if Google Benchmark wrote something that is not JSON.
  [[nodiscard]] nlohmann::json results() const {
    const std::string text = json_text_.str();
    if (text.empty()) return nullptr;
    nlohmann::json parsed = parse_benchmark_json(text);
    if (parsed.is_discarded()) {
      throw std::runtime_error(
          "Google Benchmark's JSON output could not be parsed; run with --skip-micro, or "
          "run xax_micro_benchmarks directly");
    }
    return parsed;
  }

 private:
  benchmark::BenchmarkReporter* display_;  // owned by Google Benchmark
  benchmark::JSONReporter json_;
  std::ostringstream json_text_;
  std::ostringstream json_errors_;
};

}  // namespace detail

/// What the micro-benchmark part produced.
struct MicroOutcome {
  nlohmann::json results = nullptr;  ///< Google Benchmark's JSON, or null
  std::size_t matched = 0;           ///< benchmarks the filter matched
};

/// Runs the benchmarks the filter selects. Call initialize_google_benchmark first.
inline MicroOutcome run_micro_benchmarks() {
  detail::TeeReporter reporter(benchmark::CreateDefaultDisplayReporter());
  MicroOutcome outcome;
  outcome.matched = benchmark::RunSpecifiedBenchmarks(&reporter);
  outcome.results = reporter.results();
  benchmark::Shutdown();
  return outcome;
}

/// The real time in milliseconds of the benchmark run called `name`: the median aggregate when there were
/// repetitions, else the single run; 0 when it did not run.
inline double micro_time_ms(const nlohmann::json& results, const std::string& name) {
  if (!results.is_object() || !results.contains("benchmarks")) return 0;
  const nlohmann::json* chosen = nullptr;
  for (const nlohmann::json& run : results.at("benchmarks")) {
    if (run.value("run_name", run.value("name", "")) != name) continue;
    if (run.value("run_type", "iteration") == "aggregate") {
      if (run.value("aggregate_name", "") == "median") chosen = &run;
    } else if (chosen == nullptr) {
      chosen = &run;
    }
  }
  if (chosen == nullptr) return 0;
  const std::string unit = chosen->value("time_unit", "ns");
  const double per_ms = unit == "ns" ? 1e-6 : unit == "us" ? 1e-3 : unit == "ms" ? 1.0 : 1e3;
  return chosen->value("real_time", 0.0) * per_ms;
}

}  // namespace xax_bench
