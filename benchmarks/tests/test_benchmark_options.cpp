// mixed_precision_benchmark's command line (runner/options.hpp), its --policies list (runner/policies.hpp)
// and the batch a run trains with (runner/batch_size.hpp), without training anything.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

#include "runner/batch_size.hpp"
#include "runner/dataset.hpp"
#include "runner/options.hpp"
#include "runner/policies.hpp"

namespace {

using xax_bench::ParsedOptions;

// Parses `arguments` as the benchmark's command line; `messages` receives what it printed to stderr.
ParsedOptions parse(std::vector<std::string> arguments, std::string* messages = nullptr) {
  arguments.insert(arguments.begin(), "mixed_precision_benchmark");
  std::vector<char*> argv;
  for (std::string& argument : arguments) argv.push_back(argument.data());
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  ParsedOptions parsed = xax_bench::parse_options(static_cast<int>(argv.size()), argv.data());
  const std::string err = testing::internal::GetCapturedStderr();
  const std::string out = testing::internal::GetCapturedStdout();
  if (messages != nullptr) *messages = err + out;
  return parsed;
}

// Expects the command line refused (not run, non-zero exit) with a message containing each of `parts`.
void expect_refused(const std::vector<std::string>& arguments, const std::vector<std::string>& parts) {
  std::string messages;
  const ParsedOptions parsed = parse(arguments, &messages);
  std::string shown;
  for (const std::string& argument : arguments) shown += argument + " ";
  EXPECT_FALSE(parsed.options.has_value()) << shown;
  EXPECT_NE(parsed.exit_code, 0) << shown;
  for (const std::string& part : parts)
    EXPECT_NE(messages.find(part), std::string::npos) << shown << "\n" << messages;
}

xax::PolicySpec spec(const std::string& policy) {
  return xax::get_policy(policy);
}

// --- --policies
// ---------------------------------------------------------------------------------------------

TEST(BenchmarkPolicies, PresetListsKeepWorking) {
  const ParsedOptions parsed = parse({"--policies", "default,mixed,float16"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->policies, (std::vector<std::string>{"default", "mixed", "float16"}));
  // Without --policies, the default list.
  const ParsedOptions defaults = parse({});
  ASSERT_TRUE(defaults.options);
  EXPECT_EQ(defaults.options->policies, (std::vector<std::string>{"default", "mixed", "float16"}));
}

TEST(BenchmarkPolicies, AKeyDtypeSpecIsOnePolicy) {
  const ParsedOptions parsed = parse({"--policies", "params=float32,compute=bfloat16,output=float32"});
  ASSERT_TRUE(parsed.options);
  ASSERT_EQ(parsed.options->policies.size(), 1U);
  EXPECT_EQ(spec(parsed.options->policies[0]),
            (xax::PolicySpec{xax::DType::float32, xax::DType::bfloat16, xax::DType::float32}));
}

TEST(BenchmarkPolicies, SpecsBetweenNamesAndInSeparateArguments) {
  const ParsedOptions parsed = parse({"--policies", "default,c=bf16,o=f16,float16", "c=f16"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->policies,
            (std::vector<std::string>{"default", "c=bf16,o=f16", "float16", "c=f16"}));
  EXPECT_EQ(spec("c=bf16,o=f16"),
            (xax::PolicySpec{xax::DType::float32, xax::DType::bfloat16, xax::DType::float16}));
}

TEST(BenchmarkPolicies, AKeyRepeatedInOneSpecIsRefused) {
  EXPECT_THROW(xax_bench::split_policy_list({"c=bf16,compute=f16"}), xax::ConfigError);
  expect_refused({"--policies", "c=bf16,c=f16"}, {"--policies", "sets compute again", "separate arguments"});
}

TEST(BenchmarkPolicies, TheSamePolicySpeltTwiceIsRefused) {
  expect_refused({"--policies", "default,f32,full"},
                 {"'default' and 'f32' are the same policy", "give each policy once"});
  expect_refused(
      {"--policies", "mixed",
       "params=float32,compute=" + std::string(xax::dtype_name(xax::half_dtype())) + ",output=float32"},
      {"are the same policy"});
}

TEST(BenchmarkPolicies, UncompiledParamsAndComputeAreRefusedUpFront) {
  expect_refused({"--policies", "params=bfloat16,compute=float32"}, {"does not compile", "float32/bfloat16"});
  expect_refused({"--policies", "f64"}, {"does not compile"});
  expect_refused({"--policies", "default,bogus"}, {"bogus"});
}

TEST(BenchmarkPolicies, TheFp32ReferenceIsFoundByWhatItIs) {
  for (const std::string fp32 : {"default", "f32", "float32", "full", "params=float32", "p=f32,c=f32,o=f32"})
    EXPECT_TRUE(xax_bench::is_fp32_reference(fp32)) << fp32;
  for (const std::string other : {"mixed", "float16", "bf16", "o=bf16"})
    EXPECT_FALSE(xax_bench::is_fp32_reference(other)) << other;
}

// --- numbers
// ------------------------------------------------------------------------------------------------

TEST(BenchmarkNumbers, NanAndInfinityAreRefused) {
  for (const std::string value : {"nan", "NaN", "inf", "-inf"}) {
    expect_refused({"--accuracy-tolerance", value}, {"--accuracy-tolerance", "not a finite decimal number"});
    expect_refused({"--learning-rate", value}, {"--learning-rate", "not a finite decimal number"});
  }
  expect_refused({"--learning-rate", "0x1p-10"}, {"--learning-rate", "not a finite decimal number"});
  const ParsedOptions parsed = parse({"--learning-rate", "3e-4", "--accuracy-tolerance", "0.5"});
  ASSERT_TRUE(parsed.options);
  EXPECT_DOUBLE_EQ(parsed.options->learning_rate, 3e-4);
  EXPECT_DOUBLE_EQ(parsed.options->accuracy_tolerance_pp, 0.5);
}

TEST(BenchmarkNumbers, IntegersAreDecimalOnly) {
  expect_refused({"--batch-size", "010"}, {"--batch-size", "leading zero"});
  expect_refused({"--gpt-steps", "0x100"}, {"--gpt-steps", "not a decimal integer"});
  expect_refused({"--epochs", "true"}, {"--epochs", "not a decimal integer"});
  expect_refused({"--threads", "+2"}, {"--threads", "not a decimal integer"});
  expect_refused({"--zero-stage", "0x1"}, {"--zero-stage", "not a decimal integer"});
  expect_refused({"--threads", "-3"}, {"--threads"});  // decimal, out of CLI::Range
  const ParsedOptions parsed = parse({"--batch-size", "10", "--gpt-steps", "256", "--train-samples", "0"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->batch_size, 10);
  EXPECT_EQ(parsed.options->gpt_steps, 256);
}

TEST(BenchmarkNumbers, TheGptsFinalValidationBatchesAreNanoGptsByDefaultAndPositive) {
  const ParsedOptions defaults = parse({});
  ASSERT_TRUE(defaults.options);
  EXPECT_EQ(defaults.options->gpt_final_eval_batches, 200);
  expect_refused({"--gpt-final-eval-batches", "0"}, {"--gpt-final-eval-batches"});
  const ParsedOptions parsed = parse({"--gpt-final-eval-batches", "8", "--gpt-eval-batches", "8"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->gpt_final_eval_batches, 8);
  EXPECT_EQ(parsed.options->gpt_eval_batches, 8);
}

TEST(BenchmarkNumbers, IntermediateGptEstimatesAreRefusedMoreBatchesThanTheFinalOne) {
  expect_refused({"--gpt-final-eval-batches", "10"},
                 {"--gpt-eval-batches 20 exceeds --gpt-final-eval-batches 10", "give at most 10"});
  expect_refused({"--gpt-eval-batches", "5", "--gpt-final-eval-batches", "4"}, {"give at most 4"});
}

TEST(BenchmarkNumbers, TheSeedIsRefusedNegativeOrTooLarge) {
  expect_refused({"--seed", "-1"}, {"--seed", "negative", "18446744073709551615"});
  expect_refused({"--seed", "18446744073709551616"}, {"--seed", "out of range"});
  const ParsedOptions parsed = parse({"--seed", "18446744073709551615"});
  ASSERT_TRUE(parsed.options);
  EXPECT_EQ(parsed.options->seed, std::numeric_limits<std::uint64_t>::max());
}

// --- the batch a run trains with
// ----------------------------------------------------------------------------

TEST(BenchmarkBatchSize, RecordsWhetherItWasTyped) {
  const ParsedOptions typed = parse({"--batch-size", "1000"});
  ASSERT_TRUE(typed.options);
  EXPECT_TRUE(typed.options->batch_size_given);
  EXPECT_FALSE(typed.options->memory_batch_size_given);
  const ParsedOptions defaults = parse({});
  ASSERT_TRUE(defaults.options);
  EXPECT_FALSE(defaults.options->batch_size_given);
}

TEST(BenchmarkBatchSize, ATypedBatchLargerThanTheSplitIsRefused) {
  EXPECT_EQ(xax_bench::effective_batch_size(512, true, "--batch-size", 512), 512);
  try {
    (void)xax_bench::effective_batch_size(1000, true, "--batch-size", 512);
    FAIL() << "--batch-size 1000 on 512 samples was accepted";
  } catch (const xax::ConfigError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("--batch-size 1000"), std::string::npos) << message;
    EXPECT_NE(message.find("--train-samples"), std::string::npos) << message;
    EXPECT_NE(message.find("from 1 to 512"), std::string::npos) << message;
  }
}

TEST(BenchmarkBatchSize, ADefaultLargerThanTheSplitIsReduced) {
  EXPECT_EQ(xax_bench::effective_batch_size(8192, false, "--memory-batch-size", 2048), 2048);
  EXPECT_EQ(xax_bench::effective_batch_size(256, false, "--batch-size", 60000), 256);
}

// More --train-samples than the split holds was quietly ignored (the whole split ran); it is refused.
TEST(Samples, MoreThanTheSplitHoldsIsRefused) {
  xax::ClassificationDataset split{Eigen::MatrixXf::Zero(2, 10), Eigen::VectorX<std::int32_t>::Zero(10), 2};
  xax_bench::detail::keep_first(split, 4, "--train-samples", "toy train split");
  EXPECT_EQ(split.size(), 4);
  xax_bench::detail::keep_first(split, 0, "--train-samples", "toy train split");
  EXPECT_EQ(split.size(), 4);
  try {
    xax_bench::detail::keep_first(split, 5, "--train-samples", "toy train split");
    ADD_FAILURE() << "kept 4 samples for 5";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "--train-samples 5 is more than the 4 samples of the toy train split; accepted: 0 (all) to 4");
  }
}

// A synthetic set larger than the machine's memory is refused before it is made, not left to bad_alloc or
// the OOM killer.
TEST(Samples, ASyntheticSetLargerThanTheMachinesMemoryIsRefused) {
  constexpr std::uint64_t gib = std::uint64_t{1} << 30;
  xax::SyntheticClassificationOptions synthetic;  // 70,000 samples of 784 floats: 0.2 GiB
  EXPECT_NO_THROW(xax_bench::require_synthetic_fits(synthetic, xax_bench::MemoryBudget::machine(gib)));
  synthetic.train_samples = 10'000'000;  // 29.2 GiB with the test split
  try {
    xax_bench::require_synthetic_fits(synthetic, xax_bench::MemoryBudget::machine(16 * gib));
    ADD_FAILURE() << "no error";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "--train-samples 10000000 and --test-samples 10000 make a synthetic set of 29.3 GiB, more than "
        "this machine's 16.0 GiB of memory; give fewer samples");
  }
}

}  // namespace
