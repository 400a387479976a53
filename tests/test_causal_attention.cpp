// xax::causal_self_attention and its backward: against double references with element-wise error bounds,
// bit for bit against the unfused ops (head copies, batched_matmul, causal_softmax) on one thread, the same
// bits on two threads as on one, operands that are row blocks of one fused projection, and errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <xax/ops/batched_matmul.hpp>
#include <xax/ops/causal_attention.hpp>
#include <xax/ops/causal_softmax.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/threads.hpp>

#include "op_testing.hpp"

namespace {

using xax_test::Matrix;

template <class T>
using Tensor3 = Eigen::Tensor<T, 3>;

// 4 heads of 8 features, 12 sequences of 64 tokens: 48 slices, enough for xax to share them between two
// threads, and several groups of slices per thread.
constexpr Eigen::Index heads = 4, head_size = 8, length = 64, sequences = 12;
constexpr Eigen::Index features = heads * head_size, tokens = length * sequences, slices = heads * sequences;
constexpr xax::AttentionLayout layout{.heads = heads, .sequence_length = length};
const float scale = 0.35355339f;  // 1 / sqrt(head_size)

class ThreadCount {
 public:
  explicit ThreadCount(int threads) : saved_(xax::num_threads()) { xax::set_num_threads(threads); }
  ~ThreadCount() { xax::set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

// Slice s of a features x tokens matrix (head s % heads of sequence s / heads), in double.
template <class M>
Eigen::MatrixXd head(const M& m, Eigen::Index s) {
  return xax_test::to_double(m.block((s % heads) * head_size, (s / heads) * length, head_size, length));
}

template <class T>
Eigen::MatrixXd probs_slice(const Tensor3<T>& probs, Eigen::Index s) {
  return xax_test::to_double(Eigen::Map<const Matrix<T>>(probs.data() + s * length * length, length, length));
}

Eigen::MatrixXd causal_softmax_reference(const Eigen::MatrixXd& scores) {
  Eigen::MatrixXd p = Eigen::MatrixXd::Zero(length, length);
  for (Eigen::Index i = 0; i < length; ++i) {
    const Eigen::ArrayXd v = scale * scores.col(i).head(i + 1).array();
    const Eigen::ArrayXd e = (v - v.maxCoeff()).exp();
    p.col(i).head(i + 1) = e / e.sum();
  }
  return p;
}

// Every element of `actual` within `bound` of `expected`.
template <class M>
::testing::AssertionResult within_bound(const M& actual, const Eigen::MatrixXd& expected,
                                        const Eigen::MatrixXd& bound) {
  const Eigen::MatrixXd a = xax_test::to_double(actual);
  for (Eigen::Index j = 0; j < expected.cols(); ++j) {
    for (Eigen::Index i = 0; i < expected.rows(); ++i) {
      if (!(std::abs(a(i, j) - expected(i, j)) <= bound(i, j))) {
        return ::testing::AssertionFailure()
               << "element (" << i << ", " << j << "): " << a(i, j) << " vs reference " << expected(i, j)
               << " (bound " << bound(i, j) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// The error of a product accumulated in fp32 from exact inputs and rounded once to T: half an ulp of T of
// the result, plus fp32's rounding over the sum of the terms' magnitudes.
template <class T>
Eigen::MatrixXd product_bound(const Eigen::MatrixXd& result, const Eigen::MatrixXd& magnitudes) {
  return 1.01 * xax_test::half_ulp<T>() * result.cwiseAbs() + 1e-6 * magnitudes +
         Eigen::MatrixXd::Constant(result.rows(), result.cols(), 1e-12);
}

// Half the spacing of T's subnormals: the absolute error of rounding a tiny value to T.
template <class T>
double half_subnormal_spacing() {
  if constexpr (std::is_same_v<T, xax::float16>) return std::ldexp(1.0, -25);
  if constexpr (std::is_same_v<T, xax::bfloat16>) return std::ldexp(1.0, -134);
  return std::ldexp(1.0, -150);
}

template <class T>
struct Inputs {
  Matrix<T> qkv = xax_test::random_matrix<T>(3 * features, tokens, 1, -3.0f, 3.0f);
  Matrix<T> dy = xax_test::random_matrix<T>(features, tokens, 2);

  auto q() const { return qkv.topRows(features); }
  auto k() const { return qkv.middleRows(features, features); }
  auto v() const { return qkv.bottomRows(features); }
};

template <class T>
struct Outputs {
  Matrix<T> y;
  Tensor3<T> probs;
  Matrix<T> dqkv = Matrix<T>::Zero(3 * features, tokens);
};

template <class T>
Outputs<T> fused(const Inputs<T>& in) {
  Outputs<T> out;
  xax::causal_self_attention(in.q(), in.k(), in.v(), layout, scale, out.y, out.probs);
  xax::causal_self_attention_backward(in.q(), in.k(), in.v(), out.probs, in.dy, layout, scale,
                                      out.dqkv.topRows(features), out.dqkv.middleRows(features, features),
                                      out.dqkv.bottomRows(features));
  return out;
}

// The same computation as the char GPT wrote it before the fused op: heads copied out to 3-D tensors,
// batched products, the causal softmax, and the heads copied back.
template <class T>
Outputs<T> unfused(const Inputs<T>& in) {
  const auto split = [](const auto& m) {
    Tensor3<T> t(head_size, length, slices);
    for (Eigen::Index s = 0; s < slices; ++s) {
      Eigen::Map<Matrix<T>>(t.data() + s * head_size * length, head_size, length) =
          m.block((s % heads) * head_size, (s / heads) * length, head_size, length);
    }
    return t;
  };
  const auto merge = [](const Tensor3<T>& t, auto&& m) {
    for (Eigen::Index s = 0; s < slices; ++s) {
      m.block((s % heads) * head_size, (s / heads) * length, head_size, length) =
          Eigen::Map<const Matrix<T>>(t.data() + s * head_size * length, head_size, length);
    }
  };
  const Tensor3<T> q = split(in.q()), k = split(in.k()), v = split(in.v()), dy = split(in.dy);
  Outputs<T> out;
  Tensor3<float> scores, dprobs;
  Tensor3<T> y, dscores, dq, dk, dv;
  xax::batched_matmul(k, q, scores, {.transpose_a = true});
  xax::causal_softmax(scores, out.probs, scale);
  xax::batched_matmul(v, out.probs, y);
  out.y.resize(features, tokens);
  merge(y, out.y);
  xax::batched_matmul(dy, out.probs, dv, {.transpose_b = true});
  xax::batched_matmul(v, dy, dprobs, {.transpose_a = true});
  xax::causal_softmax_backward(out.probs, dprobs, dscores, scale);
  xax::batched_matmul(q, dscores, dk, {.transpose_b = true});
  xax::batched_matmul(k, dscores, dq);
  merge(dq, out.dqkv.topRows(features));
  merge(dk, out.dqkv.middleRows(features, features));
  merge(dv, out.dqkv.bottomRows(features));
  return out;
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}

template <class T>
class CausalAttentionTyped : public ::testing::Test {};
TYPED_TEST_SUITE(CausalAttentionTyped, xax_test::Scalars);

TYPED_TEST(CausalAttentionTyped, ForwardMatchesTheDoubleReference) {
  using T = TypeParam;
  const Inputs<T> in;
  Matrix<T> y;
  Tensor3<T> probs;
  xax::causal_self_attention(in.q(), in.k(), in.v(), layout, scale, y, probs);
  ASSERT_EQ(probs.dimension(0), length);
  ASSERT_EQ(probs.dimension(1), length);
  ASSERT_EQ(probs.dimension(2), slices);
  for (Eigen::Index s = 0; s < slices; ++s) {
    const Eigen::MatrixXd q = head(in.q(), s), k = head(in.k(), s), v = head(in.v(), s);
    const Eigen::MatrixXd p = probs_slice(probs, s);
    // The scores are exact products of T inputs accumulated in fp32: their error is far below the one
    // rounding of the probabilities to T.
    EXPECT_TRUE(xax_test::near_reference(p, causal_softmax_reference(k.transpose() * q),
                                         1.01 * xax_test::half_ulp<T>() + 1e-5, 1e-7))
        << "slice " << s;
    for (Eigen::Index i = 0; i < length; ++i) {
      for (Eigen::Index j = i + 1; j < length; ++j) ASSERT_EQ(p(j, i), 0.0) << "slice " << s;
    }
    // Y = V P from the probabilities as stored.
    const Eigen::MatrixXd expected = v * p;
    EXPECT_TRUE(within_bound(head(y, s), expected, product_bound<T>(expected, v.cwiseAbs() * p.cwiseAbs())))
        << "slice " << s;
  }
}

TYPED_TEST(CausalAttentionTyped, BackwardMatchesTheDoubleReference) {
  using T = TypeParam;
  const Inputs<T> in;
  Matrix<T> y;
  Tensor3<T> probs;
  xax::causal_self_attention(in.q(), in.k(), in.v(), layout, scale, y, probs);
  // Gradients in fp32, as a trainer asking for fp32 gradients of 16-bit parameters writes them.
  Eigen::MatrixXf dq, dk, dv;
  xax::causal_self_attention_backward(in.q(), in.k(), in.v(), probs, in.dy, layout, scale, dq, dk, dv);
  for (Eigen::Index s = 0; s < slices; ++s) {
    const Eigen::MatrixXd q = head(in.q(), s), k = head(in.k(), s), v = head(in.v(), s), dy = head(in.dy, s);
    const Eigen::MatrixXd p = probs_slice(probs, s);
    const Eigen::MatrixXd expected_dv = dy * p.transpose();
    EXPECT_TRUE(within_bound(head(dv, s), expected_dv,
                             product_bound<float>(expected_dv, dy.cwiseAbs() * p.cwiseAbs().transpose())))
        << "dv, slice " << s;
    // dS carries two errors into the last two products: dP's fp32 accumulation, which the subtraction of
    // the column's mean makes absolute (bounded here by 1e-5 of the terms' magnitudes), and its one rounding
    // to T, which for float16 is absolute below 2^-14 (subnormals; unscaled gradients of unlikely keys land
    // there). They reach dK and dQ through |Q| and |K|.
    const Eigen::MatrixXd dp = v.transpose() * dy, dp_terms = v.cwiseAbs().transpose() * dy.cwiseAbs();
    Eigen::MatrixXd ds(length, length), ds_error(length, length);
    for (Eigen::Index i = 0; i < length; ++i) {
      ds.col(i) = scale * p.col(i).array() * (dp.col(i).array() - p.col(i).dot(dp.col(i)));
      ds_error.col(i) =
          scale * p.col(i).array() * 1e-5 * (dp_terms.col(i).array() + p.col(i).dot(dp_terms.col(i))) +
          1.01 * xax_test::half_ulp<T>() * ds.col(i).array().abs() +
          (p.col(i).array() > 0.0).cast<double>() * half_subnormal_spacing<T>();
    }
    const Eigen::MatrixXd expected_dk = q * ds.transpose(), expected_dq = k * ds;
    EXPECT_TRUE(within_bound(head(dk, s), expected_dk,
                             product_bound<float>(expected_dk, q.cwiseAbs() * ds.cwiseAbs().transpose()) +
                                 q.cwiseAbs() * ds_error.transpose()))
        << "dk, slice " << s;
    EXPECT_TRUE(within_bound(
        head(dq, s), expected_dq,
        product_bound<float>(expected_dq, k.cwiseAbs() * ds.cwiseAbs()) + k.cwiseAbs() * ds_error))
        << "dq, slice " << s;
  }
}

// Where xax's AVX2 GEMM runs the unfused ops' 16-bit products (no native half dot product, no AVX-512), the
// fused op's products still run as fp32 primitives on whole groups: the same fp32 accumulation, in another
// order, so an output may round to a neighbouring value of T (and carry that into the backward's products).
// There the outputs must agree to a few units in the last place of T instead of bit for bit.
template <class M>
::testing::AssertionResult within_a_few_ulps(const M& actual, const M& expected) {
  using T = typename M::Scalar;
  const auto as_column = [](const M& m) {
    return Eigen::Map<const Matrix<T>>(m.data(), static_cast<Eigen::Index>(m.size()), 1);
  };
  const Eigen::MatrixXd reference = xax_test::to_double(as_column(expected));
  const double ulp = 2 * xax_test::half_ulp<T>();
  return xax_test::near_reference(as_column(actual), reference, 4 * ulp,
                                  4 * ulp * reference.cwiseAbs().maxCoeff());
}

TYPED_TEST(CausalAttentionTyped, OneThreadGivesTheBitsOfTheUnfusedOps) {
  using T = TypeParam;
  const ThreadCount one(1);
  const Inputs<T> in;
  const Outputs<T> expected = unfused(in);
  const Outputs<T> actual = fused(in);
  if (xax::detail::packing_gemm::runs_products_of(xax::dtype_of<T>, xax::cpu_features()) &&
      xax::detail::widens_products<T>()) {
    EXPECT_TRUE(within_a_few_ulps(actual.probs, expected.probs));
    EXPECT_TRUE(within_a_few_ulps(actual.y, expected.y));
    EXPECT_TRUE(within_a_few_ulps(actual.dqkv, expected.dqkv));
    return;
  }
  EXPECT_TRUE(same_bits(actual.probs, expected.probs));
  EXPECT_TRUE(same_bits(actual.y, expected.y));
  EXPECT_TRUE(same_bits(actual.dqkv, expected.dqkv));
}

TYPED_TEST(CausalAttentionTyped, TwoThreadsGiveTheBitsOfOne) {
  using T = TypeParam;
  const Inputs<T> in;
  Outputs<T> one_thread, two_threads;
  {
    const ThreadCount one(1);
    one_thread = fused(in);
  }
  {
    const ThreadCount two(2);
    two_threads = fused(in);
  }
  EXPECT_TRUE(same_bits(two_threads.probs, one_thread.probs));
  EXPECT_TRUE(same_bits(two_threads.y, one_thread.y));
  EXPECT_TRUE(same_bits(two_threads.dqkv, one_thread.dqkv));
}

TEST(CausalAttention, FewLongSequencesRunEachProductOnEveryThread) {
  // 2 slices on 2 threads: too few to share out, so the groups run one after another.
  const ThreadCount two(2);
  constexpr Eigen::Index long_length = 200, long_features = 16;
  const Matrix<float> qkv = xax_test::random_matrix<float>(3 * long_features, long_length, 10);
  Matrix<float> y;
  Tensor3<float> probs;
  xax::causal_self_attention(qkv.topRows(long_features), qkv.middleRows(long_features, long_features),
                             qkv.bottomRows(long_features), {.heads = 2, .sequence_length = long_length},
                             0.5f, y, probs);
  for (Eigen::Index h = 0; h < 2; ++h) {
    const Eigen::MatrixXd q = xax_test::to_double(qkv.block(h * 8, 0, 8, long_length));
    const Eigen::MatrixXd k = xax_test::to_double(qkv.block(long_features + h * 8, 0, 8, long_length));
    const Eigen::MatrixXd v = xax_test::to_double(qkv.block(2 * long_features + h * 8, 0, 8, long_length));
    const Eigen::MatrixXd s = 0.5 * k.transpose() * q;
    Eigen::MatrixXd p = Eigen::MatrixXd::Zero(long_length, long_length);
    for (Eigen::Index i = 0; i < long_length; ++i) {
      const Eigen::ArrayXd e = (s.col(i).head(i + 1).array() - s.col(i).head(i + 1).maxCoeff()).exp();
      p.col(i).head(i + 1) = e / e.sum();
    }
    EXPECT_TRUE(xax_test::near_reference(y.block(h * 8, 0, 8, long_length), v * p, 1e-5, 1e-5))
        << "head " << h;
  }
}

TEST(CausalAttention, SequencesOfOneTokenAttendToThemselves) {
  const Matrix<float> q = xax_test::random_matrix<float>(6, 5, 3),
                      k = xax_test::random_matrix<float>(6, 5, 4),
                      v = xax_test::random_matrix<float>(6, 5, 5);
  Matrix<float> y;
  Tensor3<float> probs;
  xax::causal_self_attention(q, k, v, {.heads = 2, .sequence_length = 1}, 1.0f, y, probs);
  EXPECT_EQ(probs.dimension(2), 10);
  for (Eigen::Index i = 0; i < probs.size(); ++i) EXPECT_EQ(probs.data()[i], 1.0f);
  EXPECT_EQ(y, v);
}

TEST(CausalAttention, NoTokensGiveEmptyOutputs) {
  const Matrix<float> q(8, 0);
  Matrix<float> y;
  Tensor3<float> probs;
  xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 4}, 1.0f, y, probs);
  EXPECT_EQ(y.rows(), 8);
  EXPECT_EQ(y.cols(), 0);
  EXPECT_EQ(probs.dimension(2), 0);
}

TEST(CausalAttention, BadShapesAndLayoutsSayWhatIsAccepted) {
  const Matrix<float> q = xax_test::random_matrix<float>(12, 16, 6);
  Matrix<float> y;
  Tensor3<float> probs;
  const auto message_of = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const xax::Error& error) {
      return error.what();
    }
    return "no error";
  };
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 5, .sequence_length = 4}, 1.0f, y, probs),
               xax::ShapeError);
  EXPECT_NE(message_of([&] {
              xax::causal_self_attention(q, q, q, {.heads = 5, .sequence_length = 4}, 1.0f, y, probs);
            }).find("multiple of the heads"),
            std::string::npos);
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 5}, 1.0f, y, probs),
               xax::ShapeError);
  EXPECT_THROW(
      xax::causal_self_attention(q, q.leftCols(8), q, {.heads = 2, .sequence_length = 4}, 1.0f, y, probs),
      xax::ShapeError);
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 0, .sequence_length = 4}, 1.0f, y, probs),
               xax::ConfigError);
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 0}, 1.0f, y, probs),
               xax::ConfigError);
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 4}, 0.0f, y, probs),
               xax::ConfigError);
  EXPECT_THROW(xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 4},
                                          std::numeric_limits<float>::quiet_NaN(), y, probs),
               xax::ConfigError);

  xax::causal_self_attention(q, q, q, {.heads = 2, .sequence_length = 4}, 1.0f, y, probs);
  Matrix<float> dq, dk, dv;
  const Matrix<float> dy = xax_test::random_matrix<float>(12, 16, 7);
  EXPECT_THROW(xax::causal_self_attention_backward(q, q, q, probs, dy.leftCols(8),
                                                   {.heads = 2, .sequence_length = 4}, 1.0f, dq, dk, dv),
               xax::ShapeError);
  EXPECT_NE(message_of([&] {
              xax::causal_self_attention_backward(q, q, q, probs, dy, {.heads = 3, .sequence_length = 4},
                                                  1.0f, dq, dk, dv);
            }).find("pass the ones causal_self_attention wrote"),
            std::string::npos);
}

TEST(CausalAttention, OutputsSharingStorageWithOperandsAreRefused) {
  Matrix<float> qkv = xax_test::random_matrix<float>(24, 16, 8);
  const xax::AttentionLayout small{.heads = 2, .sequence_length = 4};
  Tensor3<float> probs;
  const Matrix<float> before = qkv;
  // Writing y over v would overwrite values the later slices still read.
  EXPECT_THROW(xax::causal_self_attention(qkv.topRows(8), qkv.middleRows(8, 8), qkv.bottomRows(8), small,
                                          1.0f, qkv.bottomRows(8), probs),
               xax::Error);
  EXPECT_EQ(qkv, before);

  Matrix<float> y;
  xax::causal_self_attention(qkv.topRows(8), qkv.middleRows(8, 8), qkv.bottomRows(8), small, 1.0f, y, probs);
  Matrix<float> grads = Matrix<float>::Zero(16, 16);
  const Matrix<float> dy = xax_test::random_matrix<float>(8, 16, 9);
  // dq and dk overlapping: rows 4..11 of one matrix would hold both.
  EXPECT_THROW(xax::causal_self_attention_backward(qkv.topRows(8), qkv.middleRows(8, 8), qkv.bottomRows(8),
                                                   probs, dy, small, 1.0f, grads.topRows(8),
                                                   grads.middleRows(4, 8), grads.bottomRows(8)),
               xax::Error);
  // A gradient written over an input.
  EXPECT_THROW(
      xax::causal_self_attention_backward(qkv.topRows(8), qkv.middleRows(8, 8), qkv.bottomRows(8), probs, dy,
                                          small, 1.0f, grads.topRows(8), grads.bottomRows(8), qkv.topRows(8)),
      xax::Error);
  EXPECT_EQ(qkv, before);
}

// The output and the probabilities against each other before either is resized: a plain one of them was
// freed by its resize while the other still pointed into it (a write after free).
TEST(CausalAttention, AnOutputInsideTheOtherOutputsStorageIsRefusedBeforeAnyResize) {
  const xax::AttentionLayout one_head{.heads = 1, .sequence_length = 8};
  const Matrix<float> q = xax_test::random_matrix<float>(4, 8, 61),
                      k = xax_test::random_matrix<float>(4, 8, 62),
                      v = xax_test::random_matrix<float>(4, 8, 63);
  Tensor3<float> probs(100, 1, 1);  // to be resized to 8 x 8 x 1
  Eigen::Map<Matrix<float>> y_in_probs(probs.data(), 4, 8);
  EXPECT_THAT([&] { xax::causal_self_attention(q, k, v, one_head, 0.5f, y_in_probs, probs); },
              ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("the output shares memory")));
  EXPECT_EQ(probs.dimension(0), 100) << "nothing resized";
  Matrix<float> y(10, 10);  // to be resized to 4 x 8
  Eigen::TensorMap<Tensor3<float>> probs_in_y(y.data(), 8, 8, 1);
  EXPECT_THROW(xax::causal_self_attention(q, k, v, one_head, 0.5f, y, probs_in_y), xax::ShapeError);
  EXPECT_EQ(y.rows(), 10) << "nothing resized";
}

// One empty matrix as two gradients has no storage to overlap until it is resized: it would be resized twice,
// dk's writes landing in dv's buffer. The outputs are compared again once all are resized.
TEST(CausalAttention, OneObjectAsTwoGradientsIsRefused) {
  const xax::AttentionLayout one_head{.heads = 1, .sequence_length = 8};
  const Matrix<float> q = xax_test::random_matrix<float>(4, 8, 64),
                      k = xax_test::random_matrix<float>(4, 8, 65),
                      v = xax_test::random_matrix<float>(4, 8, 66),
                      dy = xax_test::random_matrix<float>(4, 8, 67);
  Matrix<float> y;
  Tensor3<float> probs;
  xax::causal_self_attention(q, k, v, one_head, 0.5f, y, probs);
  Matrix<float> dq, same;
  EXPECT_THAT(
      [&] { xax::causal_self_attention_backward(q, k, v, probs, dy, one_head, 0.5f, dq, same, same); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("dk shares memory with dv")));
  EXPECT_THAT(
      [&] { xax::causal_self_attention_backward(q, k, v, probs, dy, one_head, 0.5f, same, dq, same); },
      ::testing::ThrowsMessage<xax::ShapeError>(::testing::HasSubstr("dq shares memory with dv")));
}

// One feature (one head of size 1) into vector outputs: a 1 x tokens result, which a vector type takes as
// adjacent elements; it must equal the result in a plain matrix.
TYPED_TEST(CausalAttentionTyped, OneFeatureIntoVectorOutputs) {
  using T = TypeParam;
  const xax::AttentionLayout one_feature{.heads = 1, .sequence_length = 4};
  const Matrix<T> q = xax_test::random_matrix<T>(1, 8, 51), k = xax_test::random_matrix<T>(1, 8, 52),
                  v = xax_test::random_matrix<T>(1, 8, 53), dy = xax_test::random_matrix<T>(1, 8, 54);
  Matrix<T> y;
  Tensor3<T> probs, probs_vector;
  xax::causal_self_attention(q, k, v, one_feature, 1.0f, y, probs);
  xax_test::GuardedVector<T> y_vector(8);
  xax::causal_self_attention(q, k, v, one_feature, 1.0f, y_vector.vector, probs_vector);
  EXPECT_TRUE(y_vector.only_vector_written());
  for (Eigen::Index n = 0; n < 8; ++n)
    EXPECT_EQ(static_cast<float>(y_vector.vector(n)), static_cast<float>(y(0, n)));

  Matrix<T> dq, dk, dv;
  xax::causal_self_attention_backward(q, k, v, probs, dy, one_feature, 1.0f, dq, dk, dv);
  xax_test::GuardedVector<T> dq_vector(8), dk_vector(8), dv_vector(8);
  xax::causal_self_attention_backward(q, k, v, probs, dy, one_feature, 1.0f, dq_vector.vector,
                                      dk_vector.vector, dv_vector.vector);
  EXPECT_TRUE(dq_vector.only_vector_written());
  EXPECT_TRUE(dk_vector.only_vector_written());
  EXPECT_TRUE(dv_vector.only_vector_written());
  for (Eigen::Index n = 0; n < 8; ++n) {
    EXPECT_EQ(static_cast<float>(dq_vector.vector(n)), static_cast<float>(dq(0, n)));
    EXPECT_EQ(static_cast<float>(dk_vector.vector(n)), static_cast<float>(dk(0, n)));
    EXPECT_EQ(static_cast<float>(dv_vector.vector(n)), static_cast<float>(dv(0, n)));
  }
}

}  // namespace
