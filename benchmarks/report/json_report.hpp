#pragma once
// report.json: everything the benchmark measured, in one file a script can read. Its schema is checked by
// report_schema_problems(), which the tests run on both a report built here and one the binary wrote.

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "report/results.hpp"

namespace xax_bench {

/// Bumped whenever a field is renamed or removed (adding fields keeps the version).
inline constexpr int report_schema_version = 1;

namespace detail {

// JSON has no NaN or infinity; nlohmann would write them as null and lose the fact that the value was not
// finite.
inline nlohmann::json finite_or_null(double value) {
  return std::isfinite(value) ? nlohmann::json(value) : nullptr;
}

inline nlohmann::json to_json(const TrainingRun& run) {
  nlohmann::json epochs = nlohmann::json::array();
  for (const EpochRecord& e : run.epoch_records) {
    epochs.push_back({{"epoch", e.epoch},
                      {"train_loss", finite_or_null(e.train_loss)},
                      {"test_accuracy", e.test_accuracy},
                      {"seconds", e.seconds},
                      {"loss_scale", e.loss_scale},
                      {"skipped_steps", e.skipped_steps}});
  }
  nlohmann::json curve = nlohmann::json::array();
  for (const LossPoint& p : run.loss_curve)
    curve.push_back({{"step", p.step}, {"loss", finite_or_null(p.loss)}});
  const TensorBytes& t = run.tensor_bytes;
  nlohmann::json val_curve = nlohmann::json::array();
  for (const LossPoint& p : run.val_curve)
    val_curve.push_back({{"step", p.step}, {"loss", finite_or_null(p.loss)}});
  nlohmann::json scale_curve = nlohmann::json::array();
  for (const LossPoint& p : run.loss_scale_curve)
    scale_curve.push_back({{"step", p.step}, {"loss_scale", p.loss}});
  nlohmann::json out = {
      {"workload", run.workload},
      {"configuration", run.configuration},
      {"policy", run.policy},
      {"policy_spec", run.policy_spec},
      {"loss_scaling", run.loss_scaling},
      {"layer_sizes", run.layer_sizes},
      {"batch_size", run.batch_size},
      {"epochs", run.epochs},
      {"steps", run.steps},
      {"train_samples", run.train_samples},
      {"test_samples", run.test_samples},
      {"test_accuracy", run.test_accuracy},
      {"final_train_loss", finite_or_null(run.final_train_loss)},
      {"step_time_ms", run.step_time_ms},
      {"step_time_p10_ms", run.step_time_p10_ms},
      {"step_time_p90_ms", run.step_time_p90_ms},
      {"throughput_samples_per_s", run.throughput_samples_per_s},
      {"train_seconds", run.train_seconds},
      {"rss_before_bytes", run.rss_before_bytes},
      {"peak_rss_bytes", run.peak_rss_bytes},
      {"peak_rss_growth_bytes", run.peak_rss_growth_bytes()},
      {"peak_rss_reset", run.peak_rss_reset},
      {"tensor_bytes",
       {{"params", t.params},
        {"train_state", t.train_state},
        {"activations", t.activations},
        {"total", t.total()}}},
      {"skipped_steps", run.skipped_steps},
      {"final_loss_scale", run.final_loss_scale},
      {"last_non_finite", run.last_non_finite},
      {"matmul_implementation", run.matmul_implementation},
      {"error", run.error.empty() ? nlohmann::json() : nlohmann::json(run.error)},
      {"epoch_records", std::move(epochs)},
      {"loss_curve", std::move(curve)},
  };
  if (run.workload == "char-transformer") {
    out["val_loss"] = run.val_loss ? finite_or_null(*run.val_loss) : nlohmann::json();
    out["val_curve"] = std::move(val_curve);
    out["loss_scale_curve"] = std::move(scale_curve);
    out["tokens_per_s"] = run.tokens_per_s;
  }
  return out;
}

}  // namespace detail

/// The report as JSON.
inline nlohmann::json to_json(const BenchmarkReport& report) {
  nlohmann::json training = nlohmann::json::array();
  for (const TrainingRun& run : report.training) training.push_back(detail::to_json(run));

  nlohmann::json accuracy = nlohmann::json::array();
  for (const AccuracyCheck& c : report.accuracy_checks) {
    accuracy.push_back({{"policy", c.policy},
                        {"accuracy", c.accuracy},
                        {"reference_accuracy", c.reference_accuracy},
                        {"difference_pp", c.difference_pp},
                        {"tolerance_pp", c.tolerance_pp},
                        {"pass", c.pass}});
  }
  nlohmann::json memory = nlohmann::json::array();
  for (const MemoryCheck& c : report.memory_checks) {
    memory.push_back({{"policy", c.policy},
                      {"rss_growth_ratio", detail::finite_or_null(c.rss_growth_ratio)},
                      {"tensor_ratio", detail::finite_or_null(c.tensor_ratio)},
                      {"required_ratio", c.required_ratio},
                      {"pass", c.pass},
                      {"explanation", c.explanation}});
  }
  nlohmann::json peers = nlohmann::json::array();
  for (const PeerComparison& p : report.peers) {
    peers.push_back(
        {{"workload", p.workload},
         {"policy", p.policy},
         {"threads", p.threads},
         {"torch_step_ms", p.torch_step_ms},
         {"xax_step_ms", p.xax_step_ms},
         {"xax_source", p.xax_source},
         {"xax_over_torch", p.ratio()},
         {"target_xax_over_torch", p.target_ratio > 0 ? nlohmann::json(p.target_ratio) : nlohmann::json()},
         {"meets_target", p.target_ratio > 0 ? nlohmann::json(p.meets_target()) : nlohmann::json()}});
    if (p.torch_val_loss) peers.back()["torch_val_loss"] = detail::finite_or_null(*p.torch_val_loss);
    if (p.xax_val_loss) peers.back()["xax_val_loss"] = detail::finite_or_null(*p.xax_val_loss);
  }

  return {
      {"schema_version", report_schema_version},
      {"started_at", report.started_at},
      {"command_line", report.command_line},
      {"xax_version", report.xax_version},
      {"machine",
       {{"cpu_features", report.cpu_features},
        {"half_dtype", report.half_dtype},
        {"matmul_backend", report.matmul_backend},
        {"threads", report.threads},
        {"load_average_start", report.load_average_start},
        {"load_average_end", report.load_average_end},
        {"compiler", report.compiler}}},
      {"dataset", {{"name", report.dataset}, {"note", report.dataset_note}}},
      {"training", std::move(training)},
      {"validation", {{"accuracy", std::move(accuracy)}, {"memory", std::move(memory)}}},
      {"peer",
       {{"torch_version",
         report.torch_version ? nlohmann::json(*report.torch_version) : nlohmann::json(nullptr)},
        {"note", report.peer_note},
        {"comparisons", std::move(peers)}}},
      {"micro_benchmarks", report.micro},
      {"notes", report.notes},
  };
}

/// Everything wrong with a report.json's structure, one sentence each; empty when it conforms.
inline std::vector<std::string> report_schema_problems(const nlohmann::json& report) {
  std::vector<std::string> problems;
  const auto require = [&problems](const nlohmann::json& object, const std::string& where, const char* key,
                                   auto&& is_type, const char* type) -> const nlohmann::json* {
    if (!object.is_object() || !object.contains(key)) {
      problems.push_back(where + " has no '" + key + "'");
      return nullptr;
    }
    const nlohmann::json& value = object.at(key);
    if (!is_type(value)) {
      problems.push_back(where + "." + key + " is " + value.type_name() + ", expected " + type);
      return nullptr;
    }
    return &value;
  };
  const auto is_string = [](const nlohmann::json& v) { return v.is_string(); };
  const auto is_number = [](const nlohmann::json& v) { return v.is_number(); };
  const auto is_count = [](const nlohmann::json& v) {
    return v.is_number_unsigned() || (v.is_number_integer() && v >= 0);
  };
  const auto is_array = [](const nlohmann::json& v) { return v.is_array(); };
  const auto is_object = [](const nlohmann::json& v) { return v.is_object(); };
  const auto is_number_or_null = [](const nlohmann::json& v) { return v.is_number() || v.is_null(); };

  if (!report.is_object())
    return {"the report is " + std::string(report.type_name()) + ", expected an object"};
  if (const auto* version = require(report, "report", "schema_version", is_count, "an integer");
      version != nullptr && *version != report_schema_version) {
    problems.push_back("report.schema_version is " + version->dump() + ", expected " +
                       std::to_string(report_schema_version));
  }
  if (const auto* machine = require(report, "report", "machine", is_object, "an object")) {
    for (const char* key : {"cpu_features", "half_dtype", "matmul_backend", "compiler"}) {
      require(*machine, "report.machine", key, is_string, "a string");
    }
    require(*machine, "report.machine", "threads", is_count, "an integer");
  }
  if (const auto* dataset = require(report, "report", "dataset", is_object, "an object")) {
    require(*dataset, "report.dataset", "name", is_string, "a string");
  }
  if (const auto* training = require(report, "report", "training", is_array, "an array")) {
    for (std::size_t i = 0; i < training->size(); ++i) {
      const nlohmann::json& run = (*training)[i];
      const std::string where = "report.training[" + std::to_string(i) + "]";
      for (const char* key : {"workload", "policy", "loss_scaling", "configuration", "policy_spec"}) {
        require(run, where, key, is_string, "a string");
      }
      if (run.contains("workload") && run.at("workload") == "char-transformer") {
        require(run, where, "val_loss", is_number_or_null, "a number or null");
        require(run, where, "val_curve", is_array, "an array");
        require(run, where, "loss_scale_curve", is_array, "an array");
      }
      if (const auto* accuracy = require(run, where, "test_accuracy", is_number, "a number");
          accuracy != nullptr && (*accuracy < 0.0 || *accuracy > 1.0)) {
        problems.push_back(where + ".test_accuracy is " + accuracy->dump() + ", outside [0, 1]");
      }
      require(run, where, "final_train_loss", is_number_or_null, "a number or null");
      if (const auto* step = require(run, where, "step_time_ms", is_number, "a number");
          step != nullptr && !(*step > 0.0)) {
        problems.push_back(where + ".step_time_ms is " + step->dump() + ", expected > 0");
      }
      require(run, where, "peak_rss_bytes", is_count, "a non-negative integer");
      require(run, where, "skipped_steps", is_count, "a non-negative integer");
      require(run, where, "tensor_bytes", is_object, "an object");
      if (const auto* curve = require(run, where, "loss_curve", is_array, "an array")) {
        if (curve->empty()) problems.push_back(where + ".loss_curve is empty");
        for (std::size_t j = 0; j < curve->size(); ++j) {
          const std::string point = where + ".loss_curve[" + std::to_string(j) + "]";
          require((*curve)[j], point, "step", is_count, "a non-negative integer");
          require((*curve)[j], point, "loss", is_number_or_null, "a number or null");
        }
      }
      if (const auto* epochs = require(run, where, "epoch_records", is_array, "an array")) {
        for (std::size_t j = 0; j < epochs->size(); ++j) {
          const std::string epoch = where + ".epoch_records[" + std::to_string(j) + "]";
          require((*epochs)[j], epoch, "test_accuracy", is_number, "a number");
          require((*epochs)[j], epoch, "train_loss", is_number_or_null, "a number or null");
        }
      }
    }
  }
  if (const auto* validation = require(report, "report", "validation", is_object, "an object")) {
    require(*validation, "report.validation", "accuracy", is_array, "an array");
    require(*validation, "report.validation", "memory", is_array, "an array");
  }
  require(report, "report", "peer", is_object, "an object");
  if (report.contains("micro_benchmarks") && !report.at("micro_benchmarks").is_null()) {
    // Google Benchmark's own JSON format.
    const nlohmann::json& micro = report.at("micro_benchmarks");
    require(micro, "report.micro_benchmarks", "context", is_object, "an object");
    if (const auto* benchmarks =
            require(micro, "report.micro_benchmarks", "benchmarks", is_array, "an array")) {
      for (std::size_t i = 0; i < benchmarks->size(); ++i) {
        const std::string where = "report.micro_benchmarks.benchmarks[" + std::to_string(i) + "]";
        require((*benchmarks)[i], where, "name", is_string, "a string");
        require((*benchmarks)[i], where, "real_time", is_number, "a number");
        require((*benchmarks)[i], where, "time_unit", is_string, "a string");
      }
    }
  } else if (!report.contains("micro_benchmarks")) {
    problems.push_back("report has no 'micro_benchmarks' (null when skipped)");
  }
  return problems;
}

/// Writes `report.json` in `dir`. Throws std::runtime_error naming the file if it cannot be written.
inline std::filesystem::path write_json_report(const BenchmarkReport& report,
                                               const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / "report.json";
  std::ofstream out(path);
  out << to_json(report).dump(2) << '\n';
  if (!out) throw std::runtime_error("cannot write " + path.string());
  return path;
}

}  // namespace xax_bench
