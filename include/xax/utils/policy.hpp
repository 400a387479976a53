#pragma once
/// \file
/// Precision policies: which dtype parameters are stored in, which the forward/backward pass computes in, and
/// which outputs are returned in (jmp's Policy). The compile-time `Policy<P, C, O>` does the casting; the
/// runtime `PolicySpec` is parsed from strings such as "mixed" or
/// "params=float32,compute=bfloat16,output=float32", and `visit_policy` turns one into the other.

#include <concepts>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>

namespace xax {

/// The runtime description of a policy.
struct PolicySpec {
  DType param = DType::float32;
  DType compute = DType::float32;
  DType output = DType::float32;

  friend bool operator==(const PolicySpec&, const PolicySpec&) = default;

  /// "params=float32,compute=bfloat16,output=float32": parses back to the same spec with get_policy().
  [[nodiscard]] std::string str() const {
    std::string out = "params=";
    out += dtype_name(param);
    out += ",compute=";
    out += dtype_name(compute);
    out += ",output=";
    out += dtype_name(output);
    return out;
  }
};

/// A compile-time precision policy: `Policy<float, bfloat16, float>` keeps fp32 parameters, computes in bf16
/// and returns fp32 outputs. The casts convert floating leaves of any tree and leave integer leaves
/// untouched.
template <floating_scalar Param, floating_scalar Compute = Param, floating_scalar Output = Compute>
struct Policy {
  using param_type = Param;
  using compute_type = Compute;
  using output_type = Output;

  /// The same policy with only the output type replaced.
  template <floating_scalar NewOutput>
  using with_output_type = Policy<Param, Compute, NewOutput>;

  template <class Tree>
  static rebind_scalar_t<Tree, Param> cast_to_param(const Tree& tree) {
    return tree_cast<Param>(tree);
  }
  template <class Tree>
  static rebind_scalar_t<Tree, Compute> cast_to_compute(const Tree& tree) {
    return tree_cast<Compute>(tree);
  }
  template <class Tree>
  static rebind_scalar_t<Tree, Output> cast_to_output(const Tree& tree) {
    return tree_cast<Output>(tree);
  }

  /// The runtime description of this policy.
  static constexpr PolicySpec spec() { return {dtype_of<Param>, dtype_of<Compute>, dtype_of<Output>}; }
};

/// A type with the interface of xax::Policy: the three scalar types and the three casts.
template <class P>
concept precision_policy = requires {
  typename P::param_type;
  typename P::compute_type;
  typename P::output_type;
  { P::spec() } -> std::same_as<PolicySpec>;
}
&&floating_scalar<typename P::param_type>&& floating_scalar<typename P::compute_type>&&
    floating_scalar<typename P::output_type>;

namespace detail {

inline constexpr std::string_view policy_grammar_help =
    "accepted: a preset (default, mixed, float16, half), one dtype name for all three (bf16, bfloat16, f16, "
    "float16, full, f32, float32, f64, float64, half), or comma-separated key=dtype pairs with keys "
    "p|params, "
    "c|compute, o|output, e.g. \"params=float32,compute=bfloat16,output=float32\" (case-sensitive, no "
    "spaces)";

inline ConfigError policy_error(std::string_view policy, std::string_view problem) {
  std::string message = "invalid precision policy \"";
  message += policy;
  message += "\": ";
  message += problem;
  message += "; ";
  message += policy_grammar_help;
  return ConfigError(message);
}

inline DType parse_policy_dtype(std::string_view policy, std::string_view token) {
  try {
    return parse_dtype(token);
  } catch (const ConfigError&) {
    throw policy_error(policy, "unknown dtype '" + std::string(token) + "'");
  }
}

}  // namespace detail

/// Parses a policy string (jmp's grammar, xax's presets):
/// - without '=': a preset (`default` all float32; `mixed` float32 params and output, half_dtype() compute;
///   `float16` all float16; `half` all half_dtype()) or one dtype name for all three;
/// - with '=': comma-separated `key=dtype` pairs, keys `p|params`, `c|compute`, `o|output`; a missing params
/// is
///   float32, a missing compute is params, a missing output is compute; the last duplicate wins.
/// Throws ConfigError quoting the bad token and listing what is accepted.
inline PolicySpec get_policy(std::string_view policy) {
  if (policy.find('=') == std::string_view::npos) {
    if (policy == "default") return {DType::float32, DType::float32, DType::float32};
    if (policy == "mixed") return {DType::float32, half_dtype(), DType::float32};
    if (policy.empty()) throw detail::policy_error(policy, "the string is empty");
    try {
      const DType dtype = parse_dtype(policy);
      return {dtype, dtype, dtype};
    } catch (const ConfigError&) {
      throw detail::policy_error(policy,
                                 "'" + std::string(policy) + "' is neither a preset nor a dtype name");
    }
  }

  std::optional<DType> param, compute, output;
  std::string_view rest = policy;
  while (true) {
    const std::size_t comma = rest.find(',');
    const std::string_view pair = rest.substr(0, comma);
    const std::size_t equals = pair.find('=');
    if (pair.empty()) throw detail::policy_error(policy, "empty key=dtype pair");
    if (equals == std::string_view::npos || pair.find('=', equals + 1) != std::string_view::npos) {
      throw detail::policy_error(policy, "'" + std::string(pair) + "' is not a single key=dtype pair");
    }
    const std::string_view key = pair.substr(0, equals);
    const DType dtype = detail::parse_policy_dtype(policy, pair.substr(equals + 1));
    if (key == "p" || key == "params") {
      param = dtype;
    } else if (key == "c" || key == "compute") {
      compute = dtype;
    } else if (key == "o" || key == "output") {
      output = dtype;
    } else {
      throw detail::policy_error(policy, "unknown key '" + std::string(key) + "'");
    }
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  PolicySpec spec;
  spec.param = param.value_or(DType::float32);
  spec.compute = compute.value_or(spec.param);
  spec.output = output.value_or(spec.compute);
  return spec;
}

namespace detail {
template <class F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::float16:
      return f(std::type_identity<float16>{});
    case DType::bfloat16:
      return f(std::type_identity<bfloat16>{});
    case DType::float32:
      return f(std::type_identity<float>{});
    case DType::float64:
      return f(std::type_identity<double>{});
  }
  throw ConfigError("invalid DType value " + std::to_string(static_cast<int>(dtype)) +
                    "; accepted: float16, bfloat16, float32, float64");
}
}  // namespace detail

/// Calls `f(Policy<P, C, O>{})` with the compile-time policy that `spec` describes, so one binary serves
/// every runtime policy string. All 64 combinations are instantiated; `f` must return the same type for each.
template <class F>
decltype(auto) visit_policy(const PolicySpec& spec, F&& f) {
  return detail::visit_dtype(spec.param, [&]<class P>(std::type_identity<P>) -> decltype(auto) {
    return detail::visit_dtype(spec.compute, [&]<class C>(std::type_identity<C>) -> decltype(auto) {
      return detail::visit_dtype(spec.output, [&]<class O>(std::type_identity<O>) -> decltype(auto) {
        return f(Policy<P, C, O>{});
      });
    });
  });
}

/// A compile-time list of policies: what `visit_policy<PolicyList<...>>` and a MixedPrecisionMixin task's
/// `compiled_policies` compile, instead of every combination.
template <precision_policy... Policies>
struct PolicyList {};

namespace detail {
template <class T>
inline constexpr bool is_policy_list = false;
template <class... Policies>
inline constexpr bool is_policy_list<PolicyList<Policies...>> = true;

template <class F, class First, class... Rest>
decltype(auto) visit_listed_policy(const PolicySpec& spec, F& f, PolicyList<First, Rest...> /*unvisited*/) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(First{});  // the caller has checked that spec is listed
  } else {
    if (spec == First::spec()) return f(First{});
    return visit_listed_policy(spec, f, PolicyList<Rest...>{});
  }
}
}  // namespace detail

/// A non-empty xax::PolicyList.
template <class List>
concept policy_list = detail::is_policy_list<List> && !std::is_same_v<List, PolicyList<>>;

/// Whether `List` holds the policy that `spec` describes.
template <class... Policies>
constexpr bool lists_policy(PolicyList<Policies...> /*list*/, const PolicySpec& spec) {
  return ((Policies::spec() == spec) || ...);
}

/// The listed policies' specs, separated by " | ", for messages.
template <class... Policies>
std::string policy_list_text(PolicyList<Policies...> /*list*/) {
  std::string text;
  ((text += (text.empty() ? "" : " | ") + Policies::spec().str()), ...);
  return text;
}

/// Calls `f(P{})` with the policy P of `List` whose spec() equals `spec`, so that `f` is compiled for the
/// listed policies alone, where the unlisted `visit_policy` compiles all 64. Throws ConfigError naming `spec`
/// and the listed policies when none matches. `f` must return the same type for each.
template <policy_list List, class F>
decltype(auto) visit_policy(const PolicySpec& spec, F&& f) {
  if (!lists_policy(List{}, spec)) {
    throw ConfigError("precision policy " + spec.str() +
                      " is not one of the listed policies; accepted: " + policy_list_text(List{}));
  }
  return detail::visit_listed_policy(spec, f, List{});
}

}  // namespace xax
