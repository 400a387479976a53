// libFuzzer target for the policy parser: any byte string either parses to a spec whose str() parses back to
// the same spec, or throws xax::ConfigError. Anything else (another exception, a crash, a sanitizer report)
// is a bug.
#include <xax/utils/policy.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    const xax::PolicySpec spec = xax::get_policy(input);
    if (xax::get_policy(spec.str()) != spec) std::abort();
  } catch (const xax::ConfigError&) {
  }
  try {
    (void)xax::parse_dtype(input);
  } catch (const xax::ConfigError&) {
  }
  return 0;
}
