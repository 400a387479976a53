#pragma once
// Checkpoint files taken apart and put back together, for tests that craft malformed or altered checkpoints.
// Every file these helpers produce carries a valid CRC-32, so the reader gets past its checksum and the
// parser's and the loaders' own checks are what is tested.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>
#include <xax/task/checkpoint.hpp>

namespace xax_test {

/// `body` (a checkpoint without its checksum) followed by the CRC-32 of `body`.
inline std::string with_crc(std::string body) {
  const std::uint32_t crc = xax::detail::crc32_of(body, body.size());
  xax::detail::append_pod(body, crc);
  return body;
}

/// The fixed header: magic, byte-order mark, `version` and the entry count.
inline std::string checkpoint_header(std::uint64_t entries,
                                     std::uint32_t version = xax::checkpoint_format_version) {
  std::string out(xax::detail::checkpoint_magic, sizeof(xax::detail::checkpoint_magic));
  xax::detail::append_pod(out, xax::detail::checkpoint_byte_order_mark);
  xax::detail::append_pod(out, version);
  xax::detail::append_pod(out, entries);
  return out;
}

/// One entry as the format stores it, with nothing checked.
struct RawEntry {
  std::string name;
  std::uint8_t kind = 0;
  std::uint8_t element = 0;
  std::vector<std::int64_t> dims;
  std::string payload;

  [[nodiscard]] std::string bytes() const {
    std::string out;
    xax::detail::append_pod(out, static_cast<std::uint32_t>(name.size()));
    out += name;
    xax::detail::append_pod(out, kind);
    xax::detail::append_pod(out, element);
    xax::detail::append_pod(out, static_cast<std::uint8_t>(dims.size()));
    for (const std::int64_t d : dims) xax::detail::append_pod(out, d);
    xax::detail::append_pod(out, static_cast<std::uint64_t>(payload.size()));
    out += payload;
    return out;
  }
};

/// A complete checkpoint file of `entries`, checksum included.
inline std::string checkpoint_of(const std::vector<RawEntry>& entries) {
  std::string out = checkpoint_header(entries.size());
  for (const RawEntry& e : entries) out += e.bytes();
  return with_crc(std::move(out));
}

/// The entries of a well-formed checkpoint file (one the library wrote).
inline std::vector<RawEntry> entries_of(const std::string& file) {
  std::size_t offset = checkpoint_header(0).size();
  const auto take = [&](void* out, std::size_t size) {
    if (file.size() - 4 - offset < size) throw std::runtime_error("entries_of: not a well-formed checkpoint");
    std::memcpy(out, file.data() + offset, size);
    offset += size;
  };
  std::uint64_t count = 0;
  std::memcpy(&count, file.data() + offset - sizeof(count), sizeof(count));
  std::vector<RawEntry> entries(count);
  for (RawEntry& e : entries) {
    std::uint32_t name_size = 0;
    take(&name_size, sizeof(name_size));
    e.name.resize(name_size);
    take(e.name.data(), name_size);
    std::uint8_t rank = 0;
    take(&e.kind, 1);
    take(&e.element, 1);
    take(&rank, 1);
    e.dims.resize(rank);
    for (std::int64_t& d : e.dims) take(&d, sizeof(d));
    std::uint64_t size = 0;
    take(&size, sizeof(size));
    e.payload.resize(size);
    take(e.payload.data(), size);
  }
  return entries;
}

inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// The checkpoint at `path` rewritten with `edit(entries)` applied, under a valid checksum.
template <class Edit>
void edit_checkpoint(const std::filesystem::path& path, Edit&& edit) {
  std::vector<RawEntry> entries = entries_of(read_bytes(path));
  edit(entries);
  write_bytes(path, checkpoint_of(entries));
}

/// The entry called `name`; std::runtime_error when there is none.
inline RawEntry& entry_named(std::vector<RawEntry>& entries, const std::string& name) {
  for (RawEntry& e : entries) {
    if (e.name == name) return e;
  }
  throw std::runtime_error("no entry '" + name + "'");
}

/// The bytes of a value, as a payload.
template <class T>
std::string pod_bytes(const T& value) {
  std::string out;
  xax::detail::append_pod(out, value);
  return out;
}

}  // namespace xax_test
