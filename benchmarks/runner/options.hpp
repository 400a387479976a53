#pragma once
// The command line of mixed_precision_benchmark. CLI11 parses our own flags; Google Benchmark's --benchmark_*
// flags are set aside first and handed to benchmark::Initialize, so each parser sees only what it knows and a
// typo in either gets an error message rather than being silently ignored.

#include <sched.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

#include "runner/batch_size.hpp"
#include "runner/policies.hpp"

namespace xax_bench {

/// Everything the command line sets.
struct Options {
  std::string dataset = "auto";  ///< fashion-mnist, synthetic, or auto (Fashion-MNIST when installed)
  int epochs = 10;
  int threads = 1;
  /// Each a preset, a dtype name or a key=dtype spec (runner/policies.hpp), all different policies.
  std::vector<std::string> policies{"default", "mixed", "float16"};
  std::string loss_scaling = "auto";  ///< auto: dynamic where compute is float16, none otherwise
  std::int64_t batch_size = 256;
  bool batch_size_given = false;  ///< typed, so never reduced to a smaller train split (effective_batch_size)
  double learning_rate = 1e-3;
  std::int64_t train_samples = 0;  ///< 0: the whole split
  std::int64_t test_samples = 0;
  std::uint64_t seed = 0;
  double accuracy_tolerance_pp = 0.3;

  std::int64_t memory_batch_size = 8192;  ///< the activation-heavy configuration
  bool memory_batch_size_given = false;
  std::int64_t memory_hidden = 1024;
  std::int64_t memory_steps = 4;

  // The workloads: the MLP, the character-level GPT (runner/char_training.hpp), or both.
  std::string workload = "all";               ///< mlp, char-transformer or all
  std::optional<std::filesystem::path> text;  ///< the GPT's corpus; default: Debian's fortune files
  std::int64_t gpt_steps = 300;               ///< the main job's budget (nanoGPT's CPU run: 2000; see README)
  std::int64_t gpt_batch_size = 12;
  std::int64_t gpt_block_size = 64;
  std::int64_t gpt_layers = 4;
  std::int64_t gpt_heads = 4;
  std::int64_t gpt_embedding = 128;
  std::int64_t gpt_eval_interval = 100;
  std::int64_t gpt_eval_batches = 20;
  std::int64_t gpt_final_eval_batches = 200;  ///< nanoGPT's eval_iters

  std::filesystem::path out = "mixed_precision_report";
  bool skip_micro = false;
  bool skip_training = false;
  bool skip_memory_probe = false;
  bool skip_peer = false;
  bool progress = true;
  /// Micro-batches per MLP training step (0: 1, or the world size under mpirun); --batch-size stays the
  /// global batch.
  std::int64_t accumulation_steps = 0;
  bool data_parallel = false;  ///< --data-parallel: initialise MPI even when no launcher's variables are set
  /// Data-parallel training only (DataParallelConfig's fields): the gradients' wire type, the ZeRO stage and
  /// the reducer's bucket size in gradient elements (0: one bucket).
  std::string wire_dtype = "float32";
  std::int64_t zero_stage = 0;
  std::int64_t bucket_size = 0;
  std::string python = "auto";  ///< the interpreter for the PyTorch peer: auto, none, or a path

  std::vector<std::string> benchmark_args;  ///< the --benchmark_* flags, for benchmark::Initialize
  std::string command_line;                 ///< as typed, for the report
};

/// The result of parsing: options to run with, or an exit code (help printed, or an error explained).
struct ParsedOptions {
  std::optional<Options> options;
  int exit_code = 0;
};

/// The CPUs this process may run on (its affinity mask), which is what a default thread count should use.
inline int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

/// Whether `arg` belongs to Google Benchmark rather than to us.
inline bool is_benchmark_flag(const std::string& arg) {
  return arg.starts_with("--benchmark_") || arg == "--v" || arg.starts_with("--v=");
}

namespace detail {

/// CLI11 2.1.2 converts integers with strtoll/strtoull in base 0, so "010" would be octal 8, "0x100" 256,
/// "-1" a seed of 2^64-1 and an overflowing value the largest one. An integer option's text must therefore
/// be plain decimal, checked before CLI11 converts it; the range check (CLI::Range) follows.
template <std::integral Int>
CLI::Validator decimal_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const std::string range = "from " + std::to_string(std::numeric_limits<Int>::min()) + " to " +
                                  std::to_string(std::numeric_limits<Int>::max());
        const bool negative = !text.empty() && text.front() == '-';
        const std::string_view digits = std::string_view(text).substr(negative ? 1 : 0);
        if (digits.empty() ||
            !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
          return "'" + text + "' is not a decimal integer; accepted: decimal digits" +
                 (std::is_signed_v<Int> ? std::string(" with an optional '-'") : std::string()) +
                 " (no '+', 0x, exponent or spaces)";
        }
        if (digits.size() > 1 && digits.front() == '0') {
          return "'" + text + "' has a leading zero (read as octal by CLI11); accepted: a decimal integer " +
                 "without leading zeros";
        }
        if (negative && std::is_unsigned_v<Int>) {
          return "'" + text + "' is negative; accepted: a decimal integer " + range;
        }
        Int value{};
        const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
        if (error != std::errc{} || end != text.data() + text.size()) {
          return "'" + text + "' is out of range; accepted: a decimal integer " + range;
        }
        return {};
      },
      "", "DECIMAL");
}

/// CLI::Range lets NaN through (every comparison with it is false), and CLI11 would also read "inf" and hex
/// floats, so a real-valued option's text must be a finite decimal number, checked before the range.
inline CLI::Validator finite_decimal() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double value = 0;
        const auto [end, error] =
            std::from_chars(text.data(), text.data() + text.size(), value, std::chars_format::general);
        if (error != std::errc{} || end != text.data() + text.size() || !std::isfinite(value)) {
          return "'" + text +
                 "' is not a finite decimal number; accepted: e.g. 0.001 or 1e-3 (no nan, inf, " +
                 "'+' or hex)";
        }
        return {};
      },
      "", "FINITE");
}

}  // namespace detail

inline ParsedOptions parse_options(int argc, char** argv) {
  Options o;
  o.threads = available_cpus();
  std::vector<std::string> ours;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    o.command_line += (i == 1 ? "" : " ") + arg;
    if (is_benchmark_flag(arg)) {
      o.benchmark_args.push_back(arg);
    } else {
      ours.push_back(arg);
    }
  }
  o.command_line = std::string(argc > 0 ? std::filesystem::path(argv[0]).filename().string() : "") +
                   (o.command_line.empty() ? "" : " " + o.command_line);

  CLI::App app{
      "mixed_precision_benchmark: what mixed precision buys on this machine. Trains an MLP 784-512-512-10 "
      "under\n"
      "each precision policy on Fashion-MNIST (or a synthetic stand-in), measures step time, memory, loss\n"
      "curves and accuracy, runs xax's Google Benchmark micro-benchmarks and the PyTorch reference, and "
      "writes\n"
      "report.json and the plots (with their CSV input and gnuplot scripts) into --out."};
  app.name("mixed_precision_benchmark");
  app.footer(
      "Google Benchmark's own flags (--benchmark_filter, --benchmark_min_time, --benchmark_format, "
      "--benchmark_out, --benchmark_repetitions, ...) are passed through to the micro-benchmark part. "
      "Without any, "
      "a short default selection runs.");
  app.add_option("--dataset", o.dataset, "fashion-mnist, synthetic, or auto (Fashion-MNIST when installed)")
      ->check(CLI::IsMember({"auto", "fashion-mnist", "synthetic"}))
      ->capture_default_str();
  app.add_option("--epochs", o.epochs, "training epochs per policy")
      ->check(detail::decimal_integer<int>())
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--threads", o.threads, "compute threads (default: the CPUs this process may use)")
      ->check(detail::decimal_integer<int>())
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  // Split by split_policy_list rather than CLI11's delimiter, which would cut a key=dtype spec at its commas.
  std::vector<std::string> policy_arguments;
  app.add_option("--policies", policy_arguments,
                 "comma-separated precision policies: presets (default, mixed, float16, half), dtype names "
                 "(bf16, f16, f32, ...), or key=dtype specs, whose consecutive pairs form one policy "
                 "(params=float32,compute=bfloat16,output=float32); two key=dtype policies go in separate "
                 "arguments (--policies c=bf16 c=f16); each policy at most once")
      ->default_str("default,mixed,float16");
  app.add_option("--loss-scaling", o.loss_scaling,
                 "none, static, dynamic, or auto (dynamic where compute is float16, none otherwise)")
      ->check(CLI::IsMember({"auto", "none", "static", "dynamic"}))
      ->capture_default_str();
  app.add_option("--batch-size", o.batch_size,
                 "training batch size (at most the training samples; the default is reduced to them)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--learning-rate", o.learning_rate, "AdamW's peak learning rate (cosine decay to 0)")
      ->check(detail::finite_decimal())
      ->check(CLI::Range(1e-8, 10.0))
      ->capture_default_str();
  app.add_option("--train-samples", o.train_samples, "use the first N training samples (0: all)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--test-samples", o.test_samples, "use the first N test samples (0: all)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the initial weights and the data order (0 to 2^64-1)")
      ->check(detail::decimal_integer<std::uint64_t>())
      ->capture_default_str();
  app.add_option("--accuracy-tolerance", o.accuracy_tolerance_pp,
                 "how far (in percentage points) a reduced-precision run's test accuracy may be from fp32's")
      ->check(detail::finite_decimal())
      ->check(CLI::Range(0.0, 100.0))
      ->capture_default_str();
  app.add_option("--memory-batch-size", o.memory_batch_size,
                 "batch size of the activation-heavy memory probe (at most the training samples; the "
                 "default is reduced to them)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--memory-hidden", o.memory_hidden, "hidden width of the activation-heavy memory probe")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  app.add_option("--memory-steps", o.memory_steps, "training steps of the activation-heavy memory probe")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--out", o.out, "directory for report.json, CSVs and plots (created if needed)")
      ->capture_default_str();
  app.add_flag("--skip-micro", o.skip_micro, "skip the Google Benchmark micro-benchmarks");
  app.add_flag("--skip-training", o.skip_training,
               "run only the micro-benchmarks, printed in the format --benchmark_format asks for");
  app.add_flag("--skip-memory-probe", o.skip_memory_probe, "skip the activation-heavy memory configuration");
  app.add_flag("--skip-peer", o.skip_peer, "do not run the PyTorch reference");
  app.add_option(
         "--python", o.python,
         "python3 for the PyTorch reference: auto (/usr/bin/python3, then python3 on PATH), none, or a path")
      ->capture_default_str();
  app.add_option("--workload", o.workload,
                 "what to train: mlp, char-transformer (a character-level GPT) or all")
      ->check(CLI::IsMember({"mlp", "char-transformer", "all"}))
      ->capture_default_str();
  app.add_option("--text", o.text,
                 "the character-level GPT's corpus (any text file; default: the fortune files of Debian's "
                 "fortunes package)");
  app.add_option("--gpt-steps", o.gpt_steps, "training steps of the character-level GPT per policy")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_option("--gpt-batch-size", o.gpt_batch_size, "the GPT's batch size (windows per step)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  app.add_option("--gpt-block-size", o.gpt_block_size, "the GPT's context length (block_size)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 14))
      ->capture_default_str();
  app.add_option("--gpt-layers", o.gpt_layers, "the GPT's transformer blocks (n_layer)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--gpt-heads", o.gpt_heads, "the GPT's attention heads (n_head)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--gpt-embd", o.gpt_embedding, "the GPT's width (n_embd, a multiple of n_head)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1 << 14))
      ->capture_default_str();
  app.add_option("--gpt-eval-interval", o.gpt_eval_interval, "steps between the GPT's validation estimates")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 1000000))
      ->capture_default_str();
  app.add_option("--gpt-eval-batches", o.gpt_eval_batches, "batches per validation estimate (fixed windows)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--gpt-final-eval-batches", o.gpt_final_eval_batches,
                 "batches of the final validation loss, for xax and the PyTorch peer (nanoGPT's eval_iters)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app.add_option("--accumulation-steps", o.accumulation_steps,
                 "micro-batches per MLP training step, each of --batch-size / N examples (0: 1, or the world "
                 "size under mpirun, where the ranks share them)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 20))
      ->capture_default_str();
  app.add_flag("--data-parallel", o.data_parallel,
               "train the MLP data-parallel over MPI (implied under mpirun/mpiexec; needs a build with MPI)");
  app.add_option("--wire-dtype", o.wire_dtype,
                 "data-parallel: the type gradients travel in (bfloat16 halves the bytes; each element is "
                 "summed in fp32 and rounded once)")
      ->check(CLI::IsMember({"float32", "bfloat16"}))
      ->capture_default_str();
  app.add_option("--zero-stage", o.zero_stage,
                 "data-parallel: 0 (optimizer state on every rank) or 1 (sharded over the ranks, ZeRO-1)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::IsMember({std::int64_t{0}, std::int64_t{1}}))
      ->capture_default_str();
  app.add_option("--bucket-size", o.bucket_size,
                 "data-parallel: gradient elements reduced per bucket, bounding the reducer's receive, sum "
                 "and gather buffers (0: the whole gradient in one bucket)")
      ->check(detail::decimal_integer<std::int64_t>())
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40))
      ->capture_default_str();
  bool no_progress = false;
  app.add_flag("--no-progress", no_progress, "no progress display");

  try {
    std::reverse(ours.begin(), ours.end());  // CLI11's vector overload takes the arguments last to first
    app.parse(ours);
  } catch (const CLI::ParseError& error) {
    return {std::nullopt, app.exit(error)};
  }
  o.progress = !no_progress;
  o.batch_size_given = app.count("--batch-size") > 0;
  o.memory_batch_size_given = app.count("--memory-batch-size") > 0;

  const auto fail = [](const std::string& message) {
    std::cerr << "mixed_precision_benchmark: " << message << "\nRun with --help for the options.\n";
    return ParsedOptions{std::nullopt, 2};
  };
  if (o.skip_micro && o.skip_training)
    return fail("--skip-micro and --skip-training together leave nothing to run");
  if (o.gpt_embedding % o.gpt_heads != 0) {
    return fail("--gpt-embd " + std::to_string(o.gpt_embedding) + " is not a multiple of --gpt-heads " +
                std::to_string(o.gpt_heads));
  }
  // The intermediate estimates read the first of the final validation's windows; more would be cut silently.
  if (o.gpt_eval_batches > o.gpt_final_eval_batches) {
    return fail("--gpt-eval-batches " + std::to_string(o.gpt_eval_batches) +
                " exceeds --gpt-final-eval-batches " + std::to_string(o.gpt_final_eval_batches) +
                ": the intermediate estimates use the final validation's first batches; give at most " +
                std::to_string(o.gpt_final_eval_batches));
  }
  if (app.count("--policies") > 0) {
    try {
      o.policies = split_policy_list(policy_arguments);
    } catch (const xax::ConfigError& error) {
      return fail(error.what());
    }
  }
  if (o.policies.empty()) return fail("--policies is empty; give e.g. default,mixed,float16");
  std::vector<xax::PolicySpec> specs;
  for (const std::string& policy : o.policies) {
    try {
      specs.push_back(xax::get_policy(policy));
    } catch (const xax::ConfigError& error) {
      return fail(std::string("--policies: ") + error.what());
    }
    if (!compiles_params_and_compute(BenchmarkPolicies{}, specs.back())) {
      return fail("--policies: '" + policy + "' (" + specs.back().str() +
                  ") has params and compute the benchmark does not compile; accepted params/compute "
                  "pairs (any output): " +
                  compiled_pairs_text(BenchmarkPolicies{}) + ", e.g. default, mixed, float16, bf16");
    }
    // Compared as specs: "default", "f32" and "full" are one policy, which would train twice and leave the
    // accuracy check comparing fp32 with itself.
    for (std::size_t earlier = 0; earlier + 1 < specs.size(); ++earlier) {
      if (specs[earlier] == specs.back()) {
        return fail("--policies: '" + o.policies[earlier] + "' and '" + policy + "' are the same policy (" +
                    specs.back().str() + "); give each policy once");
      }
    }
  }
  return {std::move(o), 0};
}

}  // namespace xax_bench
