#pragma once
// summary.md: the result table and the verdicts, short enough to paste into a README or an issue.

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "report/format.hpp"
#include "report/results.hpp"

namespace xax_bench {

/// The Markdown summary as a string.
inline std::string markdown_summary(const BenchmarkReport& report,
                                    const std::vector<std::string>& image_names) {
  std::string md = "# mixed_precision_benchmark\n\n";
  md += "- data set: **" + report.dataset + "** (" + report.dataset_note + ")\n";
  md += "- CPU: `" + report.cpu_features + "`; half type: **" + report.half_dtype + "**\n";
  md += "- matmul backend: " + report.matmul_backend + "; threads: " + std::to_string(report.threads) +
        "; load average " + fixed(report.load_average_start, 2) + " at the start, " +
        fixed(report.load_average_end, 2) + " at the end\n";
  md += "- compiler: " + report.compiler + "; xax " + report.xax_version + "; started " + report.started_at +
        "\n";
  md += "- command: `" + report.command_line + "`\n\n";

  if (!report.training.empty()) {
    md += "## Training\n\n";
    md +=
        "| run | policy | loss scaling | batch | epochs | test acc. | final train loss | step (ms, median) | "
        "samples/s | peak RSS (MiB) | RSS growth (MiB) | tensors (MiB) | skipped | final scale |\n";
    md += "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const TrainingRun& run : report.training) {
      md += "| " + run.label() + " | " + run.policy_spec + " | " + run.loss_scaling + " | " +
            std::to_string(run.batch_size) + " | " + std::to_string(run.epochs) + " | " +
            fixed(100.0 * run.test_accuracy, 2) + " % | " + fixed(run.final_train_loss, 4) + " | " +
            fixed(run.step_time_ms, 2) + " | " + fixed(run.throughput_samples_per_s, 0) + " | " +
            mebibytes(run.peak_rss_bytes) + " | " + mebibytes(run.peak_rss_growth_bytes()) + " | " +
            mebibytes(run.tensor_bytes.total()) + " | " + std::to_string(run.skipped_steps) + " | " +
            scale_text(run.final_loss_scale) + " |\n";
    }
    for (const TrainingRun& run : report.training) {
      if (!run.error.empty()) md += "\n**" + run.label() + " stopped early:** " + run.error + "\n";
    }
    md += "\nMatmul implementation (the last matmul of each run): ";
    for (std::size_t i = 0; i < report.training.size(); ++i) {
      md += (i == 0 ? "" : "; ") + report.training[i].label() + ": `" +
            report.training[i].matmul_implementation + "`";
    }
    md += "\n\n";
  }

  if (!report.accuracy_checks.empty()) {
    md +=
        "## Correctness: accuracy against fp32\n\n| policy | test acc. | fp32 | difference | tolerance | "
        "verdict |\n"
        "|---|---:|---:|---:|---:|---|\n";
    for (const AccuracyCheck& c : report.accuracy_checks) {
      md += "| " + c.policy + " | " + fixed(100.0 * c.accuracy, 2) + " % | " +
            fixed(100.0 * c.reference_accuracy, 2) + " % | " + fixed(c.difference_pp, 2) + " pp | ±" +
            fixed(c.tolerance_pp, 2) + " pp | " + (c.pass ? "PASS" : "FAIL") + " |\n";
    }
    md += "\n";
  }

  if (!report.memory_checks.empty()) {
    md +=
        "## Memory: activation-heavy configuration\n\n| policy | fp32 / this, peak RSS growth | fp32 / this, "
        "tensor "
        "bytes | required | verdict |\n|---|---:|---:|---:|---|\n";
    for (const MemoryCheck& c : report.memory_checks) {
      md += "| " + c.policy + " | " + fixed(c.rss_growth_ratio, 2) + "× | " + fixed(c.tensor_ratio, 2) +
            "× | ≥ " + fixed(c.required_ratio, 2) + "× | " + (c.pass ? "PASS" : "FAIL") + " |\n";
    }
    md += "\n";
    for (const MemoryCheck& c : report.memory_checks) md += "- " + c.policy + ": " + c.explanation + "\n";
    md += "\n";
  }

  md += "## PyTorch peer\n\n";
  if (report.peers.empty()) {
    md += report.peer_note + "\n\n";
  } else {
    md += "torch " + report.torch_version.value_or("?") + "; " + report.peer_note +
          "\n\n| policy | threads | PyTorch step (ms) | xax step (ms) | xax / PyTorch | target | xax "
          "measured by |\n"
          "|---|---:|---:|---:|---:|---|---|\n";
    for (const PeerComparison& p : report.peers) {
      const std::string target =
          p.target_ratio > 0 ? "≤ " + fixed(p.target_ratio, 2) + (p.meets_target() ? " PASS" : " FAIL") : "—";
      md += "| " + p.policy + " | " + std::to_string(p.threads) + " | " + fixed(p.torch_step_ms, 2) + " | " +
            fixed(p.xax_step_ms, 2) + " | " + fixed(p.ratio(), 2) + " | " + target + " | " + p.xax_source +
            " |\n";
    }
    md += "\n";
  }

  if (report.micro.is_object() && report.micro.contains("benchmarks")) {
    md +=
        "## Micro-benchmarks (Google Benchmark)\n\n| benchmark | time | CPU time | throughput "
        "|\n|---|---:|---:|---:|\n";
    for (const nlohmann::json& run : report.micro.at("benchmarks")) {
      std::string throughput;
      if (run.contains("bytes_per_second")) {
        throughput = fixed(run.at("bytes_per_second").get<double>() / 1e9, 2) + " GB/s";
      } else if (run.contains("items_per_second")) {
        throughput = fixed(run.at("items_per_second").get<double>(), 0) + " items/s";
      }
      for (const char* counter : {"GFLOPS", "GFLOP/s", "FLOPS", "flops"}) {
        if (run.contains(counter) && run.at(counter).is_number()) {
          const double value = run.at(counter).get<double>();
          throughput = fixed(value > 1e6 ? value / 1e9 : value, 1) + " GFLOP/s";
        }
      }
      const std::string unit = run.value("time_unit", "");
      md += "| " + run.value("name", "") + " | " + fixed(run.value("real_time", 0.0), 3) + " " + unit +
            " | " + fixed(run.value("cpu_time", 0.0), 3) + " " + unit + " | " + throughput + " |\n";
    }
    md += "\n";
  }

  if (!image_names.empty()) {
    md += "## Plots\n\n";
    for (const std::string& name : image_names) {
      if (name.ends_with(".png")) md += "![" + name + "](" + name + ")\n";
    }
    md += "\n";
  }
  if (!report.notes.empty()) {
    md += "## Notes\n\n";
    for (const std::string& note : report.notes) md += "- " + note + "\n";
  }
  return md;
}

/// Writes summary.md into `dir`; `image_names` are the plot files (relative to `dir`) to link.
inline std::filesystem::path write_markdown_summary(const BenchmarkReport& report,
                                                    const std::filesystem::path& dir,
                                                    const std::vector<std::string>& image_names) {
  const std::filesystem::path path = dir / "summary.md";
  std::ofstream out(path);
  out << markdown_summary(report, image_names);
  if (!out) throw std::runtime_error("cannot write " + path.string());
  return path;
}

}  // namespace xax_bench
