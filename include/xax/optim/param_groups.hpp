#pragma once
/// \file
/// Parameter groups: per-leaf learning-rate multipliers and weight decay, chosen by the leaf's path in the
/// tree (`layers[1].b`, see xax::TreePath), as torch.optim's param groups choose them by tensor.
///
///     // No weight decay on biases and norm gains, the usual recipe for transformers:
///     xax::optim::AdamWOptions{.weight_decay = 0.1,
///                              .groups =
///                              xax::optim::ParamGroups{}.no_weight_decay_if(xax::optim::is_bias_or_norm)};
///     // A tenth of the learning rate for the embedding:
///     xax::optim::ParamGroups{}.learning_rate_scale_if(xax::optim::path_contains("embed"), 0.1);
///
/// Rules apply in the order they were added; a later matching rule overrides what an earlier one set for the
/// same setting. A leaf no rule matches uses the optimizer's own learning rate and weight decay. The groups
/// are resolved once, when the optimizer is built from its `like` tree, so a step costs no path matching.

#include <cctype>
#include <cmath>
#include <cstddef>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include <xax/detail/format.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax::optim {

/// A predicate on a leaf's path, such as `layers[1].b`.
using PathPredicate = std::function<bool(std::string_view path)>;

/// What one floating leaf is updated with, after the groups are applied.
struct LeafSettings {
  double learning_rate_scale = 1;  ///< multiplies the optimizer's learning rate (schedules included)
  double weight_decay = 0;         ///< replaces the optimizer's weight decay for this leaf
};

/// An ordered list of rules that give leaves their own learning-rate multiplier and weight decay.
class ParamGroups {
 public:
  struct Rule {
    PathPredicate matches;
    std::optional<double> learning_rate_scale;  ///< unset: keep what earlier rules or the default gave
    std::optional<double> weight_decay;
  };

  /// Leaves whose path satisfies `matches` get `weight_decay` instead of the optimizer's.
  ParamGroups& weight_decay_if(PathPredicate matches, double weight_decay) & {
    return add({std::move(matches), std::nullopt, weight_decay});
  }
  ParamGroups&& weight_decay_if(PathPredicate matches, double weight_decay) && {
    return std::move(weight_decay_if(std::move(matches), weight_decay));
  }
  /// Leaves whose path satisfies `matches` are not decayed.
  ParamGroups& no_weight_decay_if(PathPredicate matches) & {
    return weight_decay_if(std::move(matches), 0.0);
  }
  ParamGroups&& no_weight_decay_if(PathPredicate matches) && {
    return std::move(no_weight_decay_if(std::move(matches)));
  }
  /// Leaves whose path satisfies `matches` are updated with `scale` times the learning rate.
  ParamGroups& learning_rate_scale_if(PathPredicate matches, double scale) & {
    return add({std::move(matches), scale, std::nullopt});
  }
  ParamGroups&& learning_rate_scale_if(PathPredicate matches, double scale) && {
    return std::move(learning_rate_scale_if(std::move(matches), scale));
  }

  /// Adds a rule. Throws ConfigError for a rule without a predicate or with a negative or non-finite value.
  ParamGroups& add(Rule rule) & {
    if (!rule.matches) throw ConfigError("xax::optim::ParamGroups: a rule needs a path predicate; got none");
    const auto check = [](const std::optional<double>& value, const char* what) {
      if (value && !(std::isfinite(*value) && *value >= 0)) {
        throw ConfigError(std::string("xax::optim::ParamGroups: ") + what + " " +
                          xax::detail::shortest_text(*value) + " is not accepted; give a finite value >= 0");
      }
    };
    check(rule.learning_rate_scale, "learning_rate_scale");
    check(rule.weight_decay, "weight_decay");
    rules_.push_back(std::move(rule));
    return *this;
  }
  ParamGroups&& add(Rule rule) && { return std::move(add(std::move(rule))); }

  [[nodiscard]] bool empty() const { return rules_.empty(); }
  [[nodiscard]] const std::vector<Rule>& rules() const { return rules_; }

  /// The settings of the leaf at `path`, starting from the optimizer's weight decay.
  [[nodiscard]] LeafSettings settings_for(std::string_view path, double default_weight_decay) const {
    LeafSettings settings{1.0, default_weight_decay};
    for (const Rule& rule : rules_) {
      if (!rule.matches(path)) continue;
      if (rule.learning_rate_scale) settings.learning_rate_scale = *rule.learning_rate_scale;
      if (rule.weight_decay) settings.weight_decay = *rule.weight_decay;
    }
    return settings;
  }

  /// The settings of every floating leaf of `like`, in for_each_leaf order.
  template <class Tree>
  [[nodiscard]] std::vector<LeafSettings> resolve(const Tree& like, double default_weight_decay) const {
    std::vector<LeafSettings> settings;
    for_each_leaf_with_path(
        [&]<class L>(const TreePath& path, const L&) {
          if constexpr (floating_leaf<L>) settings.push_back(settings_for(path.str(), default_weight_decay));
        },
        like);
    return settings;
  }

 private:
  std::vector<Rule> rules_;
};

namespace detail {

/// The field name a path ends with, without trailing indices: `layers[1].b` -> `b`. A trailing string key is
/// a name too, and a dotted one (PyTorch's state-dict names) counts by its last part: `["fc1.bias"]` ->
/// `bias`.
inline std::string_view last_field(std::string_view path) {
  while (path.ends_with(']')) {
    if (const std::size_t open = path.rfind("[\"");
        path.ends_with("\"]") && open != std::string_view::npos && open + 4 <= path.size()) {
      path = path.substr(open + 2, path.size() - open - 4);
      break;
    }
    const std::size_t open = path.rfind('[');
    if (open == std::string_view::npos) break;
    path = path.substr(0, open);
  }
  const std::size_t dot = path.rfind('.');
  return dot == std::string_view::npos ? path : path.substr(dot + 1);
}

inline std::string lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

inline bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

}  // namespace detail

/// Whether the leaf is a bias: its field (a map key's last dotted part: `["fc1.bias"]`) is `b` or `bias`, or
/// starts with `bias` or ends with `_b` or `_bias` (case-insensitive).
inline bool is_bias(std::string_view path) {
  const std::string name = detail::lower(detail::last_field(path));
  return name == "b" || name.starts_with("bias") || detail::ends_with(name, "_b") ||
         detail::ends_with(name, "_bias");
}

/// Whether the leaf belongs to a normalisation layer: a name on its path starts or ends with `norm`, or is
/// `ln` or starts with `ln_`, trailing digits aside (`norm1`, `final_norm`, `LayerNorm`, `batchnorm`, GPT-2's
/// `ln_1` and `ln_f`; not `abnormal`), or its field is `gain` or `gamma` or ends with `_gain`
/// (case-insensitive).
inline bool is_norm(std::string_view path) {
  const std::string lowered = detail::lower(path);
  std::size_t begin = 0;
  while (begin < lowered.size()) {
    const std::size_t end = lowered.find_first_of(".[]\"", begin);
    std::string_view name =
        std::string_view(lowered).substr(begin, end == std::string::npos ? std::string::npos : end - begin);
    while (!name.empty() && std::isdigit(static_cast<unsigned char>(name.back())) != 0) name.remove_suffix(1);
    if (name.starts_with("norm") || detail::ends_with(name, "norm") || name == "ln" ||
        name.starts_with("ln_")) {
      return true;
    }
    if (end == std::string::npos) break;
    begin = end + 1;
  }
  const std::string name = detail::lower(detail::last_field(path));
  return name == "gain" || name == "gamma" || detail::ends_with(name, "_gain");
}

/// Biases and normalisation parameters: the leaves transformers train without weight decay.
inline bool is_bias_or_norm(std::string_view path) {
  return is_bias(path) || is_norm(path);
}

/// A predicate true for paths that contain `text`.
inline PathPredicate path_contains(std::string text) {
  return
      [text = std::move(text)](std::string_view path) { return path.find(text) != std::string_view::npos; };
}

/// A predicate true for leaves whose field (the path's last name, without indices; a map key's last dotted
/// part) is `name`.
inline PathPredicate field_is(std::string name) {
  return [name = std::move(name)](std::string_view path) { return detail::last_field(path) == name; };
}

}  // namespace xax::optim
