// xax::embedding (gather) and embedding_backward (fp32 scatter-add): exact gathers, accumulation against a
// double reference, repeated tokens that must not lose a single update, thread-count independence, errors.

#include <gtest/gtest.h>

#include <vector>
#include <xax/ops/embedding.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/threads.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;

template <class T>
class EmbeddingTyped : public ::testing::Test {};
TYPED_TEST_SUITE(EmbeddingTyped, xax_test::Scalars);

TYPED_TEST(EmbeddingTyped, GatherIsExactAndAccumulateSumsInFp32) {
  using T = TypeParam;
  const Matrix<T> table = xax_test::random_matrix<T>(24, 11, 1);
  const std::vector<std::int32_t> tokens{3, 0, 10, 3, 3, 7};
  Matrix<T> out;
  xax::embedding(table, tokens, out);
  ASSERT_EQ(out.rows(), 24);
  ASSERT_EQ(out.cols(), 6);
  for (std::size_t n = 0; n < tokens.size(); ++n)
    EXPECT_TRUE(out.col(static_cast<Eigen::Index>(n)) == table.col(tokens[n]));

  const Matrix<T> positions = xax_test::random_matrix<T>(24, 6, 2);
  const std::vector<std::int32_t> position_ids{0, 1, 2, 3, 4, 5};
  Eigen::MatrixXf sum;
  xax::embedding(table, tokens, sum);
  xax::embedding(positions, position_ids, sum, {.accumulate = true});
  Eigen::MatrixXd expected(24, 6);
  for (std::size_t n = 0; n < tokens.size(); ++n) {
    expected.col(static_cast<Eigen::Index>(n)) =
        xax_test::to_double(table.col(tokens[n])) +
        xax_test::to_double(positions.col(static_cast<Eigen::Index>(n)));
  }
  EXPECT_TRUE(xax_test::near_reference(sum, expected, 1e-7, 0.0));
  Matrix<T> sum_t = out;
  xax::embedding(positions, position_ids, sum_t, {.accumulate = true});
  EXPECT_TRUE(xax_test::near_reference(sum_t, expected, 1.01 * xax_test::half_ulp<T>(), 0.0));
}

TYPED_TEST(EmbeddingTyped, BackwardScatterAddsLikeTheDoubleReference) {
  using T = TypeParam;
  const std::vector<std::int32_t> tokens{5, 1, 5, 2, 5, 0, 1, 5};
  const Matrix<T> dout = xax_test::random_matrix<T>(19, static_cast<Eigen::Index>(tokens.size()), 3);
  Eigen::MatrixXd expected = Eigen::MatrixXd::Zero(19, 7);
  for (std::size_t n = 0; n < tokens.size(); ++n)
    expected.col(tokens[n]) += xax_test::to_double(dout.col(static_cast<Eigen::Index>(n)));

  Eigen::MatrixXf dtable;
  xax::embedding_backward(dout, tokens, dtable, 7);
  EXPECT_TRUE(xax_test::near_reference(dtable, expected, 1e-6, 1e-6));
  Matrix<T> dtable_t;
  xax::embedding_backward(dout, tokens, dtable_t, 7);
  EXPECT_TRUE(xax_test::near_reference(dtable_t, expected, 1.01 * xax_test::half_ulp<T>(), 1e-6));

  // Accumulating adds to the head's gradient already there (a weight-tied table).
  Matrix<T> accumulated = Matrix<T>::Constant(19, 7, T(1.0f));
  xax::embedding_backward(dout, tokens, accumulated, 7, {.accumulate = true});
  EXPECT_TRUE(
      xax_test::near_reference(accumulated, expected.array() + 1.0, 1.01 * xax_test::half_ulp<T>(), 1e-6));
}

TYPED_TEST(EmbeddingTyped, RepeatedTokensLoseNoUpdate) {
  using T = TypeParam;
  // 3072 occurrences of one token, each adding 1 (and 3072 adding 0.25 to another): a 16-bit running sum
  // stalls at 256 (bf16) or 2048 (f16); fp32 sums them exactly, and 3072 and 768 are exact in every type.
  constexpr Eigen::Index count = 6144;
  std::vector<std::int32_t> tokens(count);
  Matrix<T> dout(2, count);
  for (Eigen::Index n = 0; n < count; ++n) {
    tokens[static_cast<std::size_t>(n)] = n % 2 == 0 ? 4 : 1;
    dout(0, n) = T(n % 2 == 0 ? 1.0f : 0.25f);
    dout(1, n) = T(n % 2 == 0 ? -1.0f : 0.0f);
  }
  for (const int threads : {1, 2}) {
    xax::set_num_threads(threads);
    Matrix<T> dtable;
    xax::embedding_backward(dout, tokens, dtable, 6);
    EXPECT_EQ(static_cast<float>(dtable(0, 4)), 3072.0f) << threads << " thread(s)";
    EXPECT_EQ(static_cast<float>(dtable(1, 4)), -3072.0f);
    EXPECT_EQ(static_cast<float>(dtable(0, 1)), 768.0f);
    EXPECT_EQ(static_cast<float>(dtable(1, 1)), 0.0f);
    EXPECT_EQ(static_cast<float>(dtable(0, 0)), 0.0f);
  }
  xax::set_num_threads(1);
}

TEST(Embedding, ResultDoesNotDependOnTheThreadCount) {
  const Eigen::MatrixXf dout = xax_test::random_matrix<float>(200, 3000, 7);
  std::vector<std::int32_t> tokens(3000);
  for (std::size_t n = 0; n < tokens.size(); ++n) tokens[n] = static_cast<std::int32_t>((n * 7919) % 65);
  Eigen::MatrixXf one, two;
  xax::set_num_threads(1);
  xax::embedding_backward(dout, tokens, one, 65);
  xax::set_num_threads(2);
  xax::embedding_backward(dout, tokens, two, 65);
  xax::set_num_threads(1);
  EXPECT_TRUE(one == two);
}

TEST(Embedding, RejectsTokensOutsideTheTableAndBadShapes) {
  const Eigen::MatrixXf table = Eigen::MatrixXf::Ones(4, 5);
  Eigen::MatrixXf out;
  EXPECT_THROW(xax::embedding(table, std::vector<std::int32_t>{0, 5}, out), xax::ShapeError);
  EXPECT_THROW(xax::embedding(table, std::vector<std::int32_t>{-1}, out), xax::ShapeError);
  try {
    xax::embedding(table, std::vector<std::int32_t>{1, 7}, out);
  } catch (const xax::ShapeError& error) {
    EXPECT_NE(std::string(error.what()).find("token 7 at position 1 is outside [0, 5)"), std::string::npos);
  }
  Eigen::MatrixXf accumulate_into(4, 3);
  EXPECT_THROW(xax::embedding(table, std::vector<std::int32_t>{0, 1}, accumulate_into, {.accumulate = true}),
               xax::ShapeError);
  Eigen::MatrixXf dtable;
  EXPECT_THROW(
      xax::embedding_backward(Eigen::MatrixXf::Ones(4, 3).eval(), std::vector<std::int32_t>{0, 1}, dtable, 5),
      xax::ShapeError);
  EXPECT_THROW(
      xax::embedding_backward(Eigen::MatrixXf::Ones(4, 2).eval(), std::vector<std::int32_t>{0, 9}, dtable, 5),
      xax::ShapeError);
}

// A one-feature table (1 x vocabulary) gives a 1 x tokens output; a vector type takes it as the adjacent
// elements of that row, and the backward's vector table gradient likewise.
TYPED_TEST(EmbeddingTyped, OneFeatureIntoVectorOutputs) {
  using T = TypeParam;
  Matrix<T> table(1, 3);
  table << static_cast<T>(10.0f), static_cast<T>(20.0f), static_cast<T>(30.0f);
  const std::vector<std::int32_t> tokens{2, 1, 0, 2};
  xax_test::GuardedVector<T> out(4);
  xax::embedding(table, tokens, out.vector);
  EXPECT_TRUE(out.only_vector_written());
  const float expected[] = {30.0f, 20.0f, 10.0f, 30.0f};
  for (Eigen::Index n = 0; n < 4; ++n) EXPECT_EQ(static_cast<float>(out.vector(n)), expected[n]) << n;

  Matrix<T> dout(1, 4);
  dout << static_cast<T>(1.0f), static_cast<T>(2.0f), static_cast<T>(3.0f), static_cast<T>(4.0f);
  xax_test::GuardedVector<T> dtable(3);
  xax::embedding_backward(dout, tokens, dtable.vector, 3);
  EXPECT_TRUE(dtable.only_vector_written());
  EXPECT_EQ(static_cast<float>(dtable.vector(0)), 3.0f);
  EXPECT_EQ(static_cast<float>(dtable.vector(1)), 2.0f);
  EXPECT_EQ(static_cast<float>(dtable.vector(2)), 5.0f);
}

// The output must not share memory with the table (or the gradient with dout): the table itself as the
// output would be resized under the gather, and a table gradient over dout is zeroed before dout is read.
TEST(Embedding, OutputsSharingMemoryWithInputsAreRejected) {
  Eigen::MatrixXf wte = Eigen::MatrixXf::Random(8, 5);
  const Eigen::MatrixXf original = wte;
  const std::vector<std::int32_t> tokens{1, 2, 3};
  EXPECT_THROW(xax::embedding(wte, tokens, wte), xax::ShapeError);
  EXPECT_EQ(wte, original);
  EXPECT_THROW(xax::embedding(wte.leftCols(4), tokens, wte.rightCols(3)), xax::ShapeError);
  EXPECT_THROW(xax::embedding(wte.leftCols(2), std::vector<std::int32_t>{0, 1}, wte.middleCols(1, 2),
                              {.accumulate = true}),
               xax::ShapeError);
  EXPECT_EQ(wte, original);

  std::vector<float> storage(4 * 3, 1.0f);
  const Eigen::Map<const Eigen::MatrixXf> dout(storage.data(), 4, 3);
  Eigen::Map<Eigen::MatrixXf> dtable(storage.data(), 4, 3);
  EXPECT_THROW(xax::embedding_backward(dout, std::vector<std::int32_t>{0, 0, 0}, dtable, 3), xax::ShapeError);
  EXPECT_EQ(storage, std::vector<float>(4 * 3, 1.0f));
}

// A negative vocabulary is a ShapeError, not a resize to a negative size (even with no tokens to check).
TEST(Embedding, NegativeVocabularyIsRejected) {
  const Eigen::MatrixXf dout(4, 0);
  Eigen::MatrixXf dtable;
  EXPECT_THROW(xax::embedding_backward(dout, std::vector<std::int32_t>{}, dtable, -1), xax::ShapeError);
  EXPECT_THROW(xax::embedding_backward(dout, std::vector<std::int32_t>{}, dtable, -1, {.accumulate = true}),
               xax::ShapeError);
}

}  // namespace
