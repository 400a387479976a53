// mixed_precision_benchmark: what mixed precision buys on this machine.
//
// Trains the same MLP under each precision policy on Fashion-MNIST (or a synthetic stand-in), probes peak
// memory on an activation-heavy configuration, runs xax's Google Benchmark micro-benchmarks and the PyTorch
// reference, prints what it measured, and writes report.json (the record) and the plots (CSV files, gnuplot
// scripts and, where gnuplot exists, PNG and SVG). `--help` lists the options.

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <filesystem>
#include <iostream>
#include <map>
#include <new>
#include <regex>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>
#include <xax/ops/matmul.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/threads.hpp>

#include "report/csv.hpp"
#include "report/format.hpp"
#include "report/gnuplot.hpp"
#include "report/json_report.hpp"
#include "report/results.hpp"
#include "runner/char_workload.hpp"
#include "runner/dataset.hpp"
#include "runner/memory.hpp"
#include "runner/micro.hpp"
#include "runner/options.hpp"
#include "runner/peer.hpp"
#include "runner/training.hpp"

#if XAX_HAS_MPI
#include <xax/distributed/communicator.hpp>
#endif

#ifndef XAX_BENCH_VERSION
#define XAX_BENCH_VERSION "unknown"
#endif

namespace {

using xax_bench::BenchmarkReport;
using xax_bench::mib;
using xax_bench::Options;
using xax_bench::TrainingRun;

// The OpenMP wait policy of this process, as the runtime read it from the environment at start-up.
std::string openmp_wait_note() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  std::string note = "OpenMP threads wait at joins by " +
                     (policy != nullptr ? "OMP_WAIT_POLICY=" + std::string(policy)
                                        : std::string("the runtime's default (OMP_WAIT_POLICY unset)"));
  if (const char* spin = std::getenv("GOMP_SPINCOUNT"); spin != nullptr)
    note += ", GOMP_SPINCOUNT=" + std::string(spin);
  return note;
}

// The processes this run is one of: under mpirun (a build with MPI), the MLP trains data-parallel over all of
// them and rank 0 alone prints and writes the report.
struct ProcessGroup {
  bool data_parallel = false;
  int rank = 0;
  int size = 1;
};

std::string utc_now() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

std::string compiler_description() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("g++ ") + __VERSION__;
#else
  return "unknown compiler";
#endif
}

// The loss scaling a policy runs with: float16 compute needs scaling for its range, float32 and bfloat16 do
// not.
std::string loss_scaling_for(const Options& options, const xax::PolicySpec& spec) {
  if (options.loss_scaling != "auto") return options.loss_scaling;
  return spec.compute == xax::DType::float16 || spec.param == xax::DType::float16 ? "dynamic" : "none";
}

xax_bench::TrainingSetup standard_setup(const Options& options, const std::string& policy) {
  xax_bench::TrainingSetup setup;
  setup.configuration = "standard";
  setup.policy = policy;
  setup.loss_scaling = loss_scaling_for(options, xax::get_policy(policy));
  setup.layer_sizes = {784, 512, 512, 10};
  setup.batch_size = options.batch_size;
  setup.batch_size_given = options.batch_size_given;
  setup.epochs = options.epochs;
  setup.learning_rate = options.learning_rate;
  setup.seed = options.seed;
  setup.progress = options.progress;
  setup.accumulation_steps = options.accumulation_steps;
  setup.data_parallel = options.data_parallel;
  setup.wire_dtype = options.wire_dtype;
  setup.zero_stage = options.zero_stage;
  setup.bucket_size = options.bucket_size;
  return setup;
}

// Large batch, wide layers, a few steps: activations dominate the memory, which is where 16-bit storage pays.
xax_bench::TrainingSetup memory_probe_setup(const Options& options, const std::string& policy) {
  xax_bench::TrainingSetup setup = standard_setup(options, policy);
  setup.configuration = "activation-heavy";
  setup.layer_sizes = {784, options.memory_hidden, options.memory_hidden, 10};
  setup.batch_size = options.memory_batch_size;
  setup.batch_size_given = options.memory_batch_size_given;
  setup.batch_size_option = "--memory-batch-size";
  setup.epochs = 1;
  setup.max_steps = options.memory_steps;
  setup.evaluate = false;
  setup.accumulation_steps = 1;
  setup.data_parallel = false;
  return setup;
}

// The run of `policy` by what it is, not how it was spelt: the fp32 reference is found as "default" whether
// --policies said default, f32, full or params=float32.
const TrainingRun* find_run(const BenchmarkReport& report, const std::string& configuration,
                            const std::string& policy) {
  for (const TrainingRun& run : report.training) {
    if (run.configuration == configuration && xax_bench::same_policy(run.policy, policy)) return &run;
  }
  return nullptr;
}

void add_accuracy_checks(BenchmarkReport& report, const Options& options) {
  const TrainingRun* reference = find_run(report, "standard", "default");
  if (reference == nullptr) {
    report.notes.push_back(
        "no accuracy check: --policies has no fp32 policy (default, f32, float32, full) to compare against");
    return;
  }
  for (const TrainingRun& run : report.training) {
    if (run.configuration != "standard" || xax_bench::is_fp32_reference(run.policy)) continue;
    xax_bench::AccuracyCheck check;
    check.policy = run.policy;
    check.accuracy = run.test_accuracy;
    check.reference_accuracy = reference->test_accuracy;
    check.difference_pp = 100.0 * (run.test_accuracy - reference->test_accuracy);
    check.tolerance_pp = options.accuracy_tolerance_pp;
    check.pass = run.error.empty() && std::abs(check.difference_pp) <= check.tolerance_pp;
    report.accuracy_checks.push_back(check);
  }
}

void add_memory_checks(BenchmarkReport& report) {
  const TrainingRun* reference = find_run(report, "activation-heavy", "default");
  if (reference == nullptr) return;
  for (const TrainingRun& run : report.training) {
    if (run.configuration != "activation-heavy" || xax_bench::is_fp32_reference(run.policy)) continue;
    xax_bench::MemoryCheck check;
    check.policy = run.policy;
    const auto ratio = [](std::size_t a, std::size_t b) {
      return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b);
    };
    check.rss_growth_ratio = ratio(reference->peak_rss_growth_bytes(), run.peak_rss_growth_bytes());
    check.tensor_ratio = ratio(reference->tensor_bytes.total(), run.tensor_bytes.total());
    check.pass = run.peak_rss_reset && check.rss_growth_ratio >= check.required_ratio;
    report.memory_checks.push_back(check);
  }
}

// The TrainStep micro-benchmarks that ran, by policy: thread count -> run name ("TrainStep/mixed/threads:2",
// with Google Benchmark's suffixes such as "/real_time").
std::map<std::string, std::map<int, std::string>> train_step_micro_runs(const nlohmann::json& micro) {
  std::map<std::string, std::map<int, std::string>> found;
  if (!micro.is_object() || !micro.contains("benchmarks")) return found;
  static const std::regex name(R"(^TrainStep/([A-Za-z0-9_]+)/threads:([0-9]+)(/.*)?$)");
  for (const nlohmann::json& run : micro.at("benchmarks")) {
    std::smatch match;
    const std::string run_name = run.value("run_name", run.value("name", ""));
    if (std::regex_match(run_name, match, name)) found[match[1]][std::stoi(match[2])] = run_name;
  }
  return found;
}

void run_peers(BenchmarkReport& report, const Options& options, std::ostream& say) {
  const xax_bench::TorchPython torch = xax_bench::find_torch_python(options.python, options.out);
  if (!torch.python) {
    report.peer_note = torch.note;
    say << "PyTorch reference: " << torch.note << '\n';
    return;
  }
  const std::optional<std::filesystem::path> script = xax_bench::find_peer_script();
  if (!script) {
    report.peer_note = "peers/torch_mlp.py was found neither next to the binary nor in the source tree";
    say << "PyTorch reference: " << report.peer_note << '\n';
    return;
  }
  report.torch_version = torch.torch_version;
  if (const std::string warning = xax_bench::reference_blas_warning(); !warning.empty()) {
    report.notes.push_back(warning);
    say << "PyTorch reference: note: " << warning << '\n';
  }
  const auto micro_runs = train_step_micro_runs(report.micro);
  std::vector<std::string> failures;
  for (const std::string policy : {"default", "mixed"}) {
    // Prefer xax's TrainStep micro-benchmark (batch 256, the peer's own setting); without it, the training
    // run.
    std::vector<std::pair<int, double>> targets;  // threads, xax ms
    std::string source;
    std::int64_t batch = 256;
    if (auto it = micro_runs.find(policy); it != micro_runs.end()) {
      for (const auto& [threads, run_name] : it->second) {
        targets.emplace_back(threads, xax_bench::micro_time_ms(report.micro, run_name));
      }
      source = "TrainStep micro-benchmark, batch 256";
    } else if (const TrainingRun* run = find_run(report, "standard", policy)) {
      targets.emplace_back(options.threads, run->step_time_ms);
      batch = run->batch_size;
      source = "training run, median step, batch " + std::to_string(batch);
    }
    for (const auto& [threads, xax_ms] : targets) {
      say << "PyTorch reference: " << policy << ", " << threads << " thread(s)..." << std::flush;
      const auto outcome =
          xax_bench::run_torch_peer(*torch.python, *script, policy, threads, batch, options.out);
      if (const auto* step = std::get_if<xax_bench::TorchStep>(&outcome)) {
        // PERFORMANCE.md: xax's bf16-mixed step at most 0.85x PyTorch autocast-bf16's.
        const double target = policy == "mixed" ? 0.85 : 0.0;
        report.peers.push_back({policy, threads, step->median_step_ms, xax_ms, source, target});
        say << " " << xax_bench::fixed(step->median_step_ms, 2) << " ms per step (xax "
            << xax_bench::fixed(xax_ms, 2) << " ms)\n";
      } else {
        failures.push_back(policy + "/" + std::to_string(threads) + ": " + std::get<std::string>(outcome));
        say << " failed: " << std::get<std::string>(outcome) << '\n';
      }
    }
  }
  report.peer_note =
      "PyTorch " + torch.torch_version + " via " + torch.python->string() +
      "; `mixed` is torch.autocast('cpu', bfloat16), an MLP 784-512-512-10 AdamW step on a fixed batch";
  for (const std::string& failure : failures) report.peer_note += "; failed: " + failure;
}

void print_training_line(std::ostream& say, const TrainingRun& run) {
  using xax_bench::fixed;
  say << "  " << run.label() << ": test accuracy " << fixed(100.0 * run.test_accuracy, 2)
      << " %, final train loss " << fixed(run.final_train_loss, 4) << ", step " << fixed(run.step_time_ms, 2)
      << " ms (" << fixed(run.throughput_samples_per_s, 0) << " samples/s), peak RSS "
      << mib(run.peak_rss_bytes) << " (+" << mib(run.peak_rss_growth_bytes()) << "), skipped "
      << run.skipped_steps << ", final scale " << xax_bench::scale_text(run.final_loss_scale) << '\n';
  if (!run.error.empty()) say << "    stopped early: " << run.error << '\n';
  say << std::flush;
}

std::string benchmark_format(const Options& options) {
  for (const std::string& arg : options.benchmark_args) {
    if (arg.starts_with("--benchmark_format=")) return arg.substr(19);
  }
  return "console";
}

// Under mpirun with more than one process only the MLP comparison runs (data-parallel); the parts that are
// single-process by nature are skipped, and the returned notes say so.
std::vector<std::string> adapt_to_process_group(Options& options, const ProcessGroup& group) {
  if (options.data_parallel && !group.data_parallel) {
    throw xax::ConfigError(
        "--data-parallel: this mixed_precision_benchmark was built without MPI (xax::mpi); install "
        "libopenmpi-dev openmpi-bin and reconfigure, or drop the flag");
  }
  options.data_parallel = group.data_parallel;
  if (!group.data_parallel &&
      (options.wire_dtype != "float32" || options.zero_stage != 0 || options.bucket_size != 0)) {
    throw xax::ConfigError(
        "--wire-dtype, --zero-stage and --bucket-size configure data-parallel training; run under mpirun (or "
        "give --data-parallel) in a build with MPI, or drop them");
  }
  if (options.accumulation_steps == 0) options.accumulation_steps = group.data_parallel ? group.size : 1;
  std::vector<std::string> notes;
  if (group.size <= 1) return notes;
  if (options.skip_training || options.workload == "char-transformer") {
    throw xax::ConfigError("under mpirun (" + std::to_string(group.size) +
                           " processes) only the MLP training runs, data-parallel; give --workload mlp and "
                           "no --skip-training, or run the other parts in a single process");
  }
  if (options.workload != "mlp") {
    options.workload = "mlp";
    notes.push_back(
        "multi-process run: the character-level GPT workload was skipped (it runs single-process)");
  }
  if (!options.skip_memory_probe) {
    options.skip_memory_probe = true;
    notes.push_back(
        "multi-process run: the activation-heavy memory probe was skipped (it runs single-process)");
  }
  if (!options.skip_micro) {
    options.skip_micro = true;
    notes.push_back("multi-process run: the micro-benchmarks were skipped (they run single-process)");
  }
  if (!options.skip_peer) {
    options.skip_peer = true;
    notes.push_back("multi-process run: the PyTorch reference was skipped (it runs single-process)");
  }
  if (group.rank != 0) options.progress = false;
  return notes;
}

int run(int argc, char** argv, const ProcessGroup& group) {
  xax_bench::ParsedOptions parsed = xax_bench::parse_options(argc, argv);
  if (!parsed.options) return parsed.exit_code;
  Options options = std::move(*parsed.options);
  const std::vector<std::string> group_notes = adapt_to_process_group(options, group);
  if (!options.skip_micro && !xax_bench::initialize_google_benchmark(options, argv[0])) return 2;
  xax::set_num_threads(options.threads);

  std::error_code error;
  if (group.rank == 0) std::filesystem::create_directories(options.out, error);
  if (group.rank == 0 && (error || !std::filesystem::is_directory(options.out))) {
    if (group.data_parallel) {  // the other ranks wait in collectives: end the job, with the reason
      throw std::runtime_error("cannot create the output directory '" + options.out.string() +
                               "'; choose another with --out");
    }
    std::cerr << "mixed_precision_benchmark: cannot create the output directory '" << options.out.string()
              << "': " << (error ? error.message() : "a file of that name exists")
              << "; choose another with --out\n";
    return 2;
  }

  // With --skip-training and a machine-readable --benchmark_format, stdout carries only Google Benchmark's
  // output.
  // Under mpirun, rank 0 alone speaks.
  std::ostream silent(nullptr);
  std::ostream& say = group.rank != 0                                                   ? silent
                      : options.skip_training && benchmark_format(options) != "console" ? std::cerr
                                                                                        : std::cout;

  BenchmarkReport report;
  report.started_at = utc_now();
  report.command_line = options.command_line;
  report.xax_version = XAX_BENCH_VERSION;
  report.compiler = compiler_description();
  report.cpu_features = xax::cpu_features().str();
  report.half_dtype = std::string(xax::dtype_name(xax::half_dtype()));
  report.matmul_backend = xax_bench::matmul_backend_description();
  report.threads = options.threads;
  report.world_size = group.size;
  report.notes.insert(report.notes.end(), group_notes.begin(), group_notes.end());
  report.load_average_start = xax_bench::load_average();
  if (report.load_average_start > 0.5 * xax_bench::available_cpus()) {
    report.notes.push_back(
        "the machine was already busy when the benchmark started (load average " +
        xax_bench::fixed(report.load_average_start, 2) + " on " +
        std::to_string(xax_bench::available_cpus()) +
        " CPUs): timings, multi-threaded ones most, are noisy; re-run on an idle machine, or "
        "with OMP_WAIT_POLICY=passive where it stays shared (README, Threads on a shared machine)");
  }
  // How OpenMP's threads wait at a join moves multi-threaded times by 10 % alone and by a factor of 1.6
  // beside another process (README, Threads on a shared machine), so the report says which way they waited.
  report.notes.push_back(openmp_wait_note());
  say << "mixed_precision_benchmark (xax " << report.xax_version << ")\n  CPU: " << report.cpu_features
      << "\n  half type: " << report.half_dtype << "; matmul backend: " << report.matmul_backend
      << "; threads: " << options.threads << "\n";
  // Where 16-bit products are only widened to fp32, mixed precision cannot be faster than fp32; say so up
  // front.
  const xax::HalfMatmulSupport half_support = xax::half_matmul_support(xax::half_dtype());
  say << "  half matmul: " << half_support.explanation << "\n";
  if (!half_support.native) report.notes.push_back(half_support.explanation);

  const bool run_mlp = options.workload != "char-transformer";
  const bool run_char_transformer = options.workload != "mlp";
  if (!options.skip_training && !run_mlp) {
    report.dataset = "none";
    report.dataset_note = "the MLP was not trained (--workload char-transformer)";
  }
  if (!options.skip_training && run_mlp) {
    const xax_bench::LoadedData data = xax_bench::load_data(options);
    report.dataset = data.splits.name;
    report.dataset_note = data.note;
    // Before any run: a typed batch larger than the split is refused here, and a reduced default is printed
    // as the batch that trains, with where it came from.
    const auto batch_text = [&](std::int64_t asked, bool given, const std::string& option) {
      const std::int64_t batch =
          xax_bench::effective_batch_size(asked, given, option, data.splits.train.size());
      if (batch == asked) return std::to_string(batch);
      report.notes.push_back(option + "'s default " + std::to_string(asked) + " is larger than the " +
                             std::to_string(data.splits.train.size()) + " training samples, so those runs " +
                             "train with batch " + std::to_string(batch));
      return std::to_string(batch) + " (" + option + "'s default " + std::to_string(asked) +
             ", reduced to the training samples)";
    };
    const std::string batch = batch_text(options.batch_size, options.batch_size_given, "--batch-size");
    const std::string memory_batch =
        options.skip_memory_probe
            ? std::string()
            : batch_text(options.memory_batch_size, options.memory_batch_size_given, "--memory-batch-size");
    say << "  data: " << data.note << "\n\nTraining MLP 784-512-512-10, batch " << batch << ", "
        << options.epochs << " epoch(s), AdamW with cosine decay";
    if (options.accumulation_steps > 1)
      say << ", " << options.accumulation_steps << " micro-batches per step";
    if (group.data_parallel) say << ", data-parallel on " << group.size << " process(es)";
    say << ":\n" << std::flush;
    for (const std::string& policy : options.policies) {
      report.training.push_back(xax_bench::run_training(standard_setup(options, policy), data.splits));
      print_training_line(say, report.training.back());
    }
    add_accuracy_checks(report, options);
    if (!options.skip_memory_probe) {
      say << "\nActivation-heavy memory probe: MLP 784-" << options.memory_hidden << "-"
          << options.memory_hidden << "-10, batch " << memory_batch << ", " << options.memory_steps
          << " step(s):\n"
          << std::flush;
      for (const std::string& policy : options.policies) {
        report.training.push_back(xax_bench::run_training(memory_probe_setup(options, policy), data.splits));
        print_training_line(say, report.training.back());
      }
      add_memory_checks(report);
    }
    for (const TrainingRun& run : report.training) {
      if (!run.peak_rss_reset) {
        report.notes.push_back(
            "the peak RSS could not be reset between runs (/proc/self/clear_refs is not "
            "writable here), so peak_rss_bytes are lifetime peaks of the process");
        break;
      }
    }
  } else if (options.skip_training) {
    report.dataset = "none";
    report.dataset_note = "training skipped (--skip-training)";
  }
  if (!options.skip_training && run_char_transformer) {
    xax_bench::run_char_workload(report, options, say, loss_scaling_for);
  }

  if (!options.skip_micro) {
    say << "\nMicro-benchmarks (Google Benchmark"
        << (options.benchmark_args.empty() ? ", short default selection" : "") << "):\n"
        << std::flush;
    const xax_bench::MicroOutcome micro = xax_bench::run_micro_benchmarks();
    report.micro = micro.results;
    if (micro.matched == 0) report.notes.push_back("the --benchmark_filter matched no micro-benchmark");
  }

  if (!options.skip_peer && !options.skip_training && run_mlp) {
    say << '\n';
    run_peers(report, options, say);
  } else {
    report.peer_note = options.skip_peer ? "the PyTorch reference was skipped (--skip-peer)"
                                         : "the PyTorch reference runs with the training comparison";
  }

  report.load_average_end = xax_bench::load_average();
  if (group.rank != 0) return 0;  // rank 0 writes the report

  // The files: the record, then the plots' input and the plots (images where gnuplot exists).
  const auto csv_files = xax_bench::write_csv_files(report, options.out);
  const xax_bench::PlotOutcome plots =
      xax_bench::write_plots(report, options.out, xax_bench::find_program("gnuplot"));
  for (const std::string& problem : plots.problems) report.notes.push_back(problem);
  xax_bench::write_json_report(report, options.out);

  say << '\n';
  for (const xax_bench::AccuracyCheck& check : report.accuracy_checks) {
    say << (check.pass ? "PASS" : "FAIL") << " accuracy: " << check.policy << " "
        << xax_bench::fixed(100.0 * check.accuracy, 2) << " % vs fp32 "
        << xax_bench::fixed(100.0 * check.reference_accuracy, 2) << " % ("
        << xax_bench::fixed(check.difference_pp, 2) << " pp, tolerance "
        << xax_bench::fixed(check.tolerance_pp, 2) << " pp)\n";
  }
  for (const xax_bench::MemoryCheck& check : report.memory_checks) {
    // The numbers that explain a miss: whether the tensors xax holds shrink (they do unless the policy keeps
    // 16-bit params, which still get fp32 gradients and moments), how much of fp32's tensor bytes are
    // activations (small: the probe is not activation-heavy; raise --memory-batch-size), and what ran the
    // matmuls (a "widened" path makes fp32 scratch copies of the 16-bit operands, outside the tensors).
    const TrainingRun* reference = find_run(report, "activation-heavy", "default");
    const TrainingRun* run = find_run(report, "activation-heavy", check.policy);
    const xax_bench::TensorBytes& fp32 = reference->tensor_bytes;
    say << (check.pass ? "PASS" : "FAIL") << " memory: " << check.policy << " needs "
        << xax_bench::fixed(check.rss_growth_ratio, 2) << "x less peak RSS growth than fp32 (required "
        << xax_bench::fixed(check.required_ratio, 2) << "x): " << mib(reference->peak_rss_growth_bytes())
        << " vs " << mib(run->peak_rss_growth_bytes()) << "; tensor bytes "
        << xax_bench::fixed(check.tensor_ratio, 2) << "x less, activations "
        << xax_bench::fixed(100.0 * static_cast<double>(fp32.activations) / static_cast<double>(fp32.total()),
                            0)
        << " % of fp32's; matmul: " << run->matmul_implementation
        << (run->peak_rss_reset ? "" : "; peak RSS not resettable, so not comparable") << '\n';
  }
  for (const std::string& note : report.notes) say << "note: " << note << '\n';
  say << "\nReport written to " << options.out.string() << "/: report.json, " << csv_files.size()
      << " CSV files" << (plots.images.empty() ? "" : ", " + std::to_string(plots.images.size()) + " images")
      << '\n';
  return 0;
}

// What running out of memory says: the options that shrink what the benchmark holds.
constexpr const char* out_of_memory_message =
    "out of memory (std::bad_alloc): the configuration needs more memory than this process may have; give a "
    "smaller --batch-size, --memory-batch-size, --memory-hidden, --train-samples, --gpt-batch-size or "
    "--gpt-block-size";

#if XAX_HAS_MPI
// Started by an MPI launcher (Open MPI's mpirun, MPICH's Hydra, a PMIx launcher such as srun), or asked for
// with
// --data-parallel. Without a launcher's variables MPI is not initialised: a singleton MPI_Init can be slow or
// fail where no MPI runtime is set up, and the single-process benchmark must not depend on it.
bool started_by_mpi(int argc, char** argv) {
  for (const char* variable : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(variable) != nullptr) return true;
  }
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--data-parallel") return true;
  }
  return false;
}
#endif

}  // namespace

int main(int argc, char** argv) {
#if XAX_HAS_MPI
  if (started_by_mpi(argc, argv)) {
    xax::distributed::Environment mpi(argc, argv);
    // A rank that fails ends the whole job with its message (the others would wait in a collective).
    return xax::distributed::run_or_abort([&] {
      ProcessGroup group;
      group.data_parallel = true;
      MPI_Comm_rank(MPI_COMM_WORLD, &group.rank);
      MPI_Comm_size(MPI_COMM_WORLD, &group.size);
      try {
        return run(argc, argv, group);
      } catch (const std::bad_alloc&) {
        throw std::runtime_error(out_of_memory_message);  // the stack unwound: there is memory for a message
      }
    });
  }
#endif
  try {
    return run(argc, argv, ProcessGroup{});
  } catch (const xax::Error& error) {
    std::cerr << "mixed_precision_benchmark: " << error.what() << '\n';
  } catch (const std::bad_alloc&) {
    std::cerr << "mixed_precision_benchmark: " << out_of_memory_message << '\n';
  } catch (const std::exception& error) {
    std::cerr << "mixed_precision_benchmark: unexpected error: " << error.what() << '\n';
  }
  return 1;
}
