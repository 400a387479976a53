#pragma once
// The PyTorch reference (benchmarks/peers/torch_mlp.py): the same MLP step timed in the framework most
// readers know, run only where a python3 that imports torch exists. Debian's python3-torch is visible to
// /usr/bin/python3 and not to a pyenv or venv shim earlier on PATH, so that interpreter is tried first.

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <variant>
#include <vector>

#include "runner/process.hpp"

#ifndef XAX_BENCH_SOURCE_PEERS_DIR
#define XAX_BENCH_SOURCE_PEERS_DIR ""
#endif

namespace xax_bench {

/// A python3 that imports torch, and torch's version; or why there is none.
struct TorchPython {
  std::optional<std::filesystem::path> python;
  std::string torch_version;
  std::string note;  ///< which interpreters were tried and what failed
};

inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

/// Finds the interpreter: `choice` is "auto" (/usr/bin/python3, then python3 on PATH), "none", or a path.
/// Scratch output goes to `scratch_dir`.
inline TorchPython find_torch_python(const std::string& choice, const std::filesystem::path& scratch_dir) {
  TorchPython found;
  if (choice == "none") {
    found.note = "the PyTorch reference was disabled with --python none";
    return found;
  }
  std::vector<std::filesystem::path> candidates;
  if (choice == "auto") {
    candidates.emplace_back("/usr/bin/python3");
    if (auto on_path = find_program("python3"); on_path && *on_path != "/usr/bin/python3") {
      candidates.push_back(*on_path);
    }
  } else {
    candidates.emplace_back(choice);
  }
  const std::filesystem::path probe_log = scratch_dir / "peer_probe.log";
  std::string tried;
  for (const std::filesystem::path& python : candidates) {
    std::error_code error;
    std::filesystem::remove(probe_log, error);
    if (!tried.empty()) tried += "; ";
    if (!find_program(python.string())) {
      tried += python.string() + " does not exist";
      continue;
    }
    const ProcessResult result = run_process(
        {python.string(), "-c", "import sys, torch; sys.stdout.write('torch=' + torch.__version__ + '\\n')"},
        probe_log);
    const std::string output = read_text_file(probe_log);
    const std::size_t marker = output.find("torch=");
    if (result.succeeded() && marker != std::string::npos) {
      found.python = python;
      found.torch_version = output.substr(marker + 6, output.find('\n', marker) - marker - 6);
      std::filesystem::remove(probe_log, error);
      return found;
    }
    tried += python.string() + " cannot import torch";
  }
  found.note = "no python3 that imports torch was found (" + tried +
               "), so the PyTorch reference did not run; on Debian: apt-get install python3-torch";
  return found;
}

/// The peer script: next to the binary (peers/torch_mlp.py, copied there by the build), else in the source
/// tree.
inline std::optional<std::filesystem::path> find_peer_script() {
  std::error_code error;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", error);
  std::vector<std::filesystem::path> candidates;
  if (!error) candidates.push_back(exe.parent_path() / "peers" / "torch_mlp.py");
  if (*XAX_BENCH_SOURCE_PEERS_DIR != '\0')
    candidates.push_back(std::filesystem::path(XAX_BENCH_SOURCE_PEERS_DIR) / "torch_mlp.py");
  for (const auto& candidate : candidates) {
    if (std::filesystem::is_regular_file(candidate, error)) return candidate;
  }
  return std::nullopt;
}

/// A warning when the system BLAS, through which Debian's PyTorch runs its float32 matmuls, is the reference
/// (netlib) implementation: without libopenblas0 installed, PyTorch's fp32 step is an order of magnitude
/// slower than usual and the comparison says little. Empty when an optimised BLAS is selected or none is
/// found.
inline std::string reference_blas_warning() {
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/usr/lib", error)) {
    const std::filesystem::path link = entry.path() / "libblas.so.3";
    if (!std::filesystem::exists(link, error)) continue;
    const std::filesystem::path target = std::filesystem::canonical(link, error);
    if (!error && target.parent_path().filename() == "blas") {
      return "the system BLAS is Debian's reference implementation (" + target.string() +
             "), which PyTorch uses for its float32 matmuls, so its float32 step is far slower than usual; "
             "install "
             "libopenblas0-pthread (apt-get install libopenblas0-pthread) for a fair comparison";
    }
  }
  return {};
}

/// One timed PyTorch step measurement.
struct TorchStep {
  std::string policy;
  int threads = 0;
  double median_step_ms = 0;
};

/// Runs the peer for one policy (default or mixed) and thread count. Returns the measurement or why it
/// failed.
inline std::variant<TorchStep, std::string> run_torch_peer(const std::filesystem::path& python,
                                                           const std::filesystem::path& script,
                                                           const std::string& policy, int threads,
                                                           std::int64_t batch_size,
                                                           const std::filesystem::path& out_dir) {
  const std::filesystem::path json =
      out_dir / ("peer_torch_" + policy + "_threads" + std::to_string(threads) + ".json");
  const ProcessResult result =
      run_process({python.string(), script.string(), "--threads", std::to_string(threads), "--policy", policy,
                   "--batch-size", std::to_string(batch_size), "--steps", "50", "--warmup", "10", "--json",
                   json.string()},
                  out_dir / "peer.log");
  if (!result.succeeded()) return result.error + " (see " + (out_dir / "peer.log").string() + ")";
  const nlohmann::json parsed = nlohmann::json::parse(read_text_file(json), nullptr, false);
  if (!parsed.is_object() || !parsed.contains("median_step_ms") || !parsed.at("median_step_ms").is_number()) {
    return "the peer wrote no median_step_ms to " + json.string();
  }
  return TorchStep{policy, threads, parsed.at("median_step_ms").get<double>()};
}

}  // namespace xax_bench
