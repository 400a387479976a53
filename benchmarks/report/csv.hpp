#pragma once
// The CSV files: written on every run, whether or not gnuplot is there, so the numbers behind every plot can
// be read or re-plotted with any tool. One row per record, a header row first (RFC 4180 quoting).

#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "report/results.hpp"

namespace xax_bench {

/// Writes one CSV file row by row; throws std::runtime_error naming the file if it cannot be written.
class CsvWriter {
 public:
  CsvWriter(std::filesystem::path path, std::initializer_list<std::string_view> header)
      : path_(std::move(path)), out_(path_), columns_(header.size()) {
    if (!out_) throw std::runtime_error("cannot create " + path_.string());
    for (std::string_view name : header) cell(name);
    end_row();
  }

  /// Adds a cell to the current row. Numbers keep full precision (17 significant digits would be noise for
  /// timings, so 10 is the compromise); text is quoted when it holds a comma, quote or newline.
  template <class T>
  CsvWriter& cell(const T& value) {
    separate();
    if constexpr (std::is_convertible_v<const T&, std::string_view>) {
      const std::string_view text = value;
      if (text.find_first_of(",\"\n\r") == std::string_view::npos) {
        out_ << text;
      } else {
        out_ << '"';
        for (char c : text) out_ << (c == '"' ? "\"\"" : std::string(1, c));
        out_ << '"';
      }
    } else if constexpr (std::is_floating_point_v<T>) {
      std::ostringstream number;
      number.precision(10);
      number << value;
      out_ << number.str();
    } else {
      out_ << value;
    }
    ++cells_;
    return *this;
  }

  void end_row() {
    if (cells_ != columns_) {
      throw std::logic_error(path_.string() + ": a row has " + std::to_string(cells_) +
                             " cells, the header " + std::to_string(columns_));
    }
    out_ << '\n';
    cells_ = 0;
    if (!out_) throw std::runtime_error("cannot write " + path_.string());
  }

  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  void separate() {
    if (cells_ != 0) out_ << ',';
  }

  std::filesystem::path path_;
  std::ofstream out_;
  std::size_t columns_;
  std::size_t cells_ = 0;
};

/// Writes training.csv, epochs.csv, loss_curves.csv, peers.csv and (when the micro part ran) micro.csv into
/// `dir`; returns the files written.
inline std::vector<std::filesystem::path> write_csv_files(const BenchmarkReport& report,
                                                          const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> written;

  CsvWriter training(dir / "training.csv", {"run",
                                            "configuration",
                                            "policy",
                                            "policy_spec",
                                            "loss_scaling",
                                            "batch_size",
                                            "epochs",
                                            "steps",
                                            "test_accuracy",
                                            "final_train_loss",
                                            "step_time_ms",
                                            "step_time_p10_ms",
                                            "step_time_p90_ms",
                                            "throughput_samples_per_s",
                                            "peak_rss_bytes",
                                            "peak_rss_growth_bytes",
                                            "params_bytes",
                                            "train_state_bytes",
                                            "activations_bytes",
                                            "tensor_total_bytes",
                                            "skipped_steps",
                                            "final_loss_scale",
                                            "matmul_implementation"});
  for (const TrainingRun& run : report.training) {
    const TensorBytes& t = run.tensor_bytes;
    training.cell(run.label())
        .cell(run.configuration)
        .cell(run.policy)
        .cell(run.policy_spec)
        .cell(run.loss_scaling);
    training.cell(run.batch_size)
        .cell(run.epochs)
        .cell(run.steps)
        .cell(run.test_accuracy)
        .cell(run.final_train_loss);
    training.cell(run.step_time_ms).cell(run.step_time_p10_ms).cell(run.step_time_p90_ms);
    training.cell(run.throughput_samples_per_s).cell(run.peak_rss_bytes).cell(run.peak_rss_growth_bytes());
    training.cell(t.params).cell(t.train_state).cell(t.activations).cell(t.total());
    training.cell(run.skipped_steps).cell(run.final_loss_scale).cell(run.matmul_implementation);
    training.end_row();
  }
  written.push_back(training.path());

  CsvWriter epochs(dir / "epochs.csv",
                   {"run", "epoch", "train_loss", "test_accuracy", "seconds", "loss_scale", "skipped_steps"});
  for (const TrainingRun& run : report.training) {
    for (const EpochRecord& e : run.epoch_records) {
      epochs.cell(run.label()).cell(e.epoch).cell(e.train_loss).cell(e.test_accuracy).cell(e.seconds);
      epochs.cell(e.loss_scale).cell(e.skipped_steps).end_row();
    }
  }
  written.push_back(epochs.path());

  CsvWriter curves(dir / "loss_curves.csv", {"run", "step", "loss"});
  for (const TrainingRun& run : report.training) {
    for (const LossPoint& p : run.loss_curve) curves.cell(run.label()).cell(p.step).cell(p.loss).end_row();
  }
  written.push_back(curves.path());

  CsvWriter peers(dir / "peers.csv",
                  {"policy", "threads", "torch_step_ms", "xax_step_ms", "xax_over_torch", "xax_source"});
  for (const PeerComparison& p : report.peers) {
    peers.cell(p.policy)
        .cell(p.threads)
        .cell(p.torch_step_ms)
        .cell(p.xax_step_ms)
        .cell(p.ratio())
        .cell(p.xax_source);
    peers.end_row();
  }
  written.push_back(peers.path());

  if (report.micro.is_object() && report.micro.contains("benchmarks")) {
    CsvWriter micro(dir / "micro.csv", {"name", "run_type", "iterations", "real_time", "cpu_time",
                                        "time_unit", "bytes_per_second", "items_per_second", "counters"});
    // Google Benchmark's standard keys; anything else in a run is a user counter (GFLOP/s and the like).
    const std::vector<std::string> standard{"name",
                                            "family_index",
                                            "per_family_instance_index",
                                            "run_name",
                                            "run_type",
                                            "repetitions",
                                            "repetition_index",
                                            "threads",
                                            "iterations",
                                            "real_time",
                                            "cpu_time",
                                            "time_unit",
                                            "bytes_per_second",
                                            "items_per_second",
                                            "aggregate_name",
                                            "aggregate_unit",
                                            "label",
                                            "error_occurred",
                                            "error_message"};
    for (const nlohmann::json& run : report.micro.at("benchmarks")) {
      std::string counters;
      for (const auto& [key, value] : run.items()) {
        if (std::find(standard.begin(), standard.end(), key) != standard.end() || !value.is_number())
          continue;
        if (!counters.empty()) counters += ';';
        counters += key + "=" + value.dump();
      }
      const auto number = [&run](const char* key) {
        return run.contains(key) ? run.at(key).dump() : std::string();
      };
      micro.cell(run.value("name", "")).cell(run.value("run_type", "")).cell(number("iterations"));
      micro.cell(number("real_time")).cell(number("cpu_time")).cell(run.value("time_unit", ""));
      micro.cell(number("bytes_per_second")).cell(number("items_per_second")).cell(counters).end_row();
    }
    written.push_back(micro.path());
  }
  return written;
}

}  // namespace xax_bench
