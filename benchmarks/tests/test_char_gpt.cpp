// The character-level GPT workload: its gradients against finite differences, its 16-bit compute paths
// against fp32, its LayerNorm parameters staying fp32 in casts, and the corpus loader (fortune files, 90/10
// split, clear errors for missing or empty data).

#include <gtest/gtest.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

#include "runner/char_training.hpp"
#include "scratch_directory.hpp"
#include "workloads/char_data.hpp"
#include "workloads/char_gpt.hpp"

namespace {

using xax_bench::GptParams;
using xax_bench::GptShape;
using xax_bench::TokenBatch;

// The norm parameters are float leaves inside the T-templated params: a cast to bf16 leaves them float.
static_assert(
    std::is_same_v<xax::rebind_scalar_t<GptParams<float>, xax::bfloat16>, GptParams<xax::bfloat16>>);
static_assert(std::is_same_v<decltype(GptParams<xax::bfloat16>::ln_f.gain), Eigen::VectorXf>);

GptShape tiny_shape() {
  return GptShape{.vocabulary = 7, .block_size = 5, .layers = 2, .heads = 2, .embedding = 8};
}

TokenBatch tiny_batch() {
  TokenBatch batch;
  batch.batch = 3;
  batch.block = 5;
  batch.tokens = {0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 3, 3, 3, 6};
  batch.targets = {1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 3, 3, 3, 6, 6};
  return batch;
}

// Larger than nanoGPT's 0.02 initialisation, so that every gradient is well above finite-difference noise.
GptParams<float> tiny_params() {
  GptParams<float> params = xax_bench::gpt_init(tiny_shape(), 3);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  xax::for_each_leaf(
      [&]<class L>(L& leaf) {
        if constexpr (xax::floating_leaf<L>) {
          for (auto& x : xax::leaf_span(leaf)) x += normal(rng);
        }
      },
      params);
  return params;
}

TEST(CharGpt, GradientsMatchFiniteDifferences) {
  const GptShape shape = tiny_shape();
  const TokenBatch batch = tiny_batch();
  GptParams<float> params = tiny_params();
  GptParams<float> grads;
  xax_bench::GptWorkspace<float> ws;
  const float loss_scale = 4.0f;
  const double loss = xax_bench::gpt_loss_and_gradients(params, shape, batch, loss_scale, grads, ws);
  EXPECT_GT(loss, 0.5);

  std::vector<float*> values, gradients;
  std::vector<std::string> names;
  xax::for_each_leaf_with_path(
      [&]<class L>(const xax::TreePath& path, L& p, L& g) {
        if constexpr (xax::floating_leaf<L>) {
          auto ps = xax::leaf_span(p);
          auto gs = xax::leaf_span(g);
          ASSERT_EQ(ps.size(), gs.size()) << std::string(path.str());
          for (std::size_t i = 0; i < ps.size(); ++i) {
            values.push_back(&ps[i]);
            gradients.push_back(&gs[i]);
            names.push_back(std::string(path.str()) + "[" + std::to_string(i) + "]");
          }
        }
      },
      params, grads);
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<std::size_t> pick(0, values.size() - 1);
  int checked = 0;
  for (int trial = 0; trial < 150; ++trial) {
    const std::size_t i = pick(rng);
    const float saved = *values[i];
    constexpr float h = 1e-2f;
    *values[i] = saved + h;
    const double plus = xax_bench::gpt_loss(params, shape, batch, ws);
    *values[i] = saved - h;
    const double minus = xax_bench::gpt_loss(params, shape, batch, ws);
    *values[i] = saved;
    const double numeric = (plus - minus) / (2 * h);
    const double analytic = static_cast<double>(*gradients[i]) / loss_scale;
    EXPECT_NEAR(analytic, numeric, 2e-3 + 0.03 * std::abs(numeric)) << names[i];
    ++checked;
  }
  EXPECT_EQ(checked, 150);
}

template <class T>
void expect_activation_bytes_follow_from_the_shape() {
  const GptShape shape = tiny_shape();
  const TokenBatch batch = tiny_batch();
  const GptParams<T> params = xax::tree_cast<T>(tiny_params());
  GptParams<float> grads;
  xax_bench::GptWorkspace<T> ws;
  xax_bench::gpt_loss_and_gradients(params, shape, batch, 1.0f, grads, ws);
  EXPECT_EQ(static_cast<double>(ws.activation_bytes()),
            xax_bench::gpt_activation_bytes(shape, batch.batch, batch.block, sizeof(T)));
}

TEST(CharGpt, ActivationBytesFollowFromTheShape) {
  expect_activation_bytes_follow_from_the_shape<float>();
  expect_activation_bytes_follow_from_the_shape<xax::bfloat16>();
}

TEST(CharGpt, AConfigurationTooLargeForTheMachinesMemoryIsRefusedBeforeAllocating) {
  constexpr std::uint64_t gib = std::uint64_t{1} << 30;
  xax_bench::CharTrainingSetup setup;  // nanoGPT's CPU configuration: a few MiB of activations
  setup.shape.vocabulary = 65;
  EXPECT_NO_THROW(xax_bench::require_gpt_fits(setup, xax_bench::MemoryBudget::machine(gib)));
  // Block 8192 at batch 8: 4 layers x 8 x 4 heads x 8192^2 x 4 bytes = 32 GiB of probabilities alone.
  setup.shape.block_size = 8192;
  setup.batch_size = 8;
  try {
    xax_bench::require_gpt_fits(setup, xax_bench::MemoryBudget::machine(16 * gib));
    FAIL() << "no error";
  } catch (const xax::ConfigError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("--gpt-block-size 8192"), std::string::npos) << message;
    EXPECT_NE(message.find("are 32.0 GiB of them"), std::string::npos) << message;
    EXPECT_NE(message.find("16.0 GiB of memory"), std::string::npos) << message;
  }
  // In bf16 the same probabilities take half: 16 GiB, plus the rest.
  setup.policy = "mixed";
  EXPECT_THROW(xax_bench::require_gpt_fits(setup, xax_bench::MemoryBudget::machine(16 * gib)),
               xax::ConfigError);
  EXPECT_NO_THROW(xax_bench::require_gpt_fits(setup, xax_bench::MemoryBudget::machine(32 * gib)));
  // The largest shape the command line admits: 2^61 bytes of probabilities, against a machine of 1 TiB.
  setup.shape.block_size = 16384;
  setup.batch_size = 65536;
  setup.shape.layers = 256;
  setup.shape.heads = 256;
  EXPECT_THROW(xax_bench::require_gpt_fits(setup, xax_bench::MemoryBudget::machine(1024 * gib)),
               xax::ConfigError);
}

template <class T>
class CharGptTyped : public ::testing::Test {};
using HalfScalars = ::testing::Types<xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(CharGptTyped, HalfScalars);

TYPED_TEST(CharGptTyped, SixteenBitComputeTracksFp32) {
  using T = TypeParam;
  const GptShape shape = tiny_shape();
  const TokenBatch batch = tiny_batch();
  const GptParams<float> master = tiny_params();
  const GptParams<T> params = xax::tree_cast<T>(master);
  EXPECT_TRUE(params.ln_f.gain == master.ln_f.gain);  // the norm gains were not rounded to 16 bits
  GptParams<float> reference, fp32_grads;
  xax_bench::GptWorkspace<float> ws32;
  xax_bench::GptWorkspace<T> ws;
  const double loss32 = xax_bench::gpt_loss_and_gradients(master, shape, batch, 1.0f, reference, ws32);
  const double loss = xax_bench::gpt_loss_and_gradients(params, shape, batch, 1.0f, fp32_grads, ws);
  EXPECT_NEAR(loss, loss32, 0.03 * loss32);
  // The gradients as a whole (16-bit activations perturb single elements more than their norm).
  double difference = 0, norm = 0;
  xax::for_each_leaf(
      [&]<class L>(const L& a, const L& b) {
        if constexpr (xax::floating_leaf<L>) {
          const auto sa = xax::leaf_span(a);
          const auto sb = xax::leaf_span(b);
          for (std::size_t i = 0; i < sa.size(); ++i) {
            difference += std::pow(static_cast<double>(sa[i]) - static_cast<double>(sb[i]), 2);
            norm += std::pow(static_cast<double>(sb[i]), 2);
          }
        }
      },
      fp32_grads, reference);
  EXPECT_LT(std::sqrt(difference / norm), 0.05);
}

TEST(CharGpt, RejectsWindowsLongerThanTheBlock) {
  const GptShape shape = tiny_shape();
  TokenBatch batch = tiny_batch();
  batch.block = 6;
  batch.batch = 2;
  batch.tokens.resize(12, 0);
  xax_bench::GptWorkspace<float> ws;
  EXPECT_THROW(xax_bench::gpt_loss(xax_bench::gpt_init(shape, 1), shape, batch, ws), xax::ShapeError);
  EXPECT_THROW((GptShape{.heads = 3}.validate()), xax::ConfigError);
}

TEST(CharGpt, LearningRateScheduleIsNanoGpts) {
  xax_bench::CharTrainingSetup setup;  // lr 1e-3, min 1e-4, warm-up 100, 2000 steps
  EXPECT_DOUBLE_EQ(xax_bench::nanogpt_learning_rate(0, setup), 1e-3 / 101);
  EXPECT_DOUBLE_EQ(xax_bench::nanogpt_learning_rate(99, setup), 1e-3 * 100 / 101);
  EXPECT_DOUBLE_EQ(xax_bench::nanogpt_learning_rate(100, setup), 1e-3);
  EXPECT_NEAR(xax_bench::nanogpt_learning_rate(1050, setup), 0.55e-3, 1e-12);
  EXPECT_DOUBLE_EQ(xax_bench::nanogpt_learning_rate(2000, setup), 1e-4);
  EXPECT_DOUBLE_EQ(xax_bench::nanogpt_learning_rate(5000, setup), 1e-4);
}

class CorpusFiles : public ::testing::Test {
 protected:
  void write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name, std::ios::binary) << text;
  }
  xax_test::ScratchDirectory scratch_{"xax_char_corpus"};
  const std::filesystem::path& dir_ = scratch_.path();
};

TEST_F(CorpusFiles, FortuneFilesSkipIndexesLinksAndSeparators) {
  write("b", "second\n%\nthird\n");
  write("a", "first\n%\n");
  write("a.dat", "binary index");
  std::filesystem::create_symlink(dir_ / "a", dir_ / "a.u8");
  std::filesystem::create_symlink(dir_ / "b", dir_ / "c");
  EXPECT_EQ(xax_bench::load_fortunes(dir_), "first\n\nsecond\n\nthird\n");
}

TEST_F(CorpusFiles, MissingOrEmptyDataIsAClearError) {
  try {
    xax_bench::load_fortunes(dir_ / "absent");
    FAIL() << "no error";
  } catch (const xax::DataError& error) {
    EXPECT_NE(std::string(error.what()).find("apt-get install fortunes"), std::string::npos);
  }
  write("x.dat", "index only");
  EXPECT_THROW(xax_bench::load_fortunes(dir_), xax::DataError);
  write("empty.txt", "");
  EXPECT_THROW(xax_bench::load_char_corpus(dir_ / "empty.txt", 8), xax::DataError);
  EXPECT_THROW(xax_bench::load_char_corpus(dir_ / "no_such_file.txt", 8), xax::DataError);
  write("short.txt", "abcdefghij");
  EXPECT_THROW(xax_bench::load_char_corpus(dir_ / "short.txt", 8), xax::DataError);
}

// A directory that exists but cannot be opened: the process may open no more files (the one way to make
// opendir fail for root, who passes every permission check).
TEST_F(CorpusFiles, AFortuneDirectoryThatCannotBeListedIsAClearError) {
  write("a", "first\n%\n");
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  const int lowest_free = ::dup(0);  // the next descriptor open() would return
  ASSERT_GE(lowest_free, 0);
  ::close(lowest_free);
  rlimit none_left = saved;
  none_left.rlim_cur = static_cast<rlim_t>(lowest_free);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &none_left), 0);
  std::string message;
  try {
    xax_bench::load_fortunes(dir_);
  } catch (const xax::DataError& error) {
    message = error.what();
  } catch (const std::exception& error) {
    message = std::string("not a DataError: ") + error.what();
  }
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  EXPECT_NE(message.find("cannot be listed"), std::string::npos) << message;
  EXPECT_NE(message.find("--text FILE"), std::string::npos) << message;
}

/// The message of the DataError that loading `path` as the --text corpus throws ("" if it does not throw).
std::string text_error(const std::filesystem::path& path) {
  try {
    (void)xax_bench::load_char_corpus(path, 8);
  } catch (const xax::DataError& error) {
    return error.what();
  }
  return "";
}

// --text takes a regular file: a directory read as empty, and a device such as /dev/zero never ends (it was
// read until std::bad_alloc).
TEST_F(CorpusFiles, TextMustBeARegularFile) {
  std::filesystem::create_directory(dir_ / "adir");
  const std::string directory = text_error(dir_ / "adir");
  EXPECT_NE(directory.find((dir_ / "adir").string()), std::string::npos) << directory;
  EXPECT_NE(directory.find("is a directory"), std::string::npos) << directory;
  EXPECT_NE(directory.find("a regular text file"), std::string::npos) << directory;
  const std::string device = text_error("/dev/zero");
  EXPECT_NE(device.find("not a regular file or a pipe"), std::string::npos) << device;
  EXPECT_NE(device.find("a regular text file"), std::string::npos) << device;
  EXPECT_NE(text_error(dir_ / "absent.txt").find("does not exist"), std::string::npos);
}

// A pipe (--text /dev/stdin, --text <(...)) is read like a file, up to the limit.
TEST_F(CorpusFiles, TextMayComeThroughAPipe) {
  const auto fifo = dir_ / "pipe";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::string text;
  for (int i = 0; i < 200; ++i) text += "to be or not to be\n";
  std::thread writer([&] { std::ofstream(fifo, std::ios::binary) << text; });
  const auto corpus = xax_bench::load_char_corpus(fifo, 8);
  writer.join();
  EXPECT_EQ(corpus.characters, text.size());
}

// The size is checked before reading: a (sparse) file one byte over the limit is refused at once.
TEST_F(CorpusFiles, TextOverTheSizeLimitIsRefusedBeforeReading) {
  const auto path = dir_ / "huge.txt";
  write("huge.txt", "");
  std::filesystem::resize_file(path, xax_bench::max_text_bytes + 1);
  const std::string error = text_error(path);
  EXPECT_NE(error.find(std::to_string(xax_bench::max_text_bytes + 1) + " bytes"), std::string::npos) << error;
  EXPECT_NE(error.find("at most " + std::to_string(xax_bench::max_text_bytes)), std::string::npos) << error;
}

TEST_F(CorpusFiles, SplitsNinetyTenWithASortedByteVocabulary) {
  std::string text;
  for (int i = 0; i < 100; ++i) text += static_cast<char>(i % 2 == 0 ? 'b' : 'a');
  text[95] = 'z';
  write("t.txt", text);
  const xax_bench::CharCorpus corpus = xax_bench::load_char_corpus(dir_ / "t.txt", 4);
  EXPECT_EQ(corpus.vocabulary, "abz");
  ASSERT_EQ(corpus.train.size(), 90u);
  ASSERT_EQ(corpus.val.size(), 10u);
  EXPECT_EQ(corpus.train[0], 1);
  EXPECT_EQ(corpus.train[1], 0);
  EXPECT_EQ(corpus.val[5], 2);
  const auto starts = xax_bench::spread_window_starts(corpus.val.size(), 4, 100);
  EXPECT_EQ(starts, (std::vector<std::int64_t>{0, 4}));
}

}  // namespace
