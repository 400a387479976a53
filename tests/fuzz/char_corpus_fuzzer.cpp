// libFuzzer target for the GPT workload's text corpus (benchmarks/workloads/char_data.hpp), which reads any
// file a user names with `--text`, or the fortune files. The first byte chooses how the rest is read: bit 0
// clear, as a text file (load_char_corpus); bit 0 set, as a fortune file, `%` lines as separators, in a
// directory of its own (load_fortunes). Its upper bits choose the block size, 1 to 128.
//
// Any input either throws xax::DataError or yields a corpus that decodes back to the text it was read from,
// whose vocabulary is sorted and unique and whose tokens all name a vocabulary entry, and whose validation
// windows (spread_window_starts + make_token_batch, as the benchmark builds them) lie inside the split with
// every target the token after its input. Anything else (another exception, a crash, a sanitizer report) is
// a bug.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <xax/utils/error.hpp>

#include "../scratch_directory.hpp"
#include "scratch_file.hpp"
#include "workloads/char_data.hpp"

namespace {

const std::filesystem::path& text_file() {
  static const xax_fuzz::ScratchFile file("xax_char_corpus_fuzzer.txt");
  return file.path();
}

const std::filesystem::path& fortune_directory() {
  // Made once per process (mkdtemp keeps parallel jobs apart); the file in it is rewritten for every input.
  static const xax_test::ScratchDirectory directory("xax_char_corpus_fuzzer_fortunes",
                                                    xax_fuzz::scratch_root());
  return directory.path();
}

void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) std::abort();
}

void check_tokens(const std::vector<std::int32_t>& tokens, const std::string& vocabulary,
                  std::string& decoded) {
  for (const std::int32_t token : tokens) {
    if (token < 0 || static_cast<std::size_t>(token) >= vocabulary.size()) std::abort();
    decoded.push_back(vocabulary[static_cast<std::size_t>(token)]);
  }
}

void check_windows(const std::vector<std::int32_t>& tokens, std::int64_t block) {
  const std::vector<std::int64_t> starts = xax_bench::spread_window_starts(tokens.size(), block, 4);
  for (const std::int64_t start : starts) {
    if (start < 0 || static_cast<std::size_t>(start + block) >= tokens.size()) std::abort();
  }
  const xax_bench::TokenBatch batch = xax_bench::make_token_batch(tokens, starts, block);
  if (batch.tokens.size() != starts.size() * static_cast<std::size_t>(block) ||
      batch.targets.size() != batch.tokens.size()) {
    std::abort();
  }
  for (std::size_t w = 0; w < starts.size(); ++w) {
    for (std::int64_t t = 0; t < block; ++t) {
      const std::size_t at = w * static_cast<std::size_t>(block) + static_cast<std::size_t>(t);
      const auto source = static_cast<std::size_t>(starts[w] + t);
      if (batch.tokens[at] != tokens[source] || batch.targets[at] != tokens[source + 1]) std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const bool as_fortunes = (data[0] & 1u) != 0;
  const std::int64_t block = 1 + (data[0] >> 1);
  const std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);

  std::string text;  // what the corpus must decode to
  xax_bench::CharCorpus corpus;
  try {
    if (as_fortunes) {
      write_file(fortune_directory() / "fuzzed", bytes);
      text = xax_bench::load_fortunes(fortune_directory());
      // The file's lines, each ending in a newline, with the `%` separators left blank.
      std::string expected;
      for (std::size_t begin = 0; begin < bytes.size();) {
        const std::size_t end = std::min(bytes.find('\n', begin), bytes.size());
        if (bytes.compare(begin, end - begin, "%") != 0) expected.append(bytes, begin, end - begin);
        expected.push_back('\n');
        begin = end + 1;
      }
      if (text != expected) std::abort();
      corpus = xax_bench::make_char_corpus(text, "fuzzed fortunes", block);
    } else {
      write_file(text_file(), bytes);
      text = bytes;
      corpus = xax_bench::load_char_corpus(text_file(), block);
    }
  } catch (const xax::DataError&) {
    return 0;
  }

  for (std::size_t i = 1; i < corpus.vocabulary.size(); ++i) {
    if (static_cast<unsigned char>(corpus.vocabulary[i - 1]) >=
        static_cast<unsigned char>(corpus.vocabulary[i])) {
      std::abort();
    }
  }
  if (corpus.characters != text.size() || corpus.train.size() + corpus.val.size() != text.size())
    std::abort();
  std::string decoded;
  check_tokens(corpus.train, corpus.vocabulary, decoded);
  check_tokens(corpus.val, corpus.vocabulary, decoded);
  if (decoded != text) std::abort();
  check_windows(corpus.train, block);
  check_windows(corpus.val, block);
  return 0;
}
