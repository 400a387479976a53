#pragma once
/// \file
/// Setting config structs from `key=value` strings (command lines) and JSON files.
///
/// A config section lists its fields once, with what each accepts:
///
///     struct MyConfig : xax::TrainConfig, xax::MixedPrecisionConfig {
///       std::int64_t hidden = 512;
///       template <class Self, class Visit>
///       static void visit_fields(Self& self, Visit&& visit) {
///         visit("hidden", self.hidden, "an integer >= 1");
///       }
///     };
///
/// `set_config_field(config, "learning_rate", "0.01")` then finds the field in TrainConfig,
/// MixedPrecisionConfig or the user's own section, parses the text by the field's type and validates the
/// whole config, changing nothing if either fails.

#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <fstream>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>
#include <xax/utils/error.hpp>

// JSON config files need nlohmann-json, switched on by the xax target (XAX_HAS_NLOHMANN_JSON, defined when it
// links nlohmann_json), so that the build decides, not whatever headers are on the include path.
#if defined(XAX_HAS_NLOHMANN_JSON) && XAX_HAS_NLOHMANN_JSON
#include <nlohmann/json.hpp>
#endif

namespace xax {

/// A value type a config field can have.
template <class T>
concept config_value = std::same_as<T, bool> || std::same_as<T, std::int64_t> || std::same_as<T, double> ||
    std::same_as<T, std::string>;

namespace detail {

struct FieldNameCollector {
  std::vector<std::string>* names;
  template <class T>
  void operator()(std::string_view name, T&, std::string_view) const {
    names->emplace_back(name);
  }
};

template <config_value T>
std::string type_description() {
  if constexpr (std::same_as<T, bool>) {
    return "true, false, 1 or 0";
  } else if constexpr (std::same_as<T, std::int64_t>) {
    return "an integer";
  } else if constexpr (std::same_as<T, double>) {
    return "a finite number";
  } else {
    return "a string";
  }
}

template <config_value T>
T parse_config_value(std::string_view field, std::string_view text, std::string_view accepted) {
  const auto fail = [&]() -> ConfigError {
    return ConfigError("config field '" + std::string(field) + "': '" + std::string(text) +
                       "' is not accepted; expected " + type_description<T>() + " (" + std::string(accepted) +
                       ")");
  };
  if constexpr (std::same_as<T, std::string>) {
    return std::string(text);
  } else if constexpr (std::same_as<T, bool>) {
    if (text == "true" || text == "1") return true;
    if (text == "false" || text == "0") return false;
    throw fail();
  } else {
    T value{};
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc{} || end != text.data() + text.size() || text.empty()) throw fail();
    if constexpr (std::same_as<T, double>) {
      if (!std::isfinite(value)) throw fail();
    }
    return value;
  }
}

// A config is made of sections, each with its own hook name so that a struct inheriting several sections (as
// the seed's `MyConfig(TrainConfig, MixedPrecisionConfig)` does) has no ambiguous or hidden hook.
template <class Config, class Visit>
void visit_config_sections(Config& config, Visit&& visit) {
  if constexpr (requires { Config::visit_train_fields(config, visit); })
    Config::visit_train_fields(config, visit);
  if constexpr (requires { Config::visit_mixed_precision_fields(config, visit); }) {
    Config::visit_mixed_precision_fields(config, visit);
  }
  if constexpr (requires { Config::visit_data_parallel_fields(config, visit); }) {
    Config::visit_data_parallel_fields(config, visit);
  }
  if constexpr (requires { Config::visit_fields(config, visit); }) Config::visit_fields(config, visit);
}

}  // namespace detail

/// A config: a struct with at least one section hook (`visit_train_fields`, `visit_mixed_precision_fields` or
/// the user's `visit_fields`), each a static template `(Self&, Visit&&)` calling `visit(name, field,
/// accepted)`.
template <class T>
concept config_struct = requires(T& c, detail::FieldNameCollector visit) {
  T::visit_train_fields(c, visit);
}
|| requires(T& c, detail::FieldNameCollector visit) {
  T::visit_mixed_precision_fields(c, visit);
}
|| requires(T& c, detail::FieldNameCollector visit) {
  T::visit_fields(c, visit);
};

/// The names of every field the config accepts, in declaration order.
template <config_struct Config>
std::vector<std::string> config_field_names(const Config& config) {
  std::vector<std::string> names;
  detail::visit_config_sections(config, detail::FieldNameCollector{&names});
  return names;
}

/// Validates every section of the config (`validate_train()`, `validate_mixed_precision()`, and the user's
/// own `validate()` where present). Throws ConfigError naming the field and what it accepts.
template <config_struct Config>
void validate_config(const Config& config) {
  if constexpr (requires { config.validate_train(); }) config.validate_train();
  if constexpr (requires { config.validate_mixed_precision(); }) config.validate_mixed_precision();
  if constexpr (requires { config.validate_data_parallel(); }) config.validate_data_parallel();
  if constexpr (requires { config.validate(); }) config.validate();
}

namespace detail {

// Finds the field named `key` and lets `assign(name, field, accepted)` set it, without validating the config:
// a set of several fields may pass through states that are invalid only until the last of them is set
// (loss_scale_value and loss_scale_min). Throws ConfigError, listing the accepted names, for an unknown key.
template <config_struct Config, class Assign>
void assign_config_field(Config& config, std::string_view key, Assign&& assign) {
  bool found = false;
  visit_config_sections(config, [&]<class T>(std::string_view name, T& field, std::string_view accepted) {
    if (name != key) return;
    assign(name, field, accepted);
    found = true;
  });
  if (!found) {
    std::string accepted;
    for (const std::string& name : config_field_names(config))
      (accepted += accepted.empty() ? "" : ", ") += name;
    throw ConfigError("unknown config field '" + std::string(key) + "'; accepted: " + accepted);
  }
}

// Parses `text` into the field named `key`, as the command line gives it.
template <config_struct Config>
void assign_config_text(Config& config, std::string_view key, std::string_view text) {
  assign_config_field(config, key,
                      [text]<class T>(std::string_view name, T& field, std::string_view accepted) {
                        field = parse_config_value<T>(name, text, accepted);
                      });
}

}  // namespace detail

/// Sets one field from its text, then validates the whole config. Throws ConfigError for an unknown key
/// (listing the accepted ones), a value that does not parse as the field's type, or a value the config's
/// validation rejects; `config` is unchanged then. To change fields that depend on each other (a value and
/// its bounds) together, use apply_config_args, which validates once after all of them.
template <config_struct Config>
void set_config_field(Config& config, std::string_view key, std::string_view text) {
  Config candidate = config;
  detail::assign_config_text(candidate, key, text);
  validate_config(candidate);
  config = std::move(candidate);
}

/// Applies `key=value` arguments in order, then validates. Throws ConfigError for an argument without '='.
/// The arguments are applied to a copy that replaces `config` only once it is valid: on any error `config`
/// is unchanged.
template <config_struct Config>
void apply_config_args(Config& config, std::span<const std::string_view> args) {
  Config candidate = config;
  for (const std::string_view arg : args) {
    const std::size_t equals = arg.find('=');
    if (equals == std::string_view::npos || equals == 0) {
      throw ConfigError("config argument '" + std::string(arg) +
                        "' is not of the form key=value, e.g. learning_rate=0.01");
    }
    detail::assign_config_text(candidate, arg.substr(0, equals), arg.substr(equals + 1));
  }
  validate_config(candidate);
  config = std::move(candidate);
}

#if defined(XAX_HAS_NLOHMANN_JSON) && XAX_HAS_NLOHMANN_JSON
namespace detail {

// A config file is data, not text to coerce: each value must have its field's JSON type, so that `null` for a
// path or "0.5" for a rate is refused rather than guessed at. Numbers still go through the command line's
// text parser (from their JSON spelling, which for a scalar is short), so that both accept exactly the same
// values.
template <config_value T>
void assign_json_value(std::string_view name, T& field, std::string_view accepted,
                       const nlohmann::json& value) {
  const auto wrong_type = [&](std::string_view expected) {
    return ConfigError("config field '" + std::string(name) + "': a JSON " + value.type_name() +
                       " is not accepted; expected a JSON " + std::string(expected) + " (" +
                       std::string(accepted) + ")");
  };
  if constexpr (std::same_as<T, bool>) {
    if (!value.is_boolean()) throw wrong_type("boolean");
    field = value.template get<bool>();
  } else if constexpr (std::same_as<T, std::string>) {
    if (!value.is_string()) throw wrong_type("string");
    field = value.template get<std::string>();
  } else {
    if (!value.is_number()) throw wrong_type("number");
    field = parse_config_value<T>(name, value.dump(), accepted);
  }
}

}  // namespace detail
#endif

/// Applies a JSON object of field values, then validates. Each value must have its field's JSON type (a
/// boolean, a number or a string), each field may appear once, and nothing may follow the object; any other
/// file is a ConfigError that leaves `config` unchanged. Needs nlohmann-json (Debian nlohmann-json3-dev).
template <config_struct Config>
void load_config_json(Config& config, const std::string& path) {
#if defined(XAX_HAS_NLOHMANN_JSON) && XAX_HAS_NLOHMANN_JSON
  std::ifstream file(path);
  if (!file) throw ConfigError("cannot open config file '" + path + "'");
  std::unordered_set<std::string>
      keys;  // the object's own keys so far, to refuse a second value for one field
  const auto refuse_duplicate_keys = [&](int depth, nlohmann::json::parse_event_t event,
                                         nlohmann::json& parsed) {
    if (event != nlohmann::json::parse_event_t::key || depth != 1) return true;
    std::string key = parsed.template get<std::string>();
    if (!keys.insert(key).second) {
      throw ConfigError("config file '" + path + "' sets field '" + key +
                        "' twice; each field may appear once");
    }
    return true;
  };
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(file, refuse_duplicate_keys);  // strict: content after the value is an error
  } catch (const nlohmann::json::exception& error) {
    throw ConfigError("config file '" + path + "' is not valid JSON: " + error.what());
  }
  if (!json.is_object())
    throw ConfigError("config file '" + path + "' must hold a JSON object of field values");
  Config candidate = config;  // committed only once every field parsed and the whole config is valid
  for (const auto& item : json.items()) {
    // A variable, not a structured binding: clang 14 cannot capture those.
    const nlohmann::json& value = item.value();
    detail::assign_config_field(candidate, item.key(),
                                [&value](std::string_view name, auto& field, std::string_view accepted) {
                                  detail::assign_json_value(name, field, accepted, value);
                                });
  }
  validate_config(candidate);
  config = std::move(candidate);
#else
  static_assert(sizeof(Config) == 0,
                "xax::load_config_json needs nlohmann-json (Debian: nlohmann-json3-dev)");
#endif
}

/// The config as `key=value` lines, in the form apply_config_args accepts.
template <config_struct Config>
std::string config_to_string(const Config& config) {
  std::ostringstream out;
  detail::visit_config_sections(config, [&]<class T>(std::string_view name, T& field, std::string_view) {
    out << name << '=';
    if constexpr (std::same_as<std::remove_const_t<T>, bool>) {
      out << (field ? "true" : "false");
    } else if constexpr (std::same_as<std::remove_const_t<T>, double>) {
      out.precision(17);
      out << field;
    } else {
      out << field;
    }
    out << '\n';
  });
  return out.str();
}

}  // namespace xax
