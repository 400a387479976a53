#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <xax/task/config.hpp>

#include "scratch_directory.hpp"

namespace {

using ::testing::HasSubstr;

// A config section of the test's own, exercising every value type.
struct ToyConfig {
  double rate = 0.5;
  std::int64_t count = 3;
  bool flag = false;
  std::string name = "toy";

  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("rate", self.rate, "a number in (0, 1]");
    visit("count", self.count, "an integer >= 0");
    visit("flag", self.flag, "true or false");
    visit("name", self.name, "a non-empty string");
  }
  void validate() const {
    if (!(rate > 0 && rate <= 1)) throw xax::ConfigError("config field 'rate': out of (0, 1]");
    if (name.empty()) throw xax::ConfigError("config field 'name': must not be empty");
  }
};

static_assert(xax::config_struct<ToyConfig>);
static_assert(!xax::config_struct<int>);

TEST(Config, SetsEachValueType) {
  ToyConfig config;
  xax::set_config_field(config, "rate", "0.25");
  xax::set_config_field(config, "count", "-7");
  xax::set_config_field(config, "flag", "true");
  xax::set_config_field(config, "name", "a b=c");
  EXPECT_EQ(config.rate, 0.25);
  EXPECT_EQ(config.count, -7);
  EXPECT_TRUE(config.flag);
  EXPECT_EQ(config.name, "a b=c");
  xax::set_config_field(config, "flag", "0");
  EXPECT_FALSE(config.flag);
}

TEST(Config, RejectsValuesThatDoNotParseNamingFieldAndType) {
  ToyConfig config;
  EXPECT_THAT([&] { xax::set_config_field(config, "count", "3.5"); },
              ::testing::ThrowsMessage<xax::ConfigError>(
                  HasSubstr("'count': '3.5' is not accepted; expected an integer")));
  EXPECT_THAT(
      [&] { xax::set_config_field(config, "rate", "fast"); },
      ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("expected a finite number (a number in (0, 1])")));
  EXPECT_THROW(xax::set_config_field(config, "rate", "nan"), xax::ConfigError);
  EXPECT_THROW(xax::set_config_field(config, "rate", "inf"), xax::ConfigError);
  EXPECT_THROW(xax::set_config_field(config, "rate", ""), xax::ConfigError);
  EXPECT_THROW(xax::set_config_field(config, "count", "12abc"), xax::ConfigError);
  EXPECT_THROW(xax::set_config_field(config, "flag", "yes"), xax::ConfigError);
  EXPECT_EQ(config.count, 3) << "a rejected value leaves the field alone";
}

TEST(Config, UnknownKeyListsTheAcceptedOnes) {
  ToyConfig config;
  EXPECT_THAT([&] { xax::set_config_field(config, "rat", "1"); },
              ::testing::ThrowsMessage<xax::ConfigError>(
                  HasSubstr("unknown config field 'rat'; accepted: rate, count, flag, name")));
}

TEST(Config, ArgsApplyInOrderThenValidate) {
  ToyConfig config;
  const std::array<std::string_view, 3> args{"rate=0.1", "count=9", "rate=0.2"};
  xax::apply_config_args(config, args);
  EXPECT_EQ(config.rate, 0.2);
  EXPECT_EQ(config.count, 9);
  const std::array<std::string_view, 1> invalid{"rate=2"};
  EXPECT_THAT([&] { xax::apply_config_args(config, invalid); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("out of (0, 1]")));
  const std::array<std::string_view, 1> no_equals{"rate"};
  EXPECT_THAT([&] { xax::apply_config_args(config, no_equals); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("not of the form key=value")));
}

TEST(Config, ToStringRoundTripsThroughArgs) {
  ToyConfig config;
  config.rate = 1.0 / 3.0;
  config.count = 11;
  config.flag = true;
  const std::string text = xax::config_to_string(config);
  EXPECT_THAT(text, HasSubstr("count=11\n"));
  ToyConfig copy;
  std::vector<std::string> lines;
  std::string line;
  for (char c : text) {
    if (c == '\n') {
      lines.push_back(line);
      line.clear();
    } else {
      line += c;
    }
  }
  std::vector<std::string_view> args(lines.begin(), lines.end());
  xax::apply_config_args(copy, args);
  EXPECT_EQ(copy.rate, config.rate) << "17 significant digits round-trip a double";
  EXPECT_EQ(copy.count, 11);
  EXPECT_TRUE(copy.flag);
}

TEST(Config, FailedArgsLeaveTheConfigUnchanged) {
  ToyConfig config;
  // The first argument is fine; the second fails validation, the third is unknown, the fourth has no '='.
  for (const auto& args : {std::array<std::string_view, 2>{"count=9", "rate=2"},
                           std::array<std::string_view, 2>{"count=9", "rat=1"},
                           std::array<std::string_view, 2>{"count=9", "rate"}}) {
    EXPECT_THROW(xax::apply_config_args(config, args), xax::ConfigError) << args[1];
    EXPECT_EQ(config.count, 3) << "no argument is applied when one fails: " << args[1];
    EXPECT_EQ(config.rate, 0.5) << args[1];
  }
}

TEST(Config, SetFieldValidatesAndKeepsTheOldValueOnFailure) {
  ToyConfig config;
  EXPECT_THAT([&] { xax::set_config_field(config, "rate", "2"); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("'rate': out of (0, 1]")));
  EXPECT_EQ(config.rate, 0.5);
  EXPECT_THROW(xax::set_config_field(config, "name", ""), xax::ConfigError);
  EXPECT_EQ(config.name, "toy");
  xax::set_config_field(config, "rate", "1");
  EXPECT_EQ(config.rate, 1.0);
}

// Fields whose valid values depend on each other: one set_config_field at a time cannot cross an
// invalid state, apply_config_args can.
struct BoundedConfig {
  double value = 4;
  double min = 1;
  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("value", self.value, "a number >= min");
    visit("min", self.min, "a number <= value");
  }
  void validate() const {
    if (min > value) throw xax::ConfigError("config field 'min': must be <= value");
  }
};

TEST(Config, ArgsValidateOnlyOnceAllAreApplied) {
  BoundedConfig config;
  const std::array<std::string_view, 2> args{"value=0.5", "min=0.25"};
  xax::apply_config_args(config, args);
  EXPECT_EQ(config.value, 0.5);
  EXPECT_EQ(config.min, 0.25);
}

#if defined(XAX_HAS_NLOHMANN_JSON) && XAX_HAS_NLOHMANN_JSON
TEST(Config, FailedJsonLeavesTheConfigUnchanged) {
  const xax_test::ScratchDirectory scratch("xax_test_config");
  const auto path = scratch / "unchanged.json";
  ToyConfig config;
  std::ofstream(path) << R"({"count": 8, "rate": 3})";
  EXPECT_THROW(xax::load_config_json(config, path.string()), xax::ConfigError);
  EXPECT_EQ(config.count, 3);
  std::ofstream(path) << R"({"value": 0.5, "min": 0.25})";
  BoundedConfig bounded;
  xax::load_config_json(bounded, path.string());
  EXPECT_EQ(bounded.min, 0.25) << "fields are validated together, after all of them are set";
}

TEST(Config, LoadsJson) {
  const xax_test::ScratchDirectory scratch("xax_test_config");
  const auto path = scratch / "config.json";
  std::ofstream(path) << R"({"rate": 0.75, "count": 4, "flag": true, "name": "from json"})";
  ToyConfig config;
  xax::load_config_json(config, path.string());
  EXPECT_EQ(config.rate, 0.75);
  EXPECT_EQ(config.count, 4);
  EXPECT_TRUE(config.flag);
  EXPECT_EQ(config.name, "from json");

  std::ofstream(path) << R"({"rate": "0.5", "count": 4.5})";
  EXPECT_THAT([&] { xax::load_config_json(config, path.string()); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("'count': '4.5' is not accepted")));
  std::ofstream(path) << R"([1, 2])";
  EXPECT_THROW(xax::load_config_json(config, path.string()), xax::ConfigError);
  std::ofstream(path) << R"({"rate": )";
  EXPECT_THAT([&] { xax::load_config_json(config, path.string()); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("is not valid JSON")));
  std::filesystem::remove(path);
  EXPECT_THAT([&] { xax::load_config_json(config, path.string()); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("cannot open config file")));
}

// A config file is refused, and the config left unchanged, for anything but one object of fields, each once,
// each with its field's JSON type.
TEST(Config, JsonIsRefusedForWhatItCannotMean) {
  const xax_test::ScratchDirectory scratch("xax_test_config");
  const auto path = scratch / "config.json";
  const auto refusal = [&](const std::string& text) {
    std::ofstream(path) << text;
    ToyConfig config;
    try {
      xax::load_config_json(config, path.string());
    } catch (const xax::ConfigError& error) {
      EXPECT_EQ(config.rate, 0.5) << text;
      EXPECT_EQ(config.name, "toy") << text;
      return std::string(error.what());
    }
    return std::string("accepted");
  };
  EXPECT_THAT(refusal(R"({"rate": 0.25} trailing)"), HasSubstr("is not valid JSON"));
  EXPECT_THAT(refusal(R"({"rate": 0.25}{"rate": 0.75})"), HasSubstr("is not valid JSON"));
  EXPECT_EQ(refusal(R"({"rate": 0.25, "rate": 0.75})"),
            "config file '" + path.string() + "' sets field 'rate' twice; each field may appear once");
  EXPECT_EQ(refusal(R"({"name": null})"),
            "config field 'name': a JSON null is not accepted; expected a JSON string (a non-empty string)");
  EXPECT_EQ(refusal(R"({"name": ["a", "b"]})"),
            "config field 'name': a JSON array is not accepted; expected a JSON string (a non-empty string)");
  EXPECT_EQ(
      refusal(R"({"name": 42})"),
      "config field 'name': a JSON number is not accepted; expected a JSON string (a non-empty string)");
  EXPECT_EQ(
      refusal(R"({"rate": "0.25"})"),
      "config field 'rate': a JSON string is not accepted; expected a JSON number (a number in (0, 1])");
  EXPECT_EQ(refusal(R"({"flag": 1})"),
            "config field 'flag': a JSON number is not accepted; expected a JSON boolean (true or false)");
  EXPECT_EQ(refusal(R"({"count": {"n": 1}})"),
            "config field 'count': a JSON object is not accepted; expected a JSON number (an integer >= 0)");
  // A duplicate inside a value is the value's own business; the value is refused for its type.
  EXPECT_THAT(refusal(R"({"name": {"a": 1, "a": 2}})"), HasSubstr("a JSON object is not accepted"));
}

// A value nested deeper than any serializer's recursion is refused like any other wrong type, not turned back
// into text first (which overflowed the stack).
TEST(Config, DeeplyNestedJsonIsRefusedWithoutRecursion) {
  const xax_test::ScratchDirectory scratch("xax_test_config");
  const auto path = scratch / "deep.json";
  constexpr int depth = 200000;
  for (const std::string key : {"name", "unknown"}) {
    std::ofstream(path) << "{\"" << key << "\": " << std::string(depth, '[') << std::string(depth, ']')
                        << "}";
    ToyConfig config;
    EXPECT_THROW(xax::load_config_json(config, path.string()), xax::ConfigError) << key;
  }
}
#endif

}  // namespace
