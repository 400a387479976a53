#pragma once
// The plots: a gnuplot script per figure, written next to the CSVs it reads, then rendered to PNG and SVG.
// The scripts stay in the report directory so a reader can restyle a figure and re-run `gnuplot NAME.gp`.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "report/csv.hpp"
#include "report/results.hpp"
#include "runner/process.hpp"

namespace xax_bench {

/// What rendering the plots produced.
struct PlotOutcome {
  std::vector<std::filesystem::path> images;  ///< the PNG and SVG files written
  std::vector<std::string> problems;          ///< gnuplot missing or failing, one sentence each
};

namespace detail {

inline std::string gnuplot_quote(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

// The runs of one configuration, in report order, as gnuplot string literals.
inline std::vector<std::string> run_labels(const BenchmarkReport& report, const std::string& configuration) {
  std::vector<std::string> labels;
  for (const TrainingRun& run : report.training) {
    if (configuration.empty() || run.configuration == configuration) labels.push_back(run.label());
  }
  return labels;
}

inline void write_common_style(std::ofstream& out) {
  out << "set datafile separator ','\n"
         "set key outside right top\n"
         "set grid ytics lc rgb '#dddddd'\n"
         "set border 3\nset tics nomirror\n";
}

inline std::string loss_curves_script(const BenchmarkReport& report) {
  std::string script;
  script += "set title 'Training loss (" + report.dataset + ", mean per interval)'\n";
  script += "set xlabel 'step'\nset ylabel 'cross-entropy loss'\nset logscale y\n";
  std::string plot = "plot ";
  bool first = true;
  for (const std::string& label : run_labels(report, "standard")) {
    if (!first) plot += ", \\\n     ";
    first = false;
    plot += "'loss_curves.csv' skip 1 using 2:(strcol(1) eq " + gnuplot_quote(label) +
            " ? $3 : NaN) with lines lw 2 title " + gnuplot_quote(label);
  }
  return first ? std::string() : script + plot + "\n";
}

// The standard runs only: the activation-heavy probe's steps are a hundred times longer and would flatten the
// bars. They come first in training.csv, so rows 0..n-1 are exactly them.
inline std::string accuracy_script(const BenchmarkReport& report) {
  std::string plot = "plot ";
  bool first = true;
  for (const TrainingRun& run : report.training) {
    if (run.configuration != "standard" || run.epoch_records.empty()) continue;
    if (!first) plot += ", \\\n     ";
    first = false;
    plot += "'epochs.csv' skip 1 using 2:(strcol(1) eq " + gnuplot_quote(run.label()) +
            " ? 100*$3 : NaN) with linespoints lw 2 title " + gnuplot_quote(run.label());
  }
  if (first) return {};
  return "set title 'Test accuracy after each epoch (" + report.dataset +
         ")'\nset xlabel 'epoch'\n"
         "set ylabel 'test accuracy (%)'\nset key inside bottom right\nset xtics 1\n" +
         plot + "\n";
}

inline std::string step_time_script(const BenchmarkReport& report) {
  const std::size_t runs = run_labels(report, "standard").size();
  if (runs == 0) return {};
  const auto standard_only = [](const std::string& column) {
    return "(strcol(2) eq 'standard' ? " + training_column(column) + " : NaN)";
  };
  return "set title 'Median training step time, MLP 784-512-512-10 (bars: 10th-90th percentile)'\n"
         "set ylabel 'ms per step'\nset yrange [0:*]\nset xrange [-0.5:" +
         std::to_string(runs) +
         "-0.5]\n"
         "set style fill solid 0.6 border -1\nset boxwidth 0.6\nunset key\n"
         "plot 'training.csv' skip 1 using 0:" +
         standard_only("step_time_ms") +
         ":xtic(1) with boxes lc rgb '#4477aa', \\\n"
         "     '' skip 1 using 0:" +
         standard_only("step_time_ms") + ":" + standard_only("step_time_p10_ms") + ":" +
         standard_only("step_time_p90_ms") + " with yerrorbars lc rgb 'black' pt 0\n";
}

inline std::string memory_script(const BenchmarkReport& report) {
  if (report.training.empty()) return {};
  // Headroom above the tallest stack keeps the key clear of the bars.
  std::size_t tallest = 1;
  for (const TrainingRun& run : report.training) tallest = std::max(tallest, run.tensor_bytes.total());
  const std::string tensor_top = std::to_string(1.4 * static_cast<double>(tallest) / 1048576.0);
  return "set multiplot layout 1,2 title 'Memory per run'\n"
         "set style fill solid 0.7 border -1\nset boxwidth 0.6\nset xtics rotate by -40 left font ',9'\n"
         "set yrange [0:*]\nset bmargin 10\n"
         "set title 'Peak RSS growth during the run'\nset ylabel 'MiB'\nunset key\n"
         "plot 'training.csv' skip 1 using 0:(" +
         training_column("peak_rss_growth_bytes") +
         "/1048576):xtic(1) with boxes lc rgb '#aa3377'\n"
         "set title 'Tensor bytes by kind'\nset key at graph 0.03,0.97 left top Left reverse font ',9'\n"
         "set yrange [0:" +
         tensor_top +
         "]\n"
         "set style data histograms\nset style histogram rowstacked\n"
         "plot 'training.csv' skip 1 using (" +
         training_column("params_bytes") +
         "/1048576):xtic(1) title 'master params', \\\n"
         "     '' skip 1 using (" +
         training_column("train_state_bytes") +
         "/1048576) title 'compute copy, grads, optimizer', \\\n"
         "     '' skip 1 using (" +
         training_column("activations_bytes") +
         "/1048576) title 'activations'\n"
         "unset multiplot\n";
}

// The character-level GPT's runs, one colour per policy: training loss (solid) and validation loss (dashed).
inline std::string char_loss_curves_script(const BenchmarkReport& report) {
  std::string plot;
  int colour = 0;
  for (const TrainingRun& run : report.training) {
    if (run.workload != "char-transformer") continue;
    const std::string policy = gnuplot_quote(run.policy_label());
    const std::string lc = " lc " + std::to_string(++colour);
    plot += (plot.empty() ? "plot " : ", \\\n     ");
    plot += "'char_loss_curves.csv' skip 1 using 3:(strcol(1) eq " + policy +
            " && strcol(2) eq 'train' ? $4 : NaN) with lines lw 1" + lc + " title " +
            gnuplot_quote(run.policy_label() + " train") +
            ", \\\n     'char_loss_curves.csv' skip 1 using 3:(strcol(1) eq " + policy +
            " && strcol(2) eq 'val' ? $4 : NaN) with linespoints lw 2 dt 2" + lc + " title " +
            gnuplot_quote(run.policy_label() + " validation");
  }
  if (plot.empty()) return {};
  return "set title 'Character-level GPT: training loss (mean per interval) and validation loss'\n"
         "set xlabel 'step'\nset ylabel 'cross-entropy (nats per character)'\n" +
         plot + "\n";
}

inline std::string char_loss_scale_script(const BenchmarkReport& report) {
  std::string plot;
  for (const TrainingRun& run : report.training) {
    if (run.workload != "char-transformer") continue;
    plot += (plot.empty() ? "plot " : ", \\\n     ");
    plot += "'char_loss_scale.csv' skip 1 using 2:(strcol(1) eq " + gnuplot_quote(run.policy_label()) +
            " ? $3 : NaN) with steps lw 2 title " + gnuplot_quote(run.policy_label());
  }
  if (plot.empty()) return {};
  return "set title 'Character-level GPT: loss scale after each step'\nset xlabel 'step'\n"
         "set ylabel 'loss scale'\nset logscale y 2\n" +
         plot + "\n";
}

inline std::optional<std::string> render(const std::filesystem::path& gnuplot,
                                         const std::filesystem::path& dir, const std::string& name,
                                         const std::string& png_terminal) {
  // The driver sets the terminal and output, then loads the figure's script, once per format.
  const std::string driver = "cd " + gnuplot_quote(dir.string()) + "; set terminal " + png_terminal +
                             " size 1000,650 noenhanced; set output " + gnuplot_quote(name + ".png") +
                             "; load " + gnuplot_quote(name + ".gp") +
                             "; reset; set terminal svg size 1000,650 noenhanced; "
                             "set output " +
                             gnuplot_quote(name + ".svg") + "; load " + gnuplot_quote(name + ".gp") +
                             "; set output";
  const ProcessResult result = run_process({gnuplot.string(), "-e", driver}, dir / "gnuplot.log");
  if (result.succeeded()) return std::nullopt;
  return result.error;
}

}  // namespace detail

/// Writes a gnuplot script per figure that has data (loss_curves, accuracy, step_time, memory, and for the
/// character-level GPT char_loss_curves and char_loss_scale) into `dir`, next to the CSVs they read, and
/// renders each to PNG and SVG with the gnuplot at `gnuplot`; without one (nullopt), writes the scripts only
/// and says so.
inline PlotOutcome write_plots(const BenchmarkReport& report, const std::filesystem::path& dir,
                               const std::optional<std::filesystem::path>& gnuplot) {
  PlotOutcome outcome;
  const std::vector<std::pair<std::string, std::string>> figures{
      {"loss_curves", detail::loss_curves_script(report)},
      {"accuracy", detail::accuracy_script(report)},
      {"step_time", detail::step_time_script(report)},
      {"memory", detail::memory_script(report)},
      {"char_loss_curves", detail::char_loss_curves_script(report)},
      {"char_loss_scale", detail::char_loss_scale_script(report)},
  };
  for (const auto& [name, body] : figures) {
    if (body.empty()) continue;
    std::ofstream script(dir / (name + ".gp"));
    script << "# Written by mixed_precision_benchmark. To render again, in this directory:\n#   gnuplot -e "
              "\"set "
              "terminal pngcairo size 1000,650; set output '"
           << name << ".png'\" " << name << ".gp\n";
    detail::write_common_style(script);
    script << body;
    script.close();
    if (!gnuplot) continue;
    std::optional<std::string> failure = detail::render(*gnuplot, dir, name, "pngcairo");
    // gnuplot built without cairo still has the libgd png terminal.
    if (failure) failure = detail::render(*gnuplot, dir, name, "png");
    if (failure) {
      outcome.problems.push_back("gnuplot could not render " + name + " (" + *failure + "; see " +
                                 (dir / "gnuplot.log").string() + ")");
      continue;
    }
    outcome.images.push_back(dir / (name + ".png"));
    outcome.images.push_back(dir / (name + ".svg"));
  }
  if (!gnuplot) {
    outcome.problems.push_back(
        "gnuplot was not found on PATH, so only the CSV files and the gnuplot scripts were written; install "
        "it "
        "(Debian: apt-get install gnuplot-nox) and run `gnuplot NAME.gp` in the report directory, or plot "
        "the CSVs "
        "with any tool");
  }
  return outcome;
}

}  // namespace xax_bench
