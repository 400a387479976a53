#pragma once
// The character-level corpus of the GPT workload: any text file (`--text FILE`), or by default the fortune
// files of Debian's `fortunes` package. Characters (bytes) become the vocabulary, sorted; the first 90 % of
// the text is the training split and the last 10 % validation, as nanoGPT's shakespeare_char prepares it.

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <ios>
#include <iterator>
#include <optional>
#include <random>
#include <string>
#include <system_error>
#include <vector>
#include <xax/utils/error.hpp>

#include "workloads/char_gpt.hpp"

namespace xax_bench {

/// Where Debian's `fortunes` package puts its plain-text fortune files.
inline constexpr const char* fortunes_debian_dir = "/usr/share/games/fortunes";

/// A tokenised corpus: the vocabulary (one byte per id, sorted) and both splits as token ids.
struct CharCorpus {
  std::string source;      ///< where the text came from, for the report
  std::string vocabulary;  ///< vocabulary[id] is the byte of token id
  std::vector<std::int32_t> train;
  std::vector<std::int32_t> val;
  std::size_t characters = 0;
};

/// The largest text file the corpus is read from: 1 GiB. That admits enwik9 (10^9 bytes), the largest of the
/// usual character-level corpora. The loader holds about 5 bytes per character (the text, then an int32 token
/// id for each), so the corpus stays near 5 GiB at most; a larger file is far more likely a wrong path (a
/// disk image, an archive) than a corpus, and reading it would end in std::bad_alloc.
inline constexpr std::uintmax_t max_text_bytes = std::uintmax_t{1} << 30;

namespace detail {

[[noreturn]] inline void throw_text_error(const std::filesystem::path& path, const std::string& problem) {
  throw xax::DataError("the text file '" + path.string() + "' " + problem +
                       "; a corpus is read from a regular text file (or a pipe) of at most " +
                       std::to_string(max_text_bytes) + " bytes (1 GiB)");
}

/// The bytes of the regular file or pipe `path` (`--text /dev/stdin`, `--text <(...)`), refusing anything
/// else before reading: a directory would read as empty, and a device such as /dev/zero never ends. A pipe
/// may not end either, so every read stops at the limit.
inline std::string read_whole_file(const std::filesystem::path& path) {
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (status.type() == std::filesystem::file_type::not_found) throw_text_error(path, "does not exist");
  if (error) throw_text_error(path, "cannot be checked: " + error.message());
  if (std::filesystem::is_directory(status)) throw_text_error(path, "is a directory");
  const bool pipe = status.type() == std::filesystem::file_type::fifo;
  if (!std::filesystem::is_regular_file(status) && !pipe) {
    throw_text_error(path, "is not a regular file or a pipe (it is a device or a socket)");
  }
  const std::uintmax_t size = pipe ? 0 : std::filesystem::file_size(path, error);
  if (error) throw_text_error(path, "cannot be measured: " + error.message());
  if (size > max_text_bytes)
    throw_text_error(path, "holds " + std::to_string(size) + " bytes, over the limit");

  std::ifstream in(path, std::ios::binary);
  if (!in) throw xax::DataError("cannot open the text file '" + path.string() + "' for reading");
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(in.gcount()));
  // The size measured may be stale (a file still being written) or 0 for a file the kernel generates (under
  // /proc): read on to the end, still within the limit.
  std::array<char, 8192> more{};
  while (in) {
    in.read(more.data(), static_cast<std::streamsize>(more.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    if (text.size() + got > max_text_bytes) {
      throw_text_error(path, "holds more than " + std::to_string(max_text_bytes) + " bytes, over the limit");
    }
    text.append(more.data(), got);
  }
  if (in.bad()) throw xax::DataError("reading the text file '" + path.string() + "' failed");
  return text;
}

/// A fortune file with its `%` separator lines turned into blank lines: the fortunes themselves, one
/// paragraph each.
inline std::string fortune_text(const std::string& raw) {
  std::string out;
  out.reserve(raw.size());
  std::size_t begin = 0;
  while (begin < raw.size()) {
    std::size_t end = raw.find('\n', begin);
    if (end == std::string::npos) end = raw.size();
    const std::string_view line(raw.data() + begin, end - begin);
    if (line != "%") out.append(line);
    out.push_back('\n');
    begin = end + 1;
  }
  return out;
}

}  // namespace detail

/// The text of every plain fortune file in `directory` (regular files, not symlinks, without the `.dat`
/// index files and `.u8` links), in name order, `%` separators as blank lines. Throws xax::DataError when
/// the directory is missing or holds no fortune text.
inline std::string load_fortunes(const std::filesystem::path& directory) {
  std::error_code error;
  if (!std::filesystem::is_directory(directory, error)) {
    throw xax::DataError(
        "the fortune files are not installed: '" + directory.string() +
        "' is not a directory; on Debian: apt-get install fortunes (or give any text file with "
        "--text FILE)");
  }
  // The error_code overloads throughout: the throwing ones would escape as std::filesystem_error, not
  // DataError.
  const auto cannot_list = [&] {
    throw xax::DataError("the fortune directory '" + directory.string() + "' cannot be listed: " +
                         error.message() + "; give a text file with --text FILE instead");
  };
  std::vector<std::filesystem::path> files;
  std::filesystem::directory_iterator entry(directory, error);
  if (error) cannot_list();
  for (; entry != std::filesystem::directory_iterator(); entry.increment(error)) {
    if (error) cannot_list();
    std::error_code ignored;  // an entry that vanished or cannot be checked is skipped, as a non-file is
    if (entry->is_symlink(ignored) || !entry->is_regular_file(ignored)) continue;
    const std::string extension = entry->path().extension().string();
    if (extension == ".dat" || extension == ".u8") continue;
    files.push_back(entry->path());
  }
  if (error) cannot_list();
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& file : files) text += detail::fortune_text(detail::read_whole_file(file));
  if (text.empty()) {
    throw xax::DataError("'" + directory.string() +
                         "' holds no fortune text (no plain files besides .dat and .u8); on Debian: apt-get "
                         "install fortunes, or give a text file with --text FILE");
  }
  return text;
}

/// Tokenises `text` by byte and splits it 90 / 10. Throws xax::DataError for a text too short to hold one
/// training window and one validation window of `block` tokens.
inline CharCorpus make_char_corpus(const std::string& text, std::string source, std::int64_t block) {
  CharCorpus corpus;
  corpus.source = std::move(source);
  corpus.characters = text.size();
  std::array<bool, 256> seen{};
  for (const char c : text) seen[static_cast<unsigned char>(c)] = true;
  std::array<std::int32_t, 256> id{};
  for (int byte = 0; byte < 256; ++byte) {
    if (!seen[static_cast<std::size_t>(byte)]) continue;
    id[static_cast<std::size_t>(byte)] = static_cast<std::int32_t>(corpus.vocabulary.size());
    corpus.vocabulary.push_back(static_cast<char>(byte));
  }
  const std::size_t train_size = text.size() * 9 / 10;
  if (train_size < static_cast<std::size_t>(block) + 1 ||
      text.size() - train_size < static_cast<std::size_t>(block) + 1) {
    throw xax::DataError(corpus.source + " holds " + std::to_string(text.size()) +
                         " characters; a 90/10 split needs at least " + std::to_string(block) +
                         " + 1 in the validation tenth for one window of the block size (" +
                         std::to_string(block) + "); give a longer text");
  }
  const auto tokenize = [&](std::size_t begin, std::size_t end) {
    std::vector<std::int32_t> tokens(end - begin);
    for (std::size_t i = begin; i < end; ++i) tokens[i - begin] = id[static_cast<unsigned char>(text[i])];
    return tokens;
  };
  corpus.train = tokenize(0, train_size);
  corpus.val = tokenize(train_size, text.size());
  return corpus;
}

/// The corpus the benchmark trains on: `text_file` when given, otherwise the fortune files. Throws
/// xax::DataError when `text_file` is not a regular file, is empty or holds more than max_text_bytes.
inline CharCorpus load_char_corpus(const std::optional<std::filesystem::path>& text_file,
                                   std::int64_t block) {
  if (text_file) {
    const std::string text = detail::read_whole_file(*text_file);
    if (text.empty()) throw xax::DataError("the text file '" + text_file->string() + "' is empty");
    return make_char_corpus(text, "'" + text_file->string() + "'", block);
  }
  return make_char_corpus(load_fortunes(fortunes_debian_dir),
                          std::string("the fortune files in ") + fortunes_debian_dir, block);
}

/// The batch of windows starting at `starts` in `tokens`: inputs tokens[s, s + block), targets one later.
inline TokenBatch make_token_batch(const std::vector<std::int32_t>& tokens,
                                   std::span<const std::int64_t> starts, std::int64_t block) {
  TokenBatch batch;
  batch.batch = static_cast<std::int64_t>(starts.size());
  batch.block = block;
  batch.tokens.reserve(starts.size() * static_cast<std::size_t>(block));
  batch.targets.reserve(starts.size() * static_cast<std::size_t>(block));
  for (const std::int64_t start : starts) {
    const auto first = tokens.begin() + start;
    batch.tokens.insert(batch.tokens.end(), first, first + block);
    batch.targets.insert(batch.targets.end(), first + 1, first + block + 1);
  }
  return batch;
}

/// Up to `count` window starts spread evenly over `tokens` without overlap (start = k * stride, stride >=
/// block): the fixed validation windows, identical in xax and in the PyTorch peer.
inline std::vector<std::int64_t> spread_window_starts(std::size_t tokens, std::int64_t block,
                                                      std::size_t count) {
  const auto windows = static_cast<std::int64_t>((tokens - 1) / static_cast<std::size_t>(block));
  const std::int64_t n = std::min<std::int64_t>(windows, static_cast<std::int64_t>(count));
  const std::int64_t stride = n > 0 ? windows / n * block : block;
  std::vector<std::int64_t> starts(static_cast<std::size_t>(n));
  for (std::int64_t k = 0; k < n; ++k) starts[static_cast<std::size_t>(k)] = k * stride;
  return starts;
}

/// `count` random window starts in `tokens` (uniform, as nanoGPT's get_batch), from `seed`.
inline std::vector<std::int64_t> random_window_starts(std::size_t tokens, std::int64_t block,
                                                      std::size_t count, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> start(0, static_cast<std::int64_t>(tokens) - block - 1);
  std::vector<std::int64_t> starts(count);
  for (auto& s : starts) s = start(rng);
  return starts;
}

}  // namespace xax_bench
