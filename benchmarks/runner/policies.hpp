#pragma once
// The precision policies of mixed_precision_benchmark's --policies: how its list splits into policies, which
// policies the benchmark's tasks compile, and which run is the fp32 reference. Policies are compared by what
// they are (xax::PolicySpec), never by how they were spelt: "default", "f32" and "full" are one policy.

#include <string>
#include <string_view>
#include <vector>
#include <xax/utils/error.hpp>
#include <xax/utils/policy.hpp>

namespace xax_bench {

/// The params x compute pairs the benchmark's tasks compile (MixedPrecisionMixin's compiled_policies, whose
/// output dtype is applied at run time) rather than all nine. options.hpp refuses a policy outside them, so a
/// run cannot fail on it after the others have trained.
using BenchmarkPolicies = xax::PolicyList<xax::Policy<float>, xax::Policy<float, xax::bfloat16, float>,
                                          xax::Policy<float, xax::float16, float>, xax::Policy<xax::bfloat16>,
                                          xax::Policy<xax::float16>>;

/// Whether the benchmark compiles `spec`'s params and compute (its output can be any dtype).
template <class... Listed>
constexpr bool compiles_params_and_compute(xax::PolicyList<Listed...> /*list*/, const xax::PolicySpec& spec) {
  return ((Listed::spec().param == spec.param && Listed::spec().compute == spec.compute) || ...);
}

/// "float32/float32, float32/bfloat16, ...": the compiled params/compute pairs, for messages.
template <class... Listed>
std::string compiled_pairs_text(xax::PolicyList<Listed...> /*list*/) {
  std::string text;
  ((text += (text.empty() ? "" : ", ") + std::string(xax::dtype_name(Listed::spec().param)) + "/" +
            std::string(xax::dtype_name(Listed::spec().compute))),
   ...);
  return text;
}

namespace detail {

/// The field a key=dtype pair sets ("params", "compute" or "output"), or the key as written when it is none
/// (get_policy then reports it).
inline std::string policy_pair_field(std::string_view pair) {
  const std::string_view key = pair.substr(0, pair.find('='));
  if (key == "p" || key == "params") return "params";
  if (key == "c" || key == "compute") return "compute";
  if (key == "o" || key == "output") return "output";
  return std::string(key);
}

}  // namespace detail

/// Splits the arguments of --policies into policies. Each argument is a comma-separated list; an item is a
/// preset or dtype name ("default", "mixed", "bf16"), or a key=dtype pair. Consecutive key=dtype pairs form
/// one policy, so the spec xax prints ("params=float32,compute=bfloat16,output=float32", the report's
/// policy_spec) is one policy, as get_policy reads it. A key repeated within such a run would make it
/// ambiguous (one policy where the last pair wins, or two policies?), so it is refused: two key=dtype
/// policies go in separate arguments (`--policies c=bf16 c=f16`) or with a name between them. The items are
/// not validated here; parse_options does that with get_policy.
inline std::vector<std::string> split_policy_list(const std::vector<std::string>& arguments) {
  std::vector<std::string> policies;
  for (const std::string& argument : arguments) {
    std::vector<std::string> fields;  // the fields the current run of key=dtype pairs has set
    std::string_view rest = argument;
    while (true) {
      const std::size_t comma = rest.find(',');
      const std::string_view item = rest.substr(0, comma);
      if (item.find('=') == std::string_view::npos) {
        policies.emplace_back(item);
        fields.clear();
      } else if (fields.empty()) {
        policies.emplace_back(item);
        fields.push_back(detail::policy_pair_field(item));
      } else {
        const std::string field = detail::policy_pair_field(item);
        for (const std::string& set : fields) {
          if (set == field) {
            throw xax::ConfigError(
                "--policies: in '" + argument + "', '" + std::string(item) + "' sets " + field +
                " again in the key=dtype policy '" + policies.back() +
                "'; consecutive key=dtype pairs form one policy, each key at most once, so give two "
                "key=dtype policies as separate arguments (e.g. --policies c=bf16 c=f16)");
          }
        }
        policies.back() += ",";
        policies.back() += item;
        fields.push_back(field);
      }
      if (comma == std::string_view::npos) break;
      rest.remove_prefix(comma + 1);
    }
  }
  return policies;
}

/// Whether two policy strings name the same policy. Both must be valid (parse_options has checked them).
inline bool same_policy(const std::string& a, const std::string& b) {
  return xax::get_policy(a) == xax::get_policy(b);
}

/// Whether `policy` is the all-float32 policy ("default", "f32", "full", "params=float32", ...), the
/// reference the others are checked against.
inline bool is_fp32_reference(const std::string& policy) {
  return same_policy(policy, "default");
}

}  // namespace xax_bench
