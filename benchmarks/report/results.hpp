#pragma once
// What mixed_precision_benchmark measured, independent of how it is written out: report.json is the record
// (json_report.hpp); the CSV files and gnuplot scripts (csv.hpp, gnuplot.hpp) only draw the plots.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace xax_bench {

/// One point of a loss curve: the mean training loss of the steps since the previous point.
struct LossPoint {
  std::int64_t step = 0;  ///< the last step the point covers (1-based)
  double loss = 0;
};

/// The end of one epoch.
struct EpochRecord {
  int epoch = 0;             ///< 1-based
  double train_loss = 0;     ///< mean loss over the epoch's finite steps
  double test_accuracy = 0;  ///< in [0, 1], evaluated in the policy's compute precision
  double seconds = 0;        ///< wall time of the epoch's training steps (evaluation excluded)
  float loss_scale = 1;      ///< the scale at the end of the epoch
  std::int64_t skipped_steps = 0;
};

/// Bytes of the tensors a run holds, from the trees themselves (payload only, no allocator overhead).
struct TensorBytes {
  std::size_t params = 0;  ///< the master weights
  /// The rest of the train state: the masters' compute-type copy, the gradients and the optimizer moments
  /// (MixedPrecisionMixin::train_state_bytes() less the masters).
  std::size_t train_state = 0;
  std::size_t activations = 0;  ///< the MLP's workspace: activations kept for backward, and their gradients
  [[nodiscard]] std::size_t total() const { return params + train_state + activations; }
};

/// How a data-parallel training run (mixed_precision_benchmark under mpirun) shared its steps, and what the
/// gradient exchange cost (xax::distributed::ReductionStats of rank 0).
struct DataParallelRecord {
  int world_size = 1;
  std::int64_t accumulation_steps = 1;   ///< micro-batches per step, shared by the ranks
  std::int64_t micro_batch_size = 0;     ///< examples per micro-batch (global batch / accumulation_steps)
  std::string wire_dtype = "float32";    ///< the gradients' type on the wire
  bool deterministic = true;             ///< bit-identical params for any world size
  double communication_seconds = 0;      ///< rank 0's time in the gradient reduction, over the run
  double communication_share = 0;        ///< communication_seconds / the run's summed step time
  std::size_t wire_bytes_per_step = 0;   ///< bytes rank 0 sent to other ranks per step
  std::int64_t zero_stage = 0;           ///< 0: optimizer state replicated; 1: sharded (ZeRO-1)
  std::int64_t bucket_size = 0;          ///< gradient elements per reduction bucket (0: one bucket)
  std::size_t buckets_per_step = 0;      ///< buckets the gradient was reduced in
  std::size_t reducer_buffer_bytes = 0;  ///< rank 0's gradient-reducer buffers
  /// ZeRO-1: bytes rank 0 sent per step in the all-gather after the update: of its fp32 masters' shard, or,
  /// with the masters sharded (mixed policies), of its shard of the 16-bit compute copy
  std::size_t master_gather_bytes_per_step = 0;
  /// rank 0's fp32 masters: all N of them, or its shard under ZeRO-1 when the compute type is narrower
  std::size_t master_bytes = 0;
  std::size_t optimizer_state_bytes = 0;  ///< rank 0's optimizer state (its shard under ZeRO-1)
};

/// One training run: a policy on a configuration.
struct TrainingRun {
  std::string workload = "mlp";  ///< "mlp" or "char-transformer" (the character-level GPT)
  std::string configuration;     ///< "standard" (the comparison) or "activation-heavy" (the memory probe)
  std::string policy;            ///< the preset: default, mixed, float16, ...
  std::string policy_spec;       ///< "params=float32,compute=bfloat16,output=float32"
  std::string loss_scaling;      ///< none, static or dynamic
  std::vector<std::int64_t> layer_sizes;
  std::int64_t batch_size = 0;
  int epochs = 0;
  std::int64_t steps = 0;
  std::int64_t train_samples = 0;
  std::int64_t test_samples = 0;

  std::vector<EpochRecord> epoch_records;
  std::vector<LossPoint> loss_curve;
  double test_accuracy = 0;
  double final_train_loss = 0;

  double step_time_ms = 0;      ///< median over the timed steps
  double step_time_p10_ms = 0;  ///< 10th percentile
  double step_time_p90_ms = 0;  ///< 90th percentile
  double throughput_samples_per_s = 0;
  double train_seconds = 0;  ///< wall time of all training steps

  std::size_t rss_before_bytes = 0;  ///< resident set size when the run started
  std::size_t peak_rss_bytes = 0;    ///< the process's peak resident set size during the run (VmHWM)
  bool peak_rss_reset =
      false;  ///< whether the peak could be reset before the run (else it is a lifetime peak)
  TensorBytes tensor_bytes;

  std::int64_t skipped_steps = 0;
  float final_loss_scale = 1;
  std::string last_non_finite;  ///< which tensors overflowed on the last skipped step, if any
  std::string matmul_implementation;
  std::string error;  ///< why the run stopped early (a LossScaleError), or empty when it completed  ///< what
                      ///< ran the run's last matmul (xax::last_matmul_implementation())

  // The character-level GPT's measurements (workload "char-transformer"; see runner/char_training.hpp).
  std::optional<double> val_loss;    ///< final validation loss (mean over the fixed validation windows)
  std::vector<LossPoint> val_curve;  ///< validation loss at each evaluation
  std::vector<LossPoint> loss_scale_curve;  ///< the loss scale after each step, sampled (loss = the scale)
  double tokens_per_s = 0;                  ///< batch * block / median step time

  /// The CRC-32 of the final fp32 master params' bytes in tree order (xax::tree_crc32); equal for 1 and N
  /// ranks in deterministic mode. Absent where xax has no zlib, and for the GPT workload.
  std::optional<std::uint32_t> params_crc32;
  /// Set when the run trained data-parallel (under mpirun).
  std::optional<DataParallelRecord> data_parallel;

  /// Peak RSS growth during the run: what the run itself needed on top of what the process already held.
  [[nodiscard]] std::size_t peak_rss_growth_bytes() const {
    return peak_rss_bytes > rss_before_bytes ? peak_rss_bytes - rss_before_bytes : 0;
  }
  /// The policy as tables and plots show it: a key=dtype spec's commas become spaces, because gnuplot's
  /// strcol() ends a CSV field at a comma even inside quotes, and the plot's line for the run would stay
  /// empty.
  [[nodiscard]] std::string policy_label() const {
    std::string text = policy;
    std::replace(text.begin(), text.end(), ',', ' ');
    return text;
  }
  /// "mixed" or "mixed (activation-heavy)": a label that tells runs apart in tables and plots.
  [[nodiscard]] std::string label() const {
    return configuration == "standard" ? policy_label() : policy_label() + " (" + configuration + ")";
  }
};

/// Whether a reduced-precision run reached accuracy close enough to the fp32 run's.
struct AccuracyCheck {
  std::string policy;
  double accuracy = 0;
  double reference_accuracy = 0;  ///< the default (fp32) run's
  double difference_pp = 0;       ///< accuracy - reference, in percentage points
  double tolerance_pp = 0;
  bool pass = false;
};

/// The activation-heavy memory comparison between a reduced-precision run and the fp32 run.
struct MemoryCheck {
  std::string policy;
  double rss_growth_ratio = 0;  ///< fp32 peak-RSS growth / this run's
  double tensor_ratio = 0;      ///< fp32 tensor bytes / this run's
  double required_ratio = 1.5;
  bool pass = false;
};

/// The PyTorch reference step for one policy, beside xax's.
struct PeerComparison {
  std::string policy;  ///< default or mixed
  int threads = 0;
  double torch_step_ms = 0;  ///< median
  double xax_step_ms = 0;  ///< xax's median step on the same MLP and batch (from TrainStep micro or training)
  std::string xax_source;  ///< where xax_step_ms came from
  double target_ratio = 0;  ///< the xax/PyTorch ratio PERFORMANCE.md asks for (0: none)
  std::optional<double> torch_val_loss =
      std::nullopt;  ///< the peer's final validation loss (char-transformer runs that train)
  std::optional<double> xax_val_loss = std::nullopt;
  std::string workload = "mlp";  ///< "mlp" or "char-transformer" (last: positional initialisers stay valid)
  [[nodiscard]] bool meets_target() const {
    return target_ratio > 0 && ratio() > 0 && ratio() <= target_ratio;
  }
  [[nodiscard]] double ratio() const { return torch_step_ms > 0 ? xax_step_ms / torch_step_ms : 0; }
};

/// The whole report.
struct BenchmarkReport {
  std::string started_at;  ///< UTC, ISO 8601
  std::string command_line;
  std::string xax_version;
  std::string compiler;
  std::string cpu_features;    ///< xax::cpu_features().str()
  std::string half_dtype;      ///< xax::half_dtype()
  std::string matmul_backend;  ///< which matmul ran (oneDNN, portable Eigen path, ...)
  int threads = 1;
  int world_size = 1;  ///< MPI processes that trained (1: no mpirun, or the benchmark was built without MPI)
  double load_average_start = 0;  ///< the 1-minute load average when the benchmark started (others' work)
  double load_average_end = 0;
  std::string dataset;       ///< fashion-mnist or synthetic
  std::string dataset_note;  ///< where it came from, or why synthetic

  std::vector<TrainingRun> training;
  std::vector<AccuracyCheck> accuracy_checks;
  std::vector<MemoryCheck> memory_checks;

  std::optional<std::string> torch_version;  ///< absent when no python3 imports torch
  std::string peer_note;                     ///< why the peer did not run, or how it ran
  std::vector<PeerComparison> peers;

  /// Google Benchmark's own JSON output ({"context": ..., "benchmarks": [...]}), or null when skipped.
  nlohmann::json micro = nullptr;
  std::vector<std::string>
      notes;  ///< anything the reader should know (gnuplot missing, RSS not resettable, ...)
};

}  // namespace xax_bench
