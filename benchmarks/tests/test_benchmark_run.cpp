// What must be true of the report a real, short mixed_precision_benchmark run wrote (the ctest fixtures
// benchmark.e2e*.run in benchmarks/CMakeLists.txt run the binary first). Each suite reads the report.json in
// $XAX_BENCH_REPORT_DIR and checks its values: that training trained, that the policies are the ones asked
// for and differ only where precision makes them differ, that the loss-scale and memory bookkeeping add up,
// and that the plots' CSV input agrees with the record.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::filesystem::path report_dir() {
  const char* dir = std::getenv("XAX_BENCH_REPORT_DIR");
  return dir == nullptr ? std::filesystem::path() : std::filesystem::path(dir);
}

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The comma-separated fields of `text` (no quoting: the runs' labels and numbers have no commas).
std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> fields;
  std::stringstream stream(text);
  for (std::string field; std::getline(stream, field, ',');) fields.push_back(field);
  return fields;
}

// The --policies the fixtures in benchmarks/CMakeLists.txt pass to the binary.
std::vector<std::string> requested_policies() {
  return split("default,mixed,float16");
}

class BenchmarkRun : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(report_dir().empty()) << "set XAX_BENCH_REPORT_DIR to the directory the benchmark wrote";
    report_ = read_report(report_subdirectory());
  }

  // Where this suite's report.json is, under $XAX_BENCH_REPORT_DIR.
  [[nodiscard]] virtual std::filesystem::path report_subdirectory() const { return {}; }

  static nlohmann::json read_report(const std::filesystem::path& subdirectory) {
    const std::filesystem::path path = report_dir() / subdirectory / "report.json";
    const std::string text = read(path);
    EXPECT_FALSE(text.empty()) << path << " is missing or empty";
    return text.empty() ? nlohmann::json::object() : nlohmann::json::parse(text);
  }

  // The runs of one workload and configuration, by policy.
  [[nodiscard]] std::map<std::string, nlohmann::json> runs(const std::string& workload,
                                                           const std::string& configuration) const {
    std::map<std::string, nlohmann::json> found;
    for (const nlohmann::json& run : report_.at("training")) {
      if (run.at("workload") == workload && run.at("configuration") == configuration) {
        EXPECT_FALSE(found.contains(run.at("policy"))) << "two runs of " << run.at("policy");
        found[run.at("policy")] = run;
      }
    }
    return found;
  }

  nlohmann::json report_;
};

// Every point's loss, in order; a null (a step whose loss was not finite) as NaN.
std::vector<double> losses(const nlohmann::json& curve) {
  std::vector<double> out;
  for (const nlohmann::json& point : curve) {
    out.push_back(point.at("loss").is_null() ? NAN : point.at("loss").get<double>());
  }
  return out;
}

// Parameters of an MLP with these layer sizes: a weight matrix and a bias per layer.
std::int64_t mlp_parameter_count(const std::vector<std::int64_t>& sizes) {
  std::int64_t count = 0;
  for (std::size_t i = 0; i + 1 < sizes.size(); ++i) count += sizes[i] * sizes[i + 1] + sizes[i + 1];
  return count;
}

// What every run must satisfy, whatever the workload.
void expect_sound_run(const nlohmann::json& run) {
  SCOPED_TRACE(run.at("workload").get<std::string>() + " " + run.at("configuration").get<std::string>() +
               " " + run.at("policy").get<std::string>());
  EXPECT_TRUE(run.at("error").is_null()) << run.at("error");
  EXPECT_GT(run.at("steps").get<std::int64_t>(), 0);
  // Times: positive, and the percentiles around the median.
  const double p10 = run.at("step_time_p10_ms");
  const double median = run.at("step_time_ms");
  const double p90 = run.at("step_time_p90_ms");
  EXPECT_GT(p10, 0.0);
  EXPECT_LE(p10, median);
  EXPECT_LE(median, p90);
  EXPECT_GT(run.at("train_seconds").get<double>(), 0.0);
  // Skipped steps: a count, never more than the steps taken. Without loss scaling nothing is skipped (a
  // non-finite step would have stopped the run with an error) and the scale stays exactly 1.
  ASSERT_TRUE(run.at("skipped_steps").is_number_integer());
  const std::int64_t skipped = run.at("skipped_steps");
  EXPECT_GE(skipped, 0);
  EXPECT_LT(skipped, run.at("steps").get<std::int64_t>()) << "every step was skipped: nothing trained";
  const float scale = run.at("final_loss_scale");
  if (run.at("loss_scaling") == "none") {
    EXPECT_EQ(skipped, 0);
    EXPECT_EQ(scale, 1.0f);
  } else {
    // Dynamic scaling doubles and halves from a power of two, so it stays one.
    int exponent = 0;
    EXPECT_EQ(std::frexp(scale, &exponent), 0.5f) << "final loss scale " << scale << " is not a power of two";
  }
  // The loss curve: one point per step on these short runs, so nulls (non-finite steps) are skipped steps.
  const std::vector<double> curve = losses(run.at("loss_curve"));
  ASSERT_EQ(static_cast<std::int64_t>(curve.size()), run.at("steps").get<std::int64_t>());
  std::int64_t non_finite = 0;
  for (const double loss : curve) non_finite += std::isfinite(loss) ? 0 : 1;
  EXPECT_LE(non_finite, skipped);
  ASSERT_TRUE(run.at("final_train_loss").is_number()) << "the final loss is not finite";
  EXPECT_TRUE(std::isfinite(run.at("final_train_loss").get<double>()));
  const double accuracy = run.at("test_accuracy");
  EXPECT_GE(accuracy, 0.0);
  EXPECT_LE(accuracy, 1.0);
}

// The first and the last finite loss of a curve.
std::pair<double, double> first_and_last(const std::vector<double>& curve) {
  double first = NAN;
  double last = NAN;
  for (const double loss : curve) {
    if (!std::isfinite(loss)) continue;
    if (std::isnan(first)) first = loss;
    last = loss;
  }
  return {first, last};
}

using MlpRun = BenchmarkRun;

TEST_F(MlpRun, EveryRequestedPolicyTrainedOnEachConfiguration) {
  const std::vector<std::string> policies = requested_policies();
  for (const char* configuration : {"standard", "activation-heavy"}) {
    const auto found = runs("mlp", configuration);
    std::set<std::string> names;
    for (const auto& [policy, run] : found) names.insert(policy);
    EXPECT_EQ(names, std::set<std::string>(policies.begin(), policies.end())) << configuration;
  }
  EXPECT_EQ(report_.at("training").size(), 2 * policies.size()) << "runs that nobody asked for";
  EXPECT_EQ(report_.at("dataset").at("name"), "synthetic");
  EXPECT_TRUE(report_.at("micro_benchmarks").is_null()) << "--skip-micro was given";
}

// Multi-threaded times depend on how OpenMP's threads wait (README, Threads on a shared machine).
TEST_F(MlpRun, TheReportSaysHowOpenMpThreadsWaited) {
  // ctest starts the run and this test with the same environment.
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const std::string expected =
      "OpenMP threads wait at joins by " +
      (policy != nullptr ? "OMP_WAIT_POLICY=" + std::string(policy)
                         : std::string("the runtime's default (OMP_WAIT_POLICY unset)"));
  bool found = false;
  for (const nlohmann::json& note : report_.at("notes"))
    found = found || note.get<std::string>().starts_with(expected);
  EXPECT_TRUE(found) << "no note \"" << expected << "\" in " << report_.at("notes").dump(2);
}

TEST_F(MlpRun, EveryRunIsSound) {
  for (const nlohmann::json& run : report_.at("training")) expect_sound_run(run);
}

// The standard runs train: a full epoch of steps, the loss falls from the untrained model's (ln 10 for ten
// classes) and the accuracy is well above chance.
TEST_F(MlpRun, StandardRunsLearn) {
  for (const auto& [policy, run] : runs("mlp", "standard")) {
    SCOPED_TRACE(policy);
    const std::vector<std::int64_t> sizes = run.at("layer_sizes");
    const std::int64_t classes = sizes.back();
    const std::int64_t batch = run.at("batch_size");
    // drop_last: the ragged tail is not a step.
    EXPECT_EQ(run.at("steps"),
              run.at("epochs").get<std::int64_t>() * (run.at("train_samples").get<std::int64_t>() / batch));
    const auto [first, last] = first_and_last(losses(run.at("loss_curve")));
    EXPECT_NEAR(first, std::log(static_cast<double>(classes)), 0.5) << "an untrained model's loss";
    EXPECT_LT(last, first - 0.1) << "the loss did not fall";
    EXPECT_LT(run.at("final_train_loss").get<double>(), first);
    EXPECT_GT(run.at("test_accuracy").get<double>(), 3.0 / static_cast<double>(classes))
        << "chance is 1/" << classes;
    ASSERT_EQ(run.at("epoch_records").size(), run.at("epochs").get<std::size_t>());
    EXPECT_EQ(run.at("epoch_records").back().at("test_accuracy"), run.at("test_accuracy"));
  }
}

// Same seed, same data order, same initial weights: the 16-bit policies' training follows fp32's closely; a
// cast in the wrong place or a scale left in the gradients moves it far more than 16-bit rounding does.
TEST_F(MlpRun, ReducedPrecisionFollowsFp32) {
  const auto standard = runs("mlp", "standard");
  ASSERT_TRUE(standard.contains("default"));
  const nlohmann::json& fp32 = standard.at("default");
  for (const auto& [policy, run] : standard) {
    if (policy == "default") continue;
    SCOPED_TRACE(policy);
    const double fp32_loss = fp32.at("final_train_loss");
    EXPECT_NEAR(run.at("final_train_loss").get<double>(), fp32_loss, 0.02);
    EXPECT_NEAR(run.at("test_accuracy").get<double>(), fp32.at("test_accuracy").get<double>(), 0.05);
    const auto [first, last] = first_and_last(losses(run.at("loss_curve")));
    const auto [fp32_first, fp32_last] = first_and_last(losses(fp32.at("loss_curve")));
    EXPECT_NEAR(first, fp32_first, 0.01) << "the first step's loss: same weights, same batch";
    EXPECT_NEAR(last, fp32_last, 0.02);
  }
  // The accuracy verdicts the binary printed compare against the same fp32 run.
  for (const nlohmann::json& check : report_.at("validation").at("accuracy")) {
    EXPECT_EQ(check.at("reference_accuracy"), fp32.at("test_accuracy"));
    EXPECT_EQ(check.at("accuracy"), standard.at(check.at("policy").get<std::string>()).at("test_accuracy"));
  }
}

// The policy each run reports is the preset it was asked for, and float16 compute gets dynamic scaling
// (loss_scaling auto), bfloat16 and float32 none.
TEST_F(MlpRun, PoliciesAndLossScalingAreTheRequestedOnes) {
  for (const nlohmann::json& run : report_.at("training")) {
    const std::string policy = run.at("policy");
    const std::string spec = run.at("policy_spec");
    SCOPED_TRACE(policy + ": " + spec);
    if (policy == "default") {
      EXPECT_EQ(spec, "params=float32,compute=float32,output=float32");
      EXPECT_EQ(run.at("loss_scaling"), "none");
      EXPECT_EQ(run.at("final_loss_scale"), 1.0);
    } else if (policy == "float16") {
      EXPECT_EQ(spec, "params=float16,compute=float16,output=float16");
      EXPECT_EQ(run.at("loss_scaling"), "dynamic");
    } else if (policy == "mixed") {
      EXPECT_EQ(spec.rfind("params=float32,compute=", 0), 0u);
      EXPECT_NE(spec.find("compute=" + report_.at("machine").at("half_dtype").get<std::string>()),
                std::string::npos);
      EXPECT_EQ(run.at("loss_scaling"),
                spec.find("compute=float16") != std::string::npos ? "dynamic" : "none");
    }
  }
}

// Tensor bytes are exact: fp32 masters hold 4 bytes a parameter, float16 masters 2, and the activations a
// 16-bit compute policy keeps are exactly half of fp32's at the same shapes.
TEST_F(MlpRun, TensorBytesMatchTheModelAndThePrecision) {
  for (const char* configuration : {"standard", "activation-heavy"}) {
    const auto found = runs("mlp", configuration);
    ASSERT_TRUE(found.contains("default"));
    const std::size_t fp32_activations = found.at("default").at("tensor_bytes").at("activations");
    EXPECT_GT(fp32_activations, 0u);
    for (const auto& [policy, run] : found) {
      SCOPED_TRACE(std::string(configuration) + " " + policy);
      const std::string spec = run.at("policy_spec");
      const std::int64_t parameters = mlp_parameter_count(run.at("layer_sizes"));
      const std::int64_t master_bytes = spec.starts_with("params=float32") ? 4 : 2;
      EXPECT_EQ(run.at("tensor_bytes").at("params"), master_bytes * parameters);
      const bool fp32_compute = spec.find("compute=float32") != std::string::npos;
      EXPECT_EQ(run.at("tensor_bytes").at("activations"),
                fp32_compute ? fp32_activations : fp32_activations / 2);
      const nlohmann::json& bytes = run.at("tensor_bytes");
      EXPECT_EQ(bytes.at("total"), bytes.at("params").get<std::size_t>() +
                                       bytes.at("train_state").get<std::size_t>() +
                                       bytes.at("activations").get<std::size_t>());
      EXPECT_EQ(run.at("peak_rss_growth_bytes"), run.at("peak_rss_bytes").get<std::size_t>() -
                                                     std::min(run.at("peak_rss_bytes").get<std::size_t>(),
                                                              run.at("rss_before_bytes").get<std::size_t>()));
    }
  }
}

// The plots' input agrees with the record: gnuplot draws training.csv's step times and epochs.csv's
// accuracies, so each must be the report's value for the same run.
TEST_F(MlpRun, CsvFilesAgreeWithTheReport) {
  std::map<std::string, nlohmann::json> by_label;
  for (const nlohmann::json& run : report_.at("training")) {
    const std::string policy = run.at("policy");
    by_label[run.at("configuration") == "standard"
                 ? policy
                 : policy + " (" + run.at("configuration").get<std::string>() + ")"] = run;
  }
  std::ifstream training(report_dir() / "training.csv");
  std::string line;
  ASSERT_TRUE(std::getline(training, line)) << "training.csv is missing";
  const std::vector<std::string> header = split(line);
  std::size_t rows = 0;
  while (std::getline(training, line)) {
    const std::vector<std::string> row = split(line);
    ASSERT_EQ(row.size(), header.size());
    ASSERT_TRUE(by_label.contains(row[0])) << row[0];
    const nlohmann::json& run = by_label.at(row[0]);
    for (std::size_t i = 0; i < header.size(); ++i) {
      if (header[i] == "step_time_ms") {
        EXPECT_NEAR(std::stod(row[i]), run.at("step_time_ms").get<double>(), 1e-6);
      } else if (header[i] == "activations_bytes") {
        EXPECT_EQ(std::stoull(row[i]), run.at("tensor_bytes").at("activations").get<std::uint64_t>());
      }
    }
    ++rows;
  }
  EXPECT_EQ(rows, by_label.size());
  std::ifstream epochs(report_dir() / "epochs.csv");
  ASSERT_TRUE(std::getline(epochs, line)) << "epochs.csv is missing";
  ASSERT_EQ(line, "run,epoch,test_accuracy");
  while (std::getline(epochs, line)) {
    const std::vector<std::string> row = split(line);
    ASSERT_EQ(row.size(), 3u);
    const nlohmann::json& record = by_label.at(row[0]).at("epoch_records").at(std::stoul(row[1]) - 1);
    EXPECT_NEAR(std::stod(row[2]), record.at("test_accuracy").get<double>(), 1e-9);
  }
}

// A single-process run is world 1 and not data-parallel; each run's params_crc32 is 8 hex digits (null only
// where xax has no zlib), and different policies end with different params.
TEST_F(MlpRun, SingleProcessRunRecordsWorldSizeOneAndTheParamsCrc) {
  EXPECT_EQ(report_.at("world_size"), 1);
  std::set<std::string> crcs;
  for (const nlohmann::json& run : report_.at("training")) {
    EXPECT_FALSE(run.contains("data_parallel")) << run.at("policy");
    const nlohmann::json& crc = run.at("params_crc32");
    if (crc.is_null()) continue;  // a build without zlib
    ASSERT_TRUE(crc.is_string());
    EXPECT_TRUE(std::regex_match(crc.get<std::string>(), std::regex("^[0-9a-f]{8}$"))) << crc;
    if (run.at("configuration") == "standard") crcs.insert(crc.get<std::string>());
  }
  if (!crcs.empty()) {
    EXPECT_EQ(crcs.size(), requested_policies().size()) << "two policies ended alike";
  }
}

// The same MLP comparison under mpiexec -n 2 (benchmark.e2e_data_parallel.run): rank 0's report, beside a
// single-process run of the same global batch in the same 2 micro-batches per step
// (np1/ and np2/ under $XAX_BENCH_REPORT_DIR). Deterministic fp32 reduction makes the final params
// bit-identical.
class DataParallelRun : public BenchmarkRun {
 protected:
  void SetUp() override {
    BenchmarkRun::SetUp();
    reference_ = read_report("np1");
  }
  [[nodiscard]] std::filesystem::path report_subdirectory() const override { return "np2"; }
  nlohmann::json reference_;
};

TEST_F(DataParallelRun, OnlyTheMlpComparisonRanAndTheReportSaysWhy) {
  EXPECT_EQ(report_.at("world_size"), 2);
  EXPECT_EQ(reference_.at("world_size"), 1);
  const auto standard = runs("mlp", "standard");
  const std::vector<std::string> policies = requested_policies();
  EXPECT_EQ(standard.size(), policies.size());
  EXPECT_EQ(report_.at("training").size(), policies.size()) << "the memory probe runs single-process only";
  EXPECT_TRUE(report_.at("micro_benchmarks").is_null());
  EXPECT_TRUE(report_.at("peer").at("comparisons").empty());
  std::string notes;
  for (const nlohmann::json& note : report_.at("notes")) notes += note.get<std::string>() + "\n";
  for (const char* skipped :
       {"memory probe was skipped", "micro-benchmarks were skipped", "PyTorch reference was skipped"}) {
    EXPECT_NE(notes.find(skipped), std::string::npos) << "no note that the " << skipped << ":\n" << notes;
  }
}

TEST_F(DataParallelRun, ParamsAreBitIdenticalToTheSingleProcessRun) {
  std::map<std::string, nlohmann::json> reference;
  for (const nlohmann::json& run : reference_.at("training")) {
    if (run.at("configuration") == "standard") reference[run.at("policy")] = run;
  }
  for (const auto& [policy, run] : runs("mlp", "standard")) {
    ASSERT_TRUE(reference.contains(policy)) << policy;
    ASSERT_TRUE(run.at("params_crc32").is_string()) << policy;
    EXPECT_EQ(run.at("params_crc32"), reference.at(policy).at("params_crc32")) << policy;
    EXPECT_EQ(run.at("steps"), reference.at(policy).at("steps")) << policy;
    EXPECT_EQ(run.at("batch_size"), reference.at(policy).at("batch_size")) << policy << ": the global batch";
    EXPECT_DOUBLE_EQ(run.at("test_accuracy").get<double>(),
                     reference.at(policy).at("test_accuracy").get<double>())
        << policy;
  }
}

TEST_F(DataParallelRun, CommunicationIsRecordedPerRun) {
  for (const auto& [policy, run] : runs("mlp", "standard")) {
    ASSERT_TRUE(run.contains("data_parallel")) << policy;
    const nlohmann::json& dp = run.at("data_parallel");
    EXPECT_EQ(dp.at("world_size"), 2);
    EXPECT_EQ(dp.at("accumulation_steps"), 2) << "default under mpirun: one micro-batch per rank";
    EXPECT_EQ(dp.at("micro_batch_size").get<std::int64_t>() * 2, run.at("batch_size").get<std::int64_t>());
    EXPECT_EQ(dp.at("wire_dtype"), "float32");
    EXPECT_EQ(dp.at("deterministic"), true);
    // Reduce-scatter of one micro-batch's fp32 gradients plus the all-gather of the sums: at 2 ranks, each
    // rank sends every gradient element once in fp32: 4 bytes per parameter of the MLP.
    const std::vector<std::int64_t> sizes = run.at("layer_sizes");
    std::int64_t parameters = 0;
    for (std::size_t i = 1; i < sizes.size(); ++i) parameters += sizes[i - 1] * sizes[i] + sizes[i];
    EXPECT_EQ(dp.at("wire_bytes_per_step").get<std::int64_t>(), 4 * parameters) << policy;
    const double seconds = dp.at("communication_seconds");
    const double share = dp.at("communication_share_of_step");
    EXPECT_GT(seconds, 0) << policy;
    EXPECT_LT(seconds, run.at("train_seconds").get<double>()) << policy;
    EXPECT_GT(share, 0) << policy;
    EXPECT_LT(share, 1) << policy;
  }
}

// 4 ranks with --zero-stage 1 --bucket-size 65536 (benchmark.e2e_data_parallel.run_np4), beside one process
// running the same 4 micro-batches per step (np1_acc4/): ZeRO-1 and buckets change no bit of the params, and
// the report records both settings.
class DataParallelFourRanks : public BenchmarkRun {
 protected:
  void SetUp() override {
    BenchmarkRun::SetUp();
    reference_ = read_report("np1_acc4");
  }
  [[nodiscard]] std::filesystem::path report_subdirectory() const override { return "np4"; }
  nlohmann::json reference_;
};

TEST_F(DataParallelFourRanks, ZeroOneWithBucketsIsBitIdenticalToOneProcessAndRecorded) {
  EXPECT_EQ(report_.at("world_size"), 4);
  std::map<std::string, nlohmann::json> reference;
  for (const nlohmann::json& run : reference_.at("training")) {
    if (run.at("configuration") == "standard") reference[run.at("policy")] = run;
  }
  const auto found = runs("mlp", "standard");
  ASSERT_EQ(found.size(), 1u);
  for (const auto& [policy, run] : found) {
    ASSERT_TRUE(reference.contains(policy)) << policy;
    ASSERT_TRUE(run.at("params_crc32").is_string()) << policy;
    EXPECT_EQ(run.at("params_crc32"), reference.at(policy).at("params_crc32")) << policy;
    EXPECT_EQ(run.at("steps"), reference.at(policy).at("steps")) << policy;
    const nlohmann::json& dp = run.at("data_parallel");
    EXPECT_EQ(dp.at("world_size"), 4);
    EXPECT_EQ(dp.at("accumulation_steps"), 4);
    EXPECT_EQ(dp.at("zero_stage"), 1);
    EXPECT_EQ(dp.at("bucket_size"), 65536);
    const std::vector<std::int64_t> sizes = run.at("layer_sizes");
    std::int64_t parameters = 0;
    for (std::size_t i = 1; i < sizes.size(); ++i) parameters += sizes[i - 1] * sizes[i] + sizes[i];
    EXPECT_EQ(dp.at("buckets_per_step"), (parameters + 65535) / 65536);
    // ZeRO-1: rank 0 holds about a quarter of AdamW's two fp32 moments (8 bytes per parameter).
    const auto optimizer = dp.at("optimizer_state_bytes").get<std::int64_t>();
    EXPECT_GT(optimizer, 0);
    EXPECT_LT(optimizer, 8 * parameters / 4 + 8 * 4096);
    EXPECT_GT(dp.at("master_gather_bytes_per_step").get<std::int64_t>(), 0);
    EXPECT_GT(dp.at("reducer_buffer_bytes").get<std::int64_t>(), 0);
    // The mixed policy's fp32 masters are sharded too (4 of its 4 N bytes / 4 per rank, up to a block of
    // 1024 elements), and the all-gather carries rank 0's shard of the bf16 compute copy to 3 ranks: 2 bytes
    // per element of the shard.
    const auto masters = dp.at("master_bytes").get<std::int64_t>();
    EXPECT_GT(masters, 0);
    EXPECT_LE(masters, 4 * (parameters / 4 + 1024));
    EXPECT_EQ(dp.at("master_gather_bytes_per_step").get<std::int64_t>(), masters / 4 * 2 * 3);
  }
}

using CharRun = BenchmarkRun;

TEST_F(CharRun, EveryRequestedPolicyTrainedTheGpt) {
  const std::vector<std::string> policies = requested_policies();
  const auto found = runs("char-transformer", "char-transformer");
  std::set<std::string> names;
  for (const auto& [policy, run] : found) names.insert(policy);
  EXPECT_EQ(names, std::set<std::string>(policies.begin(), policies.end()));
  EXPECT_EQ(report_.at("training").size(), policies.size()) << "--workload char-transformer trains no MLP";
  for (const nlohmann::json& run : report_.at("training")) expect_sound_run(run);
}

// A freshly initialised GPT predicts nearly uniformly: its loss starts near ln(vocabulary) nats, and a few
// steps later its validation loss is finite and not far from there. The 16-bit policies track fp32's on
// the same seed.
TEST_F(CharRun, LossesStartAtUniformAndPoliciesAgree) {
  const auto found = runs("char-transformer", "char-transformer");
  ASSERT_TRUE(found.contains("default"));
  const nlohmann::json& fp32 = found.at("default");
  for (const auto& [policy, run] : found) {
    SCOPED_TRACE(policy);
    const std::int64_t vocabulary = run.at("layer_sizes").at(0);
    const double uniform = std::log(static_cast<double>(vocabulary));
    const auto [first, last] = first_and_last(losses(run.at("loss_curve")));
    EXPECT_NEAR(first, uniform, 0.3);
    ASSERT_TRUE(run.at("val_loss").is_number());
    const double val_loss = run.at("val_loss");
    EXPECT_GT(val_loss, 0.0);
    EXPECT_LT(val_loss, uniform + 0.3);
    EXPECT_NEAR(val_loss, fp32.at("val_loss").get<double>(), 0.02);
    EXPECT_EQ(run.at("val_curve").back().at("loss"), run.at("val_loss"));
    // The loss scale after each step: 1 throughout without scaling; the final one is the last point.
    const nlohmann::json& scales = run.at("loss_scale_curve");
    ASSERT_FALSE(scales.empty());
    EXPECT_EQ(scales.back().at("loss_scale").get<double>(), run.at("final_loss_scale").get<double>());
    if (run.at("loss_scaling") == "none") {
      for (const nlohmann::json& point : scales) EXPECT_EQ(point.at("loss_scale"), 1.0);
    }
    // The final validation loss is over --gpt-final-eval-batches 3 batches of windows.
    EXPECT_EQ(run.at("test_samples").get<std::int64_t>(),
              3 * run.at("batch_size").get<std::int64_t>() * run.at("layer_sizes").at(1).get<std::int64_t>());
    EXPECT_NEAR(run.at("tokens_per_s").get<double>(),
                run.at("throughput_samples_per_s").get<double>() * run.at("layer_sizes").at(1).get<double>(),
                1e-6);
  }
}

// Google Benchmark's results, kept as it wrote them: the filter selected exactly what it names, every run
// took positive time, and counters of work done are positive.
void expect_positive_times(const nlohmann::json& benchmark) {
  SCOPED_TRACE(benchmark.at("name").get<std::string>());
  if (benchmark.value("run_type", "iteration") != "iteration") return;
  EXPECT_GT(benchmark.at("real_time").get<double>(), 0.0);
  EXPECT_GT(benchmark.at("cpu_time").get<double>(), 0.0);
  EXPECT_GT(benchmark.at("iterations").get<std::int64_t>(), 0);
}

using MicroRun = BenchmarkRun;

TEST_F(MicroRun, TheFilteredBenchmarkRanWithPositiveTimes) {
  EXPECT_TRUE(report_.at("training").empty()) << "--skip-training was given";
  const nlohmann::json& micro = report_.at("micro_benchmarks");
  ASSERT_TRUE(micro.is_object());
  EXPECT_GT(micro.at("context").at("num_cpus").get<int>(), 0);
  const nlohmann::json& benchmarks = micro.at("benchmarks");
  ASSERT_EQ(benchmarks.size(), 1u);
  EXPECT_EQ(benchmarks[0].at("name").get<std::string>().rfind("Matmul/bfloat16/256/threads:1", 0), 0u);
  expect_positive_times(benchmarks[0]);
}

using RepetitionsRun = BenchmarkRun;

// Two repetitions of each TrainStep benchmark: two iteration runs each and aggregates that lie between them.
// The coefficient of variation of the skipped-steps counter is a bare NaN in Google Benchmark's output; the
// report must have read it (as null) rather than lost the whole micro part.
TEST_F(RepetitionsRun, AggregatesLieBetweenTheRepetitions) {
  const nlohmann::json& micro = report_.at("micro_benchmarks");
  ASSERT_TRUE(micro.is_object()) << "the micro part was lost";
  std::map<std::string, std::vector<double>> times;
  std::map<std::string, std::map<std::string, double>> aggregates;
  for (const nlohmann::json& benchmark : micro.at("benchmarks")) {
    const std::string run_name = benchmark.at("run_name");
    EXPECT_TRUE(std::regex_match(run_name, std::regex("TrainStep/.*"))) << run_name;
    expect_positive_times(benchmark);
    if (benchmark.at("run_type") == "iteration") {
      times[run_name].push_back(benchmark.at("real_time"));
    } else {
      aggregates[run_name][benchmark.at("aggregate_name")] = benchmark.at("real_time");
    }
  }
  ASSERT_FALSE(times.empty());
  for (const auto& [run_name, repetitions] : times) {
    SCOPED_TRACE(run_name);
    ASSERT_EQ(repetitions.size(), 2u);
    const double low = std::min(repetitions[0], repetitions[1]);
    const double high = std::max(repetitions[0], repetitions[1]);
    ASSERT_TRUE(aggregates[run_name].contains("mean"));
    EXPECT_NEAR(aggregates[run_name].at("mean"), (low + high) / 2, 1e-6 * high);
    EXPECT_GE(aggregates[run_name].at("median"), low - 1e-9 * high);
    EXPECT_LE(aggregates[run_name].at("median"), high + 1e-9 * high);
  }
}

}  // namespace
