#pragma once
/// \file
/// Checkpoints of trees and strings: a versioned binary file with a CRC-32, written atomically.
///
/// A write goes to a temporary file beside the target, is flushed to disk, and is renamed over the target, so
/// a crash or a failed write leaves the previous checkpoint intact. A read verifies the magic, the format
/// version and the checksum before it parses anything, and every mismatch between the file and the tree being
/// restored (missing entry, dtype, rank, shape, entry count) is a CheckpointError that names the entry.
///
/// Layout (little-endian): "XAXCKPT\0", u32 byte-order mark 0x01020304, u32 format version, u64 entry count,
/// entries, u32 CRC-32 of all preceding bytes. An entry: u32 name length, name, u8 kind (0 tensor, 1 string),
/// u8 element code, u8 rank, i64 dims[rank], u64 payload bytes, payload.

#include <xax/detail/eigen_tensor.hpp>

#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

#if __has_include(<zlib.h>)
#include <zlib.h>
#define XAX_CHECKPOINT_HAS_ZLIB 1
#endif
#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <unistd.h>
#define XAX_CHECKPOINT_HAS_POSIX 1
#endif

namespace xax {

inline constexpr std::uint32_t checkpoint_format_version = 1;

namespace detail {

inline constexpr char checkpoint_magic[8] = {'X', 'A', 'X', 'C', 'K', 'P', 'T', '\0'};
inline constexpr std::uint32_t checkpoint_byte_order_mark = 0x01020304u;

enum class EntryKind : std::uint8_t { tensor = 0, string = 1 };

// Element codes: the four floating DTypes first, then integers by width and signedness.
template <class T>
constexpr std::uint8_t element_code() {
  if constexpr (floating_scalar<T>) {
    return static_cast<std::uint8_t>(dtype_of<T>);
  } else if constexpr (std::same_as<T, bool>) {
    return 16;
  } else {
    static_assert(std::is_integral_v<T>, "xax: checkpoint leaves hold floating or integer elements");
    return static_cast<std::uint8_t>(32 + (std::is_signed_v<T> ? 16 : 0) + sizeof(T));
  }
}

inline std::uint32_t crc32_of(const std::string& bytes, std::size_t count) {
#if defined(XAX_CHECKPOINT_HAS_ZLIB)
  uLong crc = ::crc32(0L, Z_NULL, 0);
  std::size_t offset = 0;
  while (offset < count) {  // zlib takes uInt lengths
    const auto chunk = static_cast<uInt>(std::min<std::size_t>(count - offset, 1u << 30));
    crc = ::crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + offset), chunk);
    offset += chunk;
  }
  return static_cast<std::uint32_t>(crc);
#else
  (void)bytes;
  (void)count;
  throw CheckpointError("xax checkpoints need zlib for their checksum (Debian: zlib1g-dev); rebuild with it");
#endif
}

template <class T>
void append_pod(std::string& out, const T& value) {
  static_assert(std::is_trivially_copyable_v<T>);
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

struct CheckpointEntry {
  EntryKind kind = EntryKind::tensor;
  std::uint8_t element = 0;
  std::vector<std::int64_t> dims;
  // A vector rather than a string: GCC 12 reports false maybe-uninitialized warnings on moved SSO strings.
  std::vector<char> payload;
};

inline std::string element_name(std::uint8_t code) {
  if (code < 4) return std::string(dtype_name(static_cast<DType>(code)));
  if (code == 16) return "bool";
  if (code > 32)
    return std::string(code >= 48 ? "int" : "uint") + std::to_string(8 * (code - (code >= 48 ? 48 : 32)));
  return "element code " + std::to_string(code);
}

}  // namespace detail

/// Collects named trees and strings, then writes them atomically.
class CheckpointWriter {
 public:
  /// Adds every leaf of `tree` as an entry named `prefix.path` (just `prefix` for a root leaf).
  template <class Tree>
  void add_tree(std::string_view prefix, const Tree& tree) {
    for_each_leaf_with_path(
        [&]<class L>(const TreePath& path, const L& leaf) {
          using Scalar = leaf_scalar_t<L>;
          detail::CheckpointEntry entry;
          entry.element = detail::element_code<Scalar>();
          if constexpr (!scalar_leaf<L>) {
            for (const Eigen::Index d : detail::leaf_shape(leaf))
              entry.dims.push_back(static_cast<std::int64_t>(d));
          }
          const auto span = leaf_span(leaf);
          const auto* first = reinterpret_cast<const char*>(span.data());
          entry.payload.assign(first, first + span.size_bytes());
          add_entry(entry_name(prefix, path), std::move(entry));
        },
        tree);
  }

  /// Adds a string entry (RNG states, policy names, free-form metadata).
  void add_string(std::string_view name, std::string value) {
    detail::CheckpointEntry entry;
    entry.kind = detail::EntryKind::string;
    entry.payload.assign(value.begin(), value.end());
    add_entry(std::string(name), std::move(entry));
  }

  /// The serialised checkpoint, checksum included.
  [[nodiscard]] std::string bytes() const {
    std::string out(detail::checkpoint_magic, sizeof(detail::checkpoint_magic));
    detail::append_pod(out, detail::checkpoint_byte_order_mark);
    detail::append_pod(out, checkpoint_format_version);
    detail::append_pod(out, static_cast<std::uint64_t>(entries_.size()));
    for (const auto& [name, entry] : entries_) {
      detail::append_pod(out, static_cast<std::uint32_t>(name.size()));
      out += name;
      detail::append_pod(out, static_cast<std::uint8_t>(entry.kind));
      detail::append_pod(out, entry.element);
      detail::append_pod(out, static_cast<std::uint8_t>(entry.dims.size()));
      for (const std::int64_t d : entry.dims) detail::append_pod(out, d);
      detail::append_pod(out, static_cast<std::uint64_t>(entry.payload.size()));
      out.append(entry.payload.data(), entry.payload.size());
    }
    detail::append_pod(out, detail::crc32_of(out, out.size()));
    return out;
  }

  /// Writes to `path` atomically: temporary file, flush to disk, rename. On failure the temporary file is
  /// removed, any previous checkpoint at `path` is untouched, and CheckpointError says what failed.
  void write(const std::filesystem::path& path) const {
    const std::string data = bytes();
    std::filesystem::path temporary = path;
    temporary += ".tmp";
    const auto fail = [&](const std::string& what) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      return CheckpointError("cannot write checkpoint '" + path.string() + "': " + what +
                             "; the previous checkpoint, if any, is unchanged");
    };
#if defined(XAX_CHECKPOINT_HAS_POSIX)
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw fail(std::strerror(errno));
    std::size_t written = 0;
    while (written < data.size()) {
      const ::ssize_t n = ::write(fd, data.data() + written, data.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const std::string reason = std::strerror(errno);
        ::close(fd);
        throw fail(reason);
      }
      written += static_cast<std::size_t>(n);
    }
    if (::fsync(fd) != 0) {
      const std::string reason = std::strerror(errno);
      ::close(fd);
      throw fail(reason);
    }
    if (::close(fd) != 0) throw fail(std::strerror(errno));
#else
    {
      std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
      file.write(data.data(), static_cast<std::streamsize>(data.size()));
      file.flush();
      if (!file) throw fail("write failed");
    }
#endif
    std::error_code error;
    std::filesystem::rename(temporary, path, error);
    if (error) throw fail(error.message());
  }

 private:
  static std::string entry_name(std::string_view prefix, const TreePath& path) {
    std::string name(prefix);
    if (!path.str().empty()) {
      if (!name.empty() && path.str().front() != '[') name += '.';
      name += path.str();
    }
    return name;
  }

  void add_entry(std::string name, detail::CheckpointEntry entry) {
    if (!entries_.emplace(name, std::move(entry)).second) {
      throw CheckpointError("checkpoint entry '" + name + "' was added twice; give each tree its own prefix");
    }
  }

  std::map<std::string, detail::CheckpointEntry> entries_;
};

/// A checkpoint read from disk and verified (magic, byte order, version, checksum) before anything is parsed.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::filesystem::path& path) : path_(path.string()) {
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) throw CheckpointError("cannot open checkpoint '" + path_ + "': " + std::strerror(errno));
    std::string data(static_cast<std::size_t>(file.tellg()), '\0');
    file.seekg(0);
    if (!file.read(data.data(), static_cast<std::streamsize>(data.size()))) {
      throw CheckpointError("cannot read checkpoint '" + path_ + "'");
    }
    parse(data);
  }

  /// Restores every leaf of `tree` from the entries named `prefix.path`. Dynamic leaves are resized; the
  /// entry count under the prefix, each dtype, rank and fixed shape must match.
  template <class Tree>
  void read_tree(std::string_view prefix, Tree& tree) const {
    std::size_t consumed = 0;
    for_each_leaf_with_path(
        [&]<class L>(const TreePath& path, L& leaf) {
          using Scalar = leaf_scalar_t<L>;
          std::string name(prefix);
          if (!path.str().empty()) {
            if (!name.empty() && path.str().front() != '[') name += '.';
            name += path.str();
          }
          const detail::CheckpointEntry& entry = find(name, detail::EntryKind::tensor);
          if (entry.element != detail::element_code<Scalar>()) {
            throw error("entry '" + name + "' holds " + detail::element_name(entry.element) +
                        " but the tree has " + detail::element_name(detail::element_code<Scalar>()));
          }
          if constexpr (eigen_plain_object<L>) {
            if (entry.dims.size() != 2) throw error("entry '" + name + "' is not a matrix");
            const Eigen::Index rows = entry.dims[0], cols = entry.dims[1];
            if ((L::RowsAtCompileTime != Eigen::Dynamic && L::RowsAtCompileTime != rows) ||
                (L::ColsAtCompileTime != Eigen::Dynamic && L::ColsAtCompileTime != cols) || rows < 0 ||
                cols < 0) {
              throw error("entry '" + name + "' has shape " + std::to_string(rows) + "x" +
                          std::to_string(cols) + ", which the tree's fixed-size leaf cannot take");
            }
            leaf.resize(rows, cols);
          } else if constexpr (eigen_tensor_leaf<L> && requires { leaf.resize(leaf.dimensions()); }) {
            if (entry.dims.size() != static_cast<std::size_t>(L::NumDimensions)) {
              throw error("entry '" + name + "' has rank " + std::to_string(entry.dims.size()) +
                          " but the tree's tensor has rank " + std::to_string(L::NumDimensions));
            }
            typename L::Dimensions dims;
            for (std::size_t i = 0; i < entry.dims.size(); ++i) dims[i] = entry.dims[i];
            leaf.resize(dims);
          }
          const auto span = leaf_span(leaf);
          if (span.size_bytes() != entry.payload.size()) {
            throw error("entry '" + name + "' holds " + std::to_string(entry.payload.size()) +
                        " bytes but the tree's leaf takes " + std::to_string(span.size_bytes()));
          }
          if (!entry.payload.empty()) std::memcpy(span.data(), entry.payload.data(), entry.payload.size());
          ++consumed;
        },
        tree);
    const std::size_t stored = count_under(prefix);
    if (stored != consumed) {
      throw error(std::to_string(stored) + " tensors are stored under '" + std::string(prefix) +
                  "' but the tree has " + std::to_string(consumed) +
                  " leaves; the checkpoint was written for another model structure");
    }
  }

  /// The string entry `name`.
  [[nodiscard]] std::string read_string(std::string_view name) const {
    const auto& payload = find(std::string(name), detail::EntryKind::string).payload;
    return {payload.begin(), payload.end()};
  }

  [[nodiscard]] bool contains(std::string_view name) const { return entries_.contains(std::string(name)); }

 private:
  CheckpointError error(const std::string& what) const {
    return CheckpointError("checkpoint '" + path_ + "': " + what);
  }

  const detail::CheckpointEntry& find(const std::string& name, detail::EntryKind kind) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) throw error("has no entry '" + name + "'");
    if (it->second.kind != kind) throw error("entry '" + name + "' is of another kind");
    return it->second;
  }

  std::size_t count_under(std::string_view prefix) const {
    std::size_t count = 0;
    for (const auto& [name, entry] : entries_) {
      if (entry.kind != detail::EntryKind::tensor || !name.starts_with(prefix)) continue;
      const char next = name.size() > prefix.size() ? name[prefix.size()] : '\0';
      if (prefix.empty() || next == '\0' || next == '.' || next == '[') ++count;
    }
    return count;
  }

  void parse(const std::string& data) {
    std::size_t offset = 0;
    const auto take = [&](void* out, std::size_t size, const char* what) {
      if (data.size() - offset < size) throw error(std::string("is truncated (while reading ") + what + ")");
      std::memcpy(out, data.data() + offset, size);
      offset += size;
    };
    char magic[sizeof(detail::checkpoint_magic)];
    if (data.size() < sizeof(magic) + 4 * sizeof(std::uint32_t) + sizeof(std::uint64_t)) {
      throw error("is truncated or empty (" + std::to_string(data.size()) + " bytes)");
    }
    take(magic, sizeof(magic), "magic");
    if (std::memcmp(magic, detail::checkpoint_magic, sizeof(magic)) != 0)
      throw error("is not an xax checkpoint");
    std::uint32_t mark = 0, version = 0, stored_crc = 0;
    take(&mark, sizeof(mark), "byte-order mark");
    if (mark != detail::checkpoint_byte_order_mark)
      throw error("was written on a machine of another byte order");
    take(&version, sizeof(version), "version");
    if (version != checkpoint_format_version) {
      throw error("has format version " + std::to_string(version) + "; this xax reads version " +
                  std::to_string(checkpoint_format_version));
    }
    std::memcpy(&stored_crc, data.data() + data.size() - sizeof(stored_crc), sizeof(stored_crc));
    if (detail::crc32_of(data, data.size() - sizeof(stored_crc)) != stored_crc) {
      throw error("fails its checksum: the file is corrupt or was cut short");
    }
    const std::size_t end = data.size() - sizeof(stored_crc);
    std::uint64_t count = 0;
    take(&count, sizeof(count), "entry count");
    for (std::uint64_t i = 0; i < count; ++i) {
      std::uint32_t name_size = 0;
      take(&name_size, sizeof(name_size), "entry name length");
      if (end - offset < name_size) throw error("is truncated (entry name)");
      std::string name = data.substr(offset, name_size);
      offset += name_size;
      detail::CheckpointEntry entry;
      std::uint8_t kind = 0, rank = 0;
      take(&kind, 1, "entry kind");
      take(&entry.element, 1, "element code");
      take(&rank, 1, "rank");
      if (kind > 1) throw error("entry '" + name + "' has an unknown kind");
      entry.kind = static_cast<detail::EntryKind>(kind);
      entry.dims.resize(rank);
      for (std::int64_t& d : entry.dims) take(&d, sizeof(d), "dimension");
      std::uint64_t size = 0;
      take(&size, sizeof(size), "payload size");
      if (end - offset < size) throw error("is truncated (payload of '" + name + "')");
      entry.payload.assign(data.begin() + static_cast<std::ptrdiff_t>(offset),
                           data.begin() + static_cast<std::ptrdiff_t>(offset + size));
      offset += size;
      entries_.emplace(std::move(name), std::move(entry));
    }
    if (offset != end) throw error("has " + std::to_string(end - offset) + " unexpected trailing bytes");
  }

  std::string path_;
  std::map<std::string, detail::CheckpointEntry> entries_;
};

}  // namespace xax
