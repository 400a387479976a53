// report.json's schema and the CSV and Markdown writers, on a report built in memory.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "report/benchmark_json.hpp"
#include "report/csv.hpp"
#include "report/json_report.hpp"
#include "report/markdown.hpp"
#include "report/results.hpp"

namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

xax_bench::TrainingRun make_run(const std::string& policy, double accuracy) {
  xax_bench::TrainingRun run;
  run.configuration = "standard";
  run.policy = policy;
  run.policy_spec = "params=float32,compute=bfloat16,output=float32";
  run.loss_scaling = "none";
  run.layer_sizes = {784, 512, 512, 10};
  run.batch_size = 256;
  run.epochs = 2;
  run.steps = 4;
  run.test_accuracy = accuracy;
  run.final_train_loss = 0.42;
  run.step_time_ms = 3.5;
  run.peak_rss_bytes = 300u << 20;
  run.rss_before_bytes = 250u << 20;
  run.tensor_bytes.params = 1000;
  run.loss_curve = {{2, 1.5}, {4, 0.9}};
  run.epoch_records = {{1, 1.2, 0.8, 1.0, 1.0f, 0}, {2, 0.9, accuracy, 1.0, 1.0f, 0}};
  return run;
}

xax_bench::BenchmarkReport make_report() {
  xax_bench::BenchmarkReport report;
  report.cpu_features = "x86-64: avx2";
  report.half_dtype = "bfloat16";
  report.matmul_backend = "portable";
  report.compiler = "g++";
  report.dataset = "synthetic";
  report.training = {make_run("default", 0.9), make_run("mixed", 0.899)};
  report.accuracy_checks = {{"mixed", 0.899, 0.9, -0.1, 0.3, true}};
  return report;
}

TEST(ReportSchema, ReportBuiltHereConforms) {
  const nlohmann::json json = xax_bench::to_json(make_report());
  EXPECT_THAT(xax_bench::report_schema_problems(json), IsEmpty());
  ASSERT_TRUE(json.at("training").is_array());
  const nlohmann::json& run = json.at("training").at(1);
  for (const char* key : {"policy", "loss_scaling", "test_accuracy", "final_train_loss", "step_time_ms",
                          "peak_rss_bytes", "skipped_steps", "loss_curve"}) {
    EXPECT_TRUE(run.contains(key)) << key;
  }
  EXPECT_EQ(run.at("policy"), "mixed");
  EXPECT_EQ(run.at("peak_rss_growth_bytes"), 50u << 20);
  EXPECT_EQ(run.at("loss_curve").at(1).at("loss"), 0.9);
  EXPECT_TRUE(json.at("micro_benchmarks").is_null());
}

TEST(ReportSchema, MissingAndMistypedFieldsAreNamed) {
  nlohmann::json json = xax_bench::to_json(make_report());
  json.at("training").at(0).erase("test_accuracy");
  json.at("training").at(1)["skipped_steps"] = "none";
  json.at("training").at(1)["loss_curve"] = nlohmann::json::array();
  json.erase("machine");
  const auto problems = xax_bench::report_schema_problems(json);
  EXPECT_THAT(problems, Contains("report.training[0] has no 'test_accuracy'"));
  EXPECT_THAT(problems,
              Contains("report.training[1].skipped_steps is string, expected a non-negative integer"));
  EXPECT_THAT(problems, Contains("report.training[1].loss_curve is empty"));
  EXPECT_THAT(problems, Contains("report has no 'machine'"));
}

TEST(ReportSchema, AccuracyOutsideTheUnitIntervalIsAProblem) {
  nlohmann::json json = xax_bench::to_json(make_report());
  json.at("training").at(0)["test_accuracy"] = 90.0;
  EXPECT_THAT(xax_bench::report_schema_problems(json), Contains(HasSubstr("outside [0, 1]")));
}

TEST(ReportSchema, NonFiniteLossBecomesNull) {
  xax_bench::BenchmarkReport report = make_report();
  report.training[0].final_train_loss = std::numeric_limits<double>::quiet_NaN();
  const nlohmann::json json = xax_bench::to_json(report);
  EXPECT_TRUE(json.at("training").at(0).at("final_train_loss").is_null());
  EXPECT_THAT(xax_bench::report_schema_problems(json), IsEmpty());
}

TEST(ReportSchema, GoogleBenchmarkResultsAreChecked) {
  xax_bench::BenchmarkReport report = make_report();
  report.micro = {{"context", {{"num_cpus", 2}}},
                  {"benchmarks",
                   {{{"name", "Matmul/bfloat16/1024/threads:1"}, {"real_time", 5.0}, {"time_unit", "ms"}}}}};
  EXPECT_THAT(xax_bench::report_schema_problems(xax_bench::to_json(report)), IsEmpty());
  report.micro = {{"benchmarks", {{{"name", "x"}}}}};
  const auto problems = xax_bench::report_schema_problems(xax_bench::to_json(report));
  EXPECT_THAT(problems, Contains("report.micro_benchmarks has no 'context'"));
  EXPECT_THAT(problems, Contains("report.micro_benchmarks.benchmarks[0] has no 'real_time'"));
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

  static std::string read(const std::filesystem::path& path) {
    std::ifstream in(path);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }
  std::filesystem::path dir_;
};

TEST_F(ReportFiles, JsonFileParsesBack) {
  const auto path = xax_bench::write_json_report(make_report(), dir_);
  const nlohmann::json parsed = nlohmann::json::parse(read(path));
  EXPECT_THAT(xax_bench::report_schema_problems(parsed), IsEmpty());
}

TEST_F(ReportFiles, CsvFilesHaveAHeaderAndOneRowPerRecord) {
  const auto files = xax_bench::write_csv_files(make_report(), dir_);
  EXPECT_EQ(files.size(), 4u);  // no micro.csv without micro results
  const std::string training = read(dir_ / "training.csv");
  EXPECT_EQ(std::count(training.begin(), training.end(), '\n'), 3);
  EXPECT_THAT(training, HasSubstr("run,configuration,policy,policy_spec"));
  // The policy spec has commas, so it is quoted.
  EXPECT_THAT(training, HasSubstr(",\"params=float32,compute=bfloat16,output=float32\","));
  const std::string curves = read(dir_ / "loss_curves.csv");
  EXPECT_THAT(curves, HasSubstr("mixed,4,0.9\n"));
}

TEST_F(ReportFiles, CsvWriterQuotesAndRejectsRaggedRows) {
  {
    xax_bench::CsvWriter csv(dir_ / "t.csv", {"a", "b"});
    csv.cell(std::string("say \"hi\"")).cell(1.5).end_row();
    csv.cell("only one");
    EXPECT_THROW(csv.end_row(), std::logic_error);
  }
  EXPECT_THAT(read(dir_ / "t.csv"), HasSubstr("\"say \"\"hi\"\"\",1.5\n"));
}

TEST_F(ReportFiles, MarkdownSummaryHasTheTablesAndVerdicts) {
  xax_bench::BenchmarkReport report = make_report();
  report.memory_checks = {{"mixed", 1.2, 1.6, 1.5, false, "parameters dominate"}};
  const std::string md = xax_bench::markdown_summary(report, {"loss_curves.png", "loss_curves.svg"});
  EXPECT_THAT(md, HasSubstr("| run | policy | loss scaling |"));
  EXPECT_THAT(
      md, HasSubstr("| mixed | params=float32,compute=bfloat16,output=float32 | none | 256 | 2 | 89.90 % |"));
  EXPECT_THAT(md, HasSubstr("| PASS |"));
  EXPECT_THAT(md, HasSubstr("| FAIL |"));
  EXPECT_THAT(md, HasSubstr("parameters dominate"));
  EXPECT_THAT(md, HasSubstr("![loss_curves.png](loss_curves.png)"));
  EXPECT_THAT(md, ::testing::Not(HasSubstr("loss_curves.svg)")));
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
