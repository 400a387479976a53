#pragma once
// report.json: the record of a benchmark run, everything it measured in one file a script can read. The CSV
// files next to it are only gnuplot's input; what must hold of a run's values is checked by the benchmark's
// ctests (tests/test_benchmark_run.cpp), which read this file.

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "report/results.hpp"

namespace xax_bench {

/// Bumped whenever a field is renamed or removed (adding fields keeps the version). 2: validation.memory lost
/// its prose `explanation`; the numbers it was made of are in the runs.
inline constexpr int report_schema_version = 2;

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
  if (run.params_crc32) {
    char hex[9];
    std::snprintf(hex, sizeof hex, "%08x", static_cast<unsigned>(*run.params_crc32));
    out["params_crc32"] = hex;
  } else {
    out["params_crc32"] = nullptr;
  }
  if (const auto& dp = run.data_parallel) {
    out["data_parallel"] = {{"world_size", dp->world_size},
                            {"accumulation_steps", dp->accumulation_steps},
                            {"micro_batch_size", dp->micro_batch_size},
                            {"wire_dtype", dp->wire_dtype},
                            {"deterministic", dp->deterministic},
                            {"communication_seconds", dp->communication_seconds},
                            {"communication_share_of_step", dp->communication_share},
                            {"wire_bytes_per_step", dp->wire_bytes_per_step},
                            {"zero_stage", dp->zero_stage},
                            {"bucket_size", dp->bucket_size},
                            {"buckets_per_step", dp->buckets_per_step},
                            {"reducer_buffer_bytes", dp->reducer_buffer_bytes},
                            {"master_gather_bytes_per_step", dp->master_gather_bytes_per_step},
                            {"master_bytes", dp->master_bytes},
                            {"optimizer_state_bytes", dp->optimizer_state_bytes}};
  }
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
                      {"pass", c.pass}});
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
      {"world_size", report.world_size},
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
