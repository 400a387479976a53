#pragma once
// Reading Google Benchmark's JSON output, which is not always JSON: its JSONReporter writes a non-finite
// double as a bare NaN, -NaN, Infinity or -Infinity (older versions: nan, inf), e.g. the coefficient of
// variation of a counter that is zero in every repetition. nlohmann-json rejects those tokens, as the JSON
// grammar does, so they become null before parsing.

#include <cctype>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace xax_bench {

/// `text` with every bare NaN/Infinity/inf token outside strings (optionally signed, any case) replaced by
/// null. Strings, true, false, null and everything else are copied unchanged.
inline std::string null_non_finite_numbers(std::string_view text) {
  const auto is_letter = [](char c) { return std::isalpha(static_cast<unsigned char>(c)) != 0; };
  const auto is_non_finite = [](std::string_view word) {
    std::string lower;
    for (const char c : word) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return lower == "nan" || lower == "inf" || lower == "infinity";
  };
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) {
        out += text[++i];
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
      out += c;
      continue;
    }
    const bool signed_word = (c == '-' || c == '+') && i + 1 < text.size() && is_letter(text[i + 1]);
    if (is_letter(c) || signed_word) {
      std::size_t end = signed_word ? i + 1 : i;
      while (end < text.size() && is_letter(text[end])) ++end;
      const std::string_view word = text.substr(signed_word ? i + 1 : i, end - (signed_word ? i + 1 : i));
      out += is_non_finite(word) ? std::string_view("null") : text.substr(i, end - i);
      i = end - 1;
      continue;
    }
    out += c;
  }
  return out;
}

/// Parses Google Benchmark's JSON output, its non-finite numbers read as null. Returns a discarded value
/// (is_discarded()) when the text is not JSON even so.
inline nlohmann::json parse_benchmark_json(std::string_view text) {
  return nlohmann::json::parse(null_non_finite_numbers(text), nullptr, /*allow_exceptions=*/false);
}

}  // namespace xax_bench
