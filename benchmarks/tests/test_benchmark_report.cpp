// The report writers on a report built in memory: report.json holds the values (non-finite ones as null), the
// CSV columns the gnuplot scripts address hold what they claim, and every script reads only files that exist.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "report/benchmark_json.hpp"
#include "report/csv.hpp"
#include "report/gnuplot.hpp"
#include "report/json_report.hpp"
#include "report/results.hpp"

namespace {

using ::testing::HasSubstr;

xax_bench::TrainingRun make_run(const std::string& policy, const std::string& configuration, double accuracy,
                                double step_ms) {
  xax_bench::TrainingRun run;
  run.configuration = configuration;
  run.policy = policy;
  run.policy_spec = "params=float32,compute=bfloat16,output=float32";
  run.loss_scaling = "none";
  run.layer_sizes = {784, 512, 512, 10};
  run.batch_size = 256;
  run.epochs = 2;
  run.steps = 4;
  run.test_accuracy = accuracy;
  run.final_train_loss = 0.42;
  run.step_time_ms = step_ms;
  run.step_time_p10_ms = 0.9 * step_ms;
  run.step_time_p90_ms = 1.2 * step_ms;
  run.peak_rss_bytes = 300u << 20;
  run.rss_before_bytes = 250u << 20;
  run.tensor_bytes = {1000, 2000, 3000};
  run.loss_curve = {{2, 1.5}, {4, 0.9}};
  run.epoch_records = {{1, 1.2, 0.8, 1.0, 1.0f, 0}, {2, 0.9, accuracy, 1.0, 1.0f, 0}};
  return run;
}

xax_bench::BenchmarkReport make_report() {
  xax_bench::BenchmarkReport report;
  report.dataset = "synthetic";
  report.training = {make_run("default", "standard", 0.9, 3.5), make_run("mixed", "standard", 0.899, 2.25),
                     make_run("mixed", "activation-heavy", 0, 40.0)};
  xax_bench::TrainingRun gpt = make_run("mixed", "char-transformer", 0.3, 12.0);
  gpt.workload = "char-transformer";
  gpt.val_loss = 2.5;
  gpt.val_curve = {{4, 2.5}};
  gpt.loss_scale_curve = {{1, 1.0}, {4, 1.0}};
  report.training.push_back(gpt);
  report.accuracy_checks = {{"mixed", 0.899, 0.9, -0.1, 0.3, true}};
  report.memory_checks = {{"mixed", 1.2, 1.6, 1.5, false}};
  return report;
}

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The cells of a CSV line without quotes or commas inside cells (what the runs' labels and numbers are).
std::vector<std::string> cells(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream stream(line);
  for (std::string cell; std::getline(stream, cell, ',');) out.push_back(cell);
  return out;
}

TEST(ReportJson, HoldsTheRunsValues) {
  const nlohmann::json json = xax_bench::to_json(make_report());
  EXPECT_EQ(json.at("schema_version"), xax_bench::report_schema_version);
  ASSERT_EQ(json.at("training").size(), 4u);
  const nlohmann::json& mixed = json.at("training").at(1);
  EXPECT_EQ(mixed.at("policy"), "mixed");
  EXPECT_EQ(mixed.at("workload"), "mlp");
  EXPECT_EQ(mixed.at("test_accuracy"), 0.899);
  EXPECT_EQ(mixed.at("step_time_ms"), 2.25);
  EXPECT_EQ(mixed.at("peak_rss_growth_bytes"), 50u << 20);
  EXPECT_EQ(mixed.at("tensor_bytes").at("total"), 6000);
  EXPECT_EQ(mixed.at("loss_curve").at(1).at("loss"), 0.9);
  EXPECT_FALSE(mixed.contains("val_loss")) << "the GPT's fields belong to GPT runs only";
  EXPECT_EQ(json.at("training").at(3).at("val_loss"), 2.5);
  EXPECT_EQ(json.at("validation").at("memory").at(0).at("tensor_ratio"), 1.6);
  EXPECT_EQ(json.at("validation").at("accuracy").at(0).at("pass"), true);
  EXPECT_TRUE(json.at("micro_benchmarks").is_null());
}

// JSON has no NaN; nlohmann would write null anyway, but a reader must be able to tell "not finite" from 0.
// world_size at the top; params_crc32 as 8 lower-case hex digits (null when absent); data_parallel only for a
// data-parallel run, with its communication figures.
TEST(ReportJson, HoldsWorldSizeParamsCrcAndDataParallelFigures) {
  xax_bench::BenchmarkReport report = make_report();
  report.world_size = 2;
  ASSERT_GE(report.training.size(), 1u);
  report.training[0].params_crc32 = 0x0a1b2c3dU;
  xax_bench::DataParallelRecord record;
  record.world_size = 2;
  record.accumulation_steps = 4;
  record.micro_batch_size = 64;
  record.wire_dtype = "bfloat16";
  record.deterministic = false;
  record.communication_seconds = 1.5;
  record.communication_share = 0.25;
  record.wire_bytes_per_step = 123456;
  record.zero_stage = 1;
  record.bucket_size = 65536;
  record.buckets_per_step = 5;
  record.reducer_buffer_bytes = 777;
  record.master_gather_bytes_per_step = 888;
  record.optimizer_state_bytes = 999;
  record.master_bytes = 777;
  report.training[0].data_parallel = record;
  const nlohmann::json json = xax_bench::to_json(report);
  EXPECT_EQ(json.at("world_size"), 2);
  const nlohmann::json& run = json.at("training").at(0);
  EXPECT_EQ(run.at("params_crc32"), "0a1b2c3d");
  const nlohmann::json& dp = run.at("data_parallel");
  EXPECT_EQ(dp.at("world_size"), 2);
  EXPECT_EQ(dp.at("accumulation_steps"), 4);
  EXPECT_EQ(dp.at("micro_batch_size"), 64);
  EXPECT_EQ(dp.at("wire_dtype"), "bfloat16");
  EXPECT_EQ(dp.at("deterministic"), false);
  EXPECT_DOUBLE_EQ(dp.at("communication_seconds").get<double>(), 1.5);
  EXPECT_DOUBLE_EQ(dp.at("communication_share_of_step").get<double>(), 0.25);
  EXPECT_EQ(dp.at("wire_bytes_per_step"), 123456);
  EXPECT_EQ(dp.at("zero_stage"), 1);
  EXPECT_EQ(dp.at("bucket_size"), 65536);
  EXPECT_EQ(dp.at("buckets_per_step"), 5);
  EXPECT_EQ(dp.at("reducer_buffer_bytes"), 777);
  EXPECT_EQ(dp.at("master_gather_bytes_per_step"), 888);
  EXPECT_EQ(dp.at("optimizer_state_bytes"), 999);
  EXPECT_EQ(dp.at("master_bytes"), 777);
  if (report.training.size() > 1) {
    EXPECT_TRUE(json.at("training").at(1).at("params_crc32").is_null());
    EXPECT_FALSE(json.at("training").at(1).contains("data_parallel"));
  }
  EXPECT_EQ(xax_bench::to_json(make_report()).at("world_size"), 1);
}

TEST(ReportJson, NonFiniteLossesBecomeNull) {
  xax_bench::BenchmarkReport report = make_report();
  report.training[0].final_train_loss = std::numeric_limits<double>::quiet_NaN();
  report.training[0].loss_curve[0].loss = std::numeric_limits<double>::infinity();
  report.training[3].val_loss = std::numeric_limits<double>::quiet_NaN();
  const nlohmann::json json = xax_bench::to_json(report);
  EXPECT_TRUE(json.at("training").at(0).at("final_train_loss").is_null());
  EXPECT_TRUE(json.at("training").at(0).at("loss_curve").at(0).at("loss").is_null());
  EXPECT_EQ(json.at("training").at(0).at("loss_curve").at(1).at("loss"), 0.9);
  EXPECT_TRUE(json.at("training").at(3).at("val_loss").is_null());
}

class ReportFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::temp_directory_path() /
        ("xax_test_report_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
         "_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(ReportFiles, JsonFileParsesBackToTheSameValues) {
  const xax_bench::BenchmarkReport report = make_report();
  const auto path = xax_bench::write_json_report(report, dir_);
  EXPECT_EQ(nlohmann::json::parse(read(path)), xax_bench::to_json(report));
}

// --policies takes key=dtype specs such as "params=float32,compute=bfloat16,output=float32"; gnuplot's
// strcol() ends a CSV field at a comma even inside quotes, so a label with commas would match no row and its
// plot line would stay empty. Labels show such a spec with spaces.
TEST(RunLabels, AKeyDtypeSpecIsLabelledWithoutCommas) {
  const std::string spec = "params=float32,compute=bfloat16,output=float32";
  EXPECT_EQ(make_run(spec, "standard", 0.9, 3.5).label(), "params=float32 compute=bfloat16 output=float32");
  EXPECT_EQ(make_run(spec, "activation-heavy", 0, 40.0).label(),
            "params=float32 compute=bfloat16 output=float32 (activation-heavy)");
  EXPECT_EQ(make_run(spec, "char-transformer", 0.3, 12.0).policy_label(),
            "params=float32 compute=bfloat16 output=float32");
  EXPECT_EQ(make_run("mixed", "standard", 0.9, 3.5).label(), "mixed");
}

// gnuplot reads training.csv by column number; the number training_column() gives for a name must be the
// column that holds that quantity, row by row, or the step-time and memory plots show the wrong bars.
TEST_F(ReportFiles, TrainingCsvColumnsHoldWhatThePlotsReadFromThem) {
  const xax_bench::BenchmarkReport report = make_report();
  xax_bench::write_csv_files(report, dir_);
  std::ifstream in(dir_ / "training.csv");
  std::string line;
  ASSERT_TRUE(std::getline(in, line));
  const auto column = [](const char* name) {
    return std::stoul(xax_bench::training_column(name).substr(1)) - 1;
  };
  EXPECT_EQ(cells(line).at(column("step_time_p90_ms")), "step_time_p90_ms");
  for (const xax_bench::TrainingRun& run : report.training) {
    ASSERT_TRUE(std::getline(in, line));
    const std::vector<std::string> row = cells(line);
    ASSERT_EQ(row.size(), xax_bench::training_csv_columns().size()) << line;
    EXPECT_EQ(row.at(0), run.label());
    EXPECT_EQ(row.at(column("configuration")), run.configuration);
    EXPECT_DOUBLE_EQ(std::stod(row.at(column("step_time_ms"))), run.step_time_ms);
    EXPECT_DOUBLE_EQ(std::stod(row.at(column("step_time_p10_ms"))), run.step_time_p10_ms);
    EXPECT_DOUBLE_EQ(std::stod(row.at(column("step_time_p90_ms"))), run.step_time_p90_ms);
    EXPECT_EQ(std::stoull(row.at(column("peak_rss_growth_bytes"))), run.peak_rss_growth_bytes());
    EXPECT_EQ(std::stoull(row.at(column("params_bytes"))), run.tensor_bytes.params);
    EXPECT_EQ(std::stoull(row.at(column("train_state_bytes"))), run.tensor_bytes.train_state);
    EXPECT_EQ(std::stoull(row.at(column("activations_bytes"))), run.tensor_bytes.activations);
  }
  EXPECT_FALSE(std::getline(in, line)) << "one row per run";
  EXPECT_THROW(xax_bench::training_column("no_such_column"), std::logic_error);
}

TEST_F(ReportFiles, EveryPlotScriptReadsOnlyCsvFilesThatWereWritten) {
  const xax_bench::BenchmarkReport report = make_report();
  std::set<std::string> written;
  for (const auto& path : xax_bench::write_csv_files(report, dir_)) written.insert(path.filename().string());
  const xax_bench::PlotOutcome plots = xax_bench::write_plots(report, dir_, std::nullopt);
  EXPECT_TRUE(plots.images.empty());
  ASSERT_EQ(plots.problems.size(), 1u);
  EXPECT_THAT(plots.problems[0], HasSubstr("gnuplot was not found"));
  const std::regex csv_name(R"('([a-z_]+\.csv)')");
  std::set<std::string> scripts;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    if (entry.path().extension() != ".gp") continue;
    scripts.insert(entry.path().stem().string());
    const std::string script = read(entry.path());
    std::size_t reads = 0;
    for (std::sregex_iterator it(script.begin(), script.end(), csv_name), end; it != end; ++it, ++reads) {
      EXPECT_TRUE(written.contains((*it)[1])) << entry.path().filename() << " reads " << (*it)[1];
    }
    EXPECT_GT(reads, 0u) << entry.path().filename() << " plots nothing";
  }
  EXPECT_EQ(scripts, (std::set<std::string>{"accuracy", "loss_curves", "step_time", "memory",
                                            "char_loss_curves", "char_loss_scale"}));
  // The GPT's loss: one training and one validation line per GPT run, both from char_loss_curves.csv.
  EXPECT_THAT(read(dir_ / "char_loss_curves.csv"), HasSubstr("mixed,val,4,2.5\n"));
  EXPECT_THAT(read(dir_ / "char_loss_scale.csv"), HasSubstr("mixed,4,1\n"));
}

TEST_F(ReportFiles, CsvWriterQuotesAndRejectsRaggedRows) {
  {
    xax_bench::CsvWriter csv(dir_ / "t.csv", {"a", "b"});
    csv.cell(std::string("say \"hi\", twice")).cell(1.5).end_row();
    csv.cell("only one");
    EXPECT_THROW(csv.end_row(), std::logic_error);
  }
  EXPECT_THAT(read(dir_ / "t.csv"), HasSubstr("\"say \"\"hi\"\", twice\",1.5\n"));
}

// Google Benchmark writes a non-finite double as a bare NaN or Infinity (the coefficient of variation of a
// counter that is zero in every repetition); the report reads those as null, and leaves strings alone.
TEST(BenchmarkJson, NonFiniteNumbersReadAsNull) {
  const std::string text = R"({"benchmarks": [{"name": "Cast/NaN \"Infinity\"", "aggregate_name": "cv",
    "real_time": 0.25, "bytes_per_second": NaN, "items": -NaN, "max": Infinity, "min": -Infinity,
    "old_style": [nan, -inf, INF], "ok": true, "missing": null, "flag": false}]})";
  EXPECT_TRUE(nlohmann::json::parse(text, nullptr, false).is_discarded()) << "plain JSON rejects NaN";
  const nlohmann::json parsed = xax_bench::parse_benchmark_json(text);
  ASSERT_FALSE(parsed.is_discarded());
  const nlohmann::json& run = parsed.at("benchmarks").at(0);
  EXPECT_EQ(run.at("name"), "Cast/NaN \"Infinity\"");
  EXPECT_EQ(run.at("real_time"), 0.25);
  for (const char* key : {"bytes_per_second", "items", "max", "min", "missing"}) {
    EXPECT_TRUE(run.at(key).is_null()) << key;
  }
  EXPECT_EQ(run.at("old_style"), nlohmann::json::parse("[null, null, null]"));
  EXPECT_EQ(run.at("ok"), true);
  EXPECT_EQ(run.at("flag"), false);
  EXPECT_TRUE(xax_bench::parse_benchmark_json(R"({"a": NaNa})").is_discarded());
  EXPECT_TRUE(xax_bench::parse_benchmark_json("not json").is_discarded());
}

}  // namespace
