#pragma once
// The CSV files: gnuplot's input, written on every run whether or not gnuplot is there, so the plots can be
// drawn later or with another tool. One row per record, a header row first (RFC 4180 quoting).

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "report/results.hpp"

namespace xax_bench {

/// Writes one CSV file row by row; throws std::runtime_error naming the file if it cannot be written.
class CsvWriter {
 public:
  CsvWriter(std::filesystem::path path, const std::vector<std::string_view>& header)
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

/// training.csv's columns, in order. The plots address columns by position (gnuplot's `$N`), so they look
/// the position up here (training_column) instead of repeating a number that would drift from the file.
inline const std::vector<std::string_view>& training_csv_columns() {
  static const std::vector<std::string_view> columns{"run",
                                                     "configuration",
                                                     "step_time_ms",
                                                     "step_time_p10_ms",
                                                     "step_time_p90_ms",
                                                     "peak_rss_growth_bytes",
                                                     "params_bytes",
                                                     "train_state_bytes",
                                                     "activations_bytes"};
  return columns;
}

/// `$N`, gnuplot's reference to training.csv's column `name`. Throws std::logic_error for an unknown name.
inline std::string training_column(std::string_view name) {
  const auto& columns = training_csv_columns();
  const auto found = std::find(columns.begin(), columns.end(), name);
  if (found == columns.end()) throw std::logic_error("training.csv has no column " + std::string(name));
  return "$" + std::to_string(found - columns.begin() + 1);
}

/// Writes the plots' input into `dir`: training.csv (step times and memory per run), epochs.csv (test
/// accuracy per epoch), loss_curves.csv, and for the character-level GPT char_loss_curves.csv and
/// char_loss_scale.csv. Returns the files written. Everything else a run measured is in report.json only.
inline std::vector<std::filesystem::path> write_csv_files(const BenchmarkReport& report,
                                                          const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> written;

  CsvWriter training(dir / "training.csv", training_csv_columns());
  for (const TrainingRun& run : report.training) {
    const TensorBytes& t = run.tensor_bytes;
    training.cell(run.label()).cell(run.configuration);
    training.cell(run.step_time_ms).cell(run.step_time_p10_ms).cell(run.step_time_p90_ms);
    training.cell(run.peak_rss_growth_bytes()).cell(t.params).cell(t.train_state).cell(t.activations);
    training.end_row();
  }
  written.push_back(training.path());

  CsvWriter epochs(dir / "epochs.csv", {"run", "epoch", "test_accuracy"});
  for (const TrainingRun& run : report.training) {
    for (const EpochRecord& e : run.epoch_records)
      epochs.cell(run.label()).cell(e.epoch).cell(e.test_accuracy).end_row();
  }
  written.push_back(epochs.path());

  CsvWriter curves(dir / "loss_curves.csv", {"run", "step", "loss"});
  for (const TrainingRun& run : report.training) {
    for (const LossPoint& p : run.loss_curve) curves.cell(run.label()).cell(p.step).cell(p.loss).end_row();
  }
  written.push_back(curves.path());

  const auto is_char = [](const TrainingRun& run) { return run.workload == "char-transformer"; };
  if (std::any_of(report.training.begin(), report.training.end(), is_char)) {
    CsvWriter char_curves(dir / "char_loss_curves.csv", {"policy", "split", "step", "loss"});
    CsvWriter char_scale(dir / "char_loss_scale.csv", {"policy", "step", "loss_scale"});
    for (const TrainingRun& run : report.training) {
      if (!is_char(run)) continue;
      for (const LossPoint& p : run.loss_curve)
        char_curves.cell(run.policy_label()).cell("train").cell(p.step).cell(p.loss).end_row();
      for (const LossPoint& p : run.val_curve)
        char_curves.cell(run.policy_label()).cell("val").cell(p.step).cell(p.loss).end_row();
      for (const LossPoint& p : run.loss_scale_curve)
        char_scale.cell(run.policy_label()).cell(p.step).cell(p.loss).end_row();
    }
    written.push_back(char_curves.path());
    written.push_back(char_scale.path());
  }
  return written;
}

}  // namespace xax_bench
