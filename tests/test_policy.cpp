#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#include <xax/utils/policy.hpp>

namespace {

using ::testing::HasSubstr;
using xax::DType;
using xax::PolicySpec;

constexpr DType f16 = DType::float16;
constexpr DType bf16 = DType::bfloat16;
constexpr DType f32 = DType::float32;
constexpr DType f64 = DType::float64;

TEST(GetPolicy, Presets) {
  EXPECT_EQ(xax::get_policy("default"), (PolicySpec{f32, f32, f32}));
  EXPECT_EQ(xax::get_policy("mixed"), (PolicySpec{f32, xax::half_dtype(), f32}));
  EXPECT_EQ(xax::get_policy("float16"), (PolicySpec{f16, f16, f16}));
  const DType half = xax::half_dtype();
  EXPECT_EQ(xax::get_policy("half"), (PolicySpec{half, half, half}));
}

TEST(GetPolicy, SingleDtypeNameSetsAllThree) {
  EXPECT_EQ(xax::get_policy("bf16"), (PolicySpec{bf16, bf16, bf16}));
  EXPECT_EQ(xax::get_policy("f32"), (PolicySpec{f32, f32, f32}));
  EXPECT_EQ(xax::get_policy("full"), (PolicySpec{f32, f32, f32}));
  EXPECT_EQ(xax::get_policy("float64"), (PolicySpec{f64, f64, f64}));
}

TEST(GetPolicy, SeedCustomPolicy) {
  EXPECT_EQ(xax::get_policy("params=float32,compute=bfloat16,output=float32"), (PolicySpec{f32, bf16, f32}));
}

TEST(GetPolicy, ShortAndLongKeys) {
  EXPECT_EQ(xax::get_policy("p=f16,c=bf16,o=f64"), (PolicySpec{f16, bf16, f64}));
  EXPECT_EQ(xax::get_policy("output=f16,params=f64,compute=f32"), (PolicySpec{f64, f32, f16}));
}

TEST(GetPolicy, MissingParamsIsFloat32) {
  EXPECT_EQ(xax::get_policy("c=bf16,o=f16"), (PolicySpec{f32, bf16, f16}));
}

TEST(GetPolicy, MissingComputeIsParams) {
  EXPECT_EQ(xax::get_policy("p=f16,o=f32"), (PolicySpec{f16, f16, f32}));
}

TEST(GetPolicy, MissingOutputIsCompute) {
  EXPECT_EQ(xax::get_policy("p=f32,c=bf16"), (PolicySpec{f32, bf16, bf16}));
  EXPECT_EQ(xax::get_policy("p=f64"), (PolicySpec{f64, f64, f64}));
  EXPECT_EQ(xax::get_policy("c=half"), (PolicySpec{f32, xax::half_dtype(), xax::half_dtype()}));
}

TEST(GetPolicy, LastDuplicateKeyWins) {
  EXPECT_EQ(xax::get_policy("c=f16,compute=bf16"), (PolicySpec{f32, bf16, bf16}));
  EXPECT_EQ(xax::get_policy("p=f16,p=f64"), (PolicySpec{f64, f64, f64}));
}

TEST(GetPolicy, StrRoundTrips) {
  for (const char* text : {"default", "mixed", "float16", "half", "p=f16,c=bf16,o=f64", "c=bf16"}) {
    const PolicySpec spec = xax::get_policy(text);
    EXPECT_EQ(xax::get_policy(spec.str()), spec) << text;
  }
  EXPECT_EQ((PolicySpec{f32, bf16, f32}).str(), "params=float32,compute=bfloat16,output=float32");
}

struct BadPolicy {
  const char* text;
  const char* quoted;  // what the message must quote
};

class GetPolicyErrors : public ::testing::TestWithParam<BadPolicy> {};

TEST_P(GetPolicyErrors, ThrowConfigErrorQuotingTheTokenAndListingTheGrammar) {
  const BadPolicy bad = GetParam();
  try {
    (void)xax::get_policy(bad.text);
    FAIL() << "accepted \"" << bad.text << "\"";
  } catch (const xax::ConfigError& error) {
    EXPECT_THAT(error.what(), HasSubstr(bad.quoted));
    EXPECT_THAT(error.what(), HasSubstr("p|params, c|compute, o|output"));
    EXPECT_THAT(error.what(), HasSubstr("default, mixed, float16, half"));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grammar, GetPolicyErrors,
    ::testing::Values(BadPolicy{"", "the string is empty"}, BadPolicy{"Mixed", "'Mixed'"},
                      BadPolicy{"fp32", "'fp32'"}, BadPolicy{"params = float32", "unknown dtype ' float32'"},
                      BadPolicy{"params =float32", "unknown key 'params '"},
                      BadPolicy{"p=f32, c=bf16", "unknown key ' c'"}, BadPolicy{"q=f32", "unknown key 'q'"},
                      BadPolicy{"p=f33", "unknown dtype 'f33'"}, BadPolicy{"p=", "unknown dtype ''"},
                      BadPolicy{"=f32", "unknown key ''"}, BadPolicy{"p=f32,", "empty key=dtype pair"},
                      BadPolicy{",p=f32", "empty key=dtype pair"},
                      BadPolicy{"p=f32,,c=f16", "empty key=dtype pair"},
                      BadPolicy{"p=f32=f16", "'p=f32=f16' is not a single key=dtype pair"},
                      BadPolicy{"p=f32,c", "'c' is not a single key=dtype pair"}));

TEST(VisitPolicy, CallsTheMatchingCompileTimePolicy) {
  for (const char* text : {"default", "mixed", "float16", "p=f64,c=bf16,o=f16", "c=f16"}) {
    const PolicySpec spec = xax::get_policy(text);
    const PolicySpec seen = xax::visit_policy(spec, []<class P>(P) { return P::spec(); });
    EXPECT_EQ(seen, spec) << text;
  }
}

TEST(VisitPolicy, ReachesAllSixtyFourCombinations) {
  int visited = 0;
  for (const DType p : xax::all_dtypes) {
    for (const DType c : xax::all_dtypes) {
      for (const DType o : xax::all_dtypes) {
        xax::visit_policy(PolicySpec{p, c, o}, [&]<class P>(P) {
          EXPECT_EQ(xax::dtype_of<typename P::param_type>, p);
          EXPECT_EQ(xax::dtype_of<typename P::compute_type>, c);
          EXPECT_EQ(xax::dtype_of<typename P::output_type>, o);
          ++visited;
        });
      }
    }
  }
  EXPECT_EQ(visited, 64);
}

TEST(VisitPolicy, RejectsAnOutOfRangeDtype) {
  const PolicySpec bad{static_cast<DType>(42), f32, f32};
  EXPECT_THROW(xax::visit_policy(bad, [](auto) {}), xax::ConfigError);
}

using MixedAndDefault = xax::PolicyList<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>,
                                        xax::Policy<float, xax::float16, float>>;

TEST(VisitListedPolicy, CallsTheListedPolicyEqualToTheSpec) {
  for (const PolicySpec spec :
       {PolicySpec{f32, f32, f32}, PolicySpec{f32, bf16, f32}, PolicySpec{f32, f16, f32}}) {
    const PolicySpec seen = xax::visit_policy<MixedAndDefault>(spec, []<class P>(P) { return P::spec(); });
    EXPECT_EQ(seen, spec);
  }
}

TEST(VisitListedPolicy, CompilesTheListedPoliciesAlone) {
  // A callable that does not compile for double params: visit_policy<List> must never instantiate it there.
  const auto float_params_only = []<class P>(P) {
    static_assert(!std::is_same_v<typename P::param_type, double>);
    return 1;
  };
  EXPECT_EQ(xax::visit_policy<MixedAndDefault>(PolicySpec{f32, bf16, f32}, float_params_only), 1);
}

TEST(VisitListedPolicy, RejectsAnUnlistedSpecNamingItAndTheListed) {
  int calls = 0;
  try {
    // float16 output is not listed, though its params and compute are.
    xax::visit_policy<MixedAndDefault>(PolicySpec{f32, f16, f16}, [&](auto) { ++calls; });
    FAIL() << "expected ConfigError";
  } catch (const xax::ConfigError& error) {
    EXPECT_STREQ(
        error.what(),
        "precision policy params=float32,compute=float16,output=float16 is not one of the listed "
        "policies; accepted: params=float32,compute=float32,output=float32 | "
        "params=float32,compute=bfloat16,output=float32 | params=float32,compute=float16,output=float32");
  }
  EXPECT_EQ(calls, 0);
}

TEST(VisitListedPolicy, TheFirstOfRepeatedPoliciesIsCalledOnce) {
  int calls = 0;
  xax::visit_policy<xax::PolicyList<xax::Policy<float>, xax::Policy<float>>>(PolicySpec{f32, f32, f32},
                                                                             [&](auto) { ++calls; });
  EXPECT_EQ(calls, 1);
}

static_assert(xax::policy_list<MixedAndDefault>);
static_assert(!xax::policy_list<xax::PolicyList<>>, "an empty list would reject every policy");
static_assert(!xax::policy_list<xax::Policy<float>>);
static_assert(!xax::policy_list<std::tuple<xax::Policy<float>>>);

// ------------------------------------------------------------------------------------------------------------
// Compile-time policies over trees, typed across the compute precisions.

template <class T>
struct Dense {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  Eigen::Matrix<T, Eigen::Dynamic, 1> b;
  XAX_FIELDS(w, b);
};

template <class T>
struct Model {
  std::vector<Dense<T>> layers;
  Eigen::Matrix<int, Eigen::Dynamic, 1> vocabulary_ids;  // integer leaves are never cast
  std::int64_t step = 0;
  XAX_FIELDS(layers, vocabulary_ids, step);
};

Model<float> make_model() {
  Model<float> model;
  model.layers.resize(2);
  model.layers[0].w = Eigen::MatrixXf::Random(3, 4);
  model.layers[0].b = Eigen::VectorXf::LinSpaced(3, -1.0f, 1.0f);
  model.layers[1].w = Eigen::MatrixXf::Random(2, 3) * 1000.0f;
  model.layers[1].b = Eigen::VectorXf::Constant(2, 0.1f);
  model.vocabulary_ids = Eigen::VectorXi::LinSpaced(5, 0, 4);
  model.step = 7;
  return model;
}

template <class T>
class PolicyCasts : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, xax::bfloat16, xax::float16>;
TYPED_TEST_SUITE(PolicyCasts, ComputeTypes);

TYPED_TEST(PolicyCasts, CastToComputeRebindsFloatingLeavesOnly) {
  using P = xax::Policy<float, TypeParam, float>;
  const Model<float> model = make_model();
  const auto compute = P::cast_to_compute(model);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(compute)>, Model<TypeParam>>);
  static_assert(std::is_same_v<decltype(compute.vocabulary_ids), Eigen::Matrix<int, Eigen::Dynamic, 1>>);
  EXPECT_EQ(compute.vocabulary_ids, model.vocabulary_ids);
  EXPECT_EQ(compute.step, 7);
  for (std::size_t l = 0; l < model.layers.size(); ++l) {
    const auto& w = model.layers[l].w;
    ASSERT_EQ(compute.layers[l].w.rows(), w.rows());
    ASSERT_EQ(compute.layers[l].w.cols(), w.cols());
    for (Eigen::Index i = 0; i < w.size(); ++i) {
      EXPECT_EQ(static_cast<float>(compute.layers[l].w.data()[i]),
                static_cast<float>(TypeParam(w.data()[i])));
    }
  }
}

TYPED_TEST(PolicyCasts, ParamOutputAndBackAreConsistent) {
  using P = xax::Policy<float, TypeParam, float>;
  const Model<float> model = make_model();
  const auto compute = P::cast_to_compute(model);
  const Model<float> back = P::cast_to_param(compute);
  const Model<float> output = P::cast_to_output(compute);
  for (std::size_t l = 0; l < model.layers.size(); ++l) {
    EXPECT_EQ(back.layers[l].w, output.layers[l].w);
    for (Eigen::Index i = 0; i < model.layers[l].w.size(); ++i) {
      EXPECT_EQ(back.layers[l].w.data()[i], static_cast<float>(TypeParam(model.layers[l].w.data()[i])));
    }
  }
}

TYPED_TEST(PolicyCasts, WithOutputTypeReplacesOnlyTheOutput) {
  using P = xax::Policy<double, TypeParam, float>;
  using Q = typename P::template with_output_type<xax::bfloat16>;
  static_assert(std::is_same_v<Q, xax::Policy<double, TypeParam, xax::bfloat16>>);
  EXPECT_EQ(Q::spec().output, DType::bfloat16);
  EXPECT_EQ(Q::spec().param, DType::float64);
}

TEST(Policy, DefaultsFollowJmp) {
  static_assert(std::is_same_v<xax::Policy<float>, xax::Policy<float, float, float>>);
  static_assert(
      std::is_same_v<xax::Policy<float, xax::bfloat16>, xax::Policy<float, xax::bfloat16, xax::bfloat16>>);
  static_assert(xax::precision_policy<xax::Policy<float, xax::float16, float>>);
  EXPECT_EQ((xax::Policy<float, xax::bfloat16, float>::spec()), (PolicySpec{f32, bf16, f32}));
}

TEST(Policy, CastsScalarsAndMapsToo) {
  using P = xax::Policy<float, xax::bfloat16>;
  std::map<std::string, float> scalars{{"lr", 1.0f / 3.0f}, {"momentum", 0.9f}};
  const auto compute = P::cast_to_compute(scalars);
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(compute)>, std::map<std::string, xax::bfloat16>>);
  EXPECT_EQ(static_cast<float>(compute.at("lr")), static_cast<float>(xax::bfloat16(1.0f / 3.0f)));
}

}  // namespace
