// libFuzzer target for config parsing. The first byte chooses the entry point: bit 0 clear, the rest is
// `key=value` arguments, one per line, for apply_config_args; bit 0 set, the rest is a JSON config file for
// load_config_json. Either the config is set (and then its config_to_string lines apply to a fresh config and
// print back the same), or xax::ConfigError is thrown. Anything else (another exception, a crash, a sanitizer
// report) is a bug.
#include <xax/task/config.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "scratch_file.hpp"

namespace {

// The library's two sections and a user section with every value type.
struct FuzzConfig : xax::TrainConfig, xax::MixedPrecisionConfig {
  std::int64_t hidden = 512;
  double dropout = 0.1;
  bool verbose = false;
  std::string name = "run";
  template <class Self, class Visit>
  static void visit_fields(Self& self, Visit&& visit) {
    visit("hidden", self.hidden, "an integer >= 1");
    visit("dropout", self.dropout, "a number in [0, 1)");
    visit("verbose", self.verbose, "true or false");
    visit("name", self.name, "any text");
  }
  void validate() const {
    if (hidden < 1) throw xax::ConfigError("config field 'hidden': give an integer >= 1");
    if (!(dropout >= 0 && dropout < 1))
      throw xax::ConfigError("config field 'dropout': give a number in [0, 1)");
  }
};

std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    lines.push_back(text.substr(0, end));
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  return lines;
}

// A config that was set prints lines that set a fresh config to the same values.
void check_round_trip(const FuzzConfig& config) {
  const std::string text = xax::config_to_string(config);
  const std::vector<std::string_view> lines = split_lines(text);
  FuzzConfig again;
  try {
    xax::apply_config_args(again, lines);
  } catch (const xax::ConfigError&) {
    // A string field holding a line break cannot come back as one key=value line.
    if (text.size() == 0 || config.name.find('\n') != std::string::npos ||
        config.precision_policy.find('\n') != std::string::npos ||
        config.loss_scaling.find('\n') != std::string::npos ||
        config.optimizer.find('\n') != std::string::npos ||
        config.checkpoint_path.find('\n') != std::string::npos) {
      return;
    }
    std::abort();
  }
  if (xax::config_to_string(again) != text) std::abort();
}

const std::filesystem::path& scratch_file() {
  static const xax_fuzz::ScratchFile file("xax_config_fuzzer.json");
  return file.path();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  FuzzConfig config;
  try {
    if ((data[0] & 1u) == 0) {
      xax::apply_config_args(config, split_lines(text));
    } else {
      {
        std::ofstream out(scratch_file(), std::ios::binary | std::ios::trunc);
        out.write(text.data(), static_cast<std::streamsize>(text.size()));
        if (!out) std::abort();
      }
      xax::load_config_json(config, scratch_file().string());
    }
  } catch (const xax::ConfigError&) {
    return 0;
  }
  check_round_trip(config);
  return 0;
}
