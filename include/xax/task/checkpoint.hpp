#pragma once
/// \file
/// Checkpoints of trees and strings: a versioned binary file with a CRC-32, written atomically.
///
/// A write goes to a temporary file of its own beside the target (a new name each time, created exclusively,
/// never through a link), is flushed to disk, takes the mode of the checkpoint it replaces (a new one gets
/// 0666 less the umask), and is renamed over the target; the directory is then flushed, where the file system
/// allows it, so that the rename survives a power cut. A crash or a failed write leaves the previous
/// checkpoint intact (and, if the process dies, a stray `<path>.tmp.XXXXXXXX` beside it), and concurrent
/// writes to one path each leave a complete checkpoint there (the last rename wins). A read verifies the
/// magic, the format version and the checksum before it parses anything. A valid checksum proves nothing
/// about who wrote the file, so the parser then trusts no field: each is bounded by the end of the data, and
/// each entry must have a known kind and element type and non-negative dimensions whose element count fits in
/// 64 bits and matches its payload size, and a bool element must be the byte 0 or 1. Every mismatch between
/// the file and the tree being restored (missing entry, dtype, rank, shape, dynamic sizes and compile-time
/// maximum sizes included, entry count) is a CheckpointError that names the entry, and leaves the tree
/// unchanged.
///
/// Layout (little-endian): "XAXCKPT\0", u32 byte-order mark 0x01020304, u32 format version, u64 entry count,
/// entries, u32 CRC-32 of all preceding bytes. An entry: u32 name length, name, u8 kind (0 tensor, 1 string),
/// u8 element code, u8 rank, i64 dims[rank], u64 payload bytes, payload. Entries are sorted by name.
///
/// Version 2 (written since row-major leaves were made to round-trip) holds a tensor's elements in
/// column-major order (the first index fastest, Eigen's default) whatever the storage order of the leaf it
/// was written from; row-major leaves are reordered on the way out and in. Version 1 held each leaf in its
/// own storage order without recording which. It is otherwise the same, and is still read as it always was:
/// each leaf takes the bytes in its own order, so a program resumes from the files it wrote (only a leaf
/// whose layout changed since would read its elements in the other order, as it did before version 2).
///
/// A tree's entries are those named `prefix`, `prefix.*` and `prefix[*`, and the reader requires that there
/// be exactly as many as the tree has leaves, so the writer refuses a tree whose prefix extends another
/// tree's with '.' or '[' (or is extended by one): "model" and "model.ema" cannot both be trees of one
/// checkpoint.

#include <xax/detail/eigen_tensor.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>
#include <xax/detail/format.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

// zlib is switched on by the xax target (XAX_HAS_ZLIB, defined when it links zlib), not by whether <zlib.h>
// happens to be on the include path: a header found without the library linked would fail at link time.
#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
#include <zlib.h>
#endif
#if __has_include(<unistd.h>) && __has_include(<fcntl.h>)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#define XAX_CHECKPOINT_HAS_POSIX 1
#endif

namespace xax {

/// The format version this xax writes. It reads this one and every version back to
/// checkpoint_oldest_format_version (see the file comment for what changed).
inline constexpr std::uint32_t checkpoint_format_version = 2;
inline constexpr std::uint32_t checkpoint_oldest_format_version = 1;

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
#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
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

/// The entry name of the leaf at `path` in a tree added under `prefix`.
inline std::string checkpoint_entry_name(std::string_view prefix, const TreePath& path) {
  std::string name(prefix);
  if (!path.str().empty()) {
    if (!name.empty() && path.str().front() != '[') name += '.';
    name += path.str();
  }
  return name;
}

/// Bytes per element of a known element code; 0 for a code no writer produces.
inline std::size_t element_size(std::uint8_t code) {
  if (code < 4) return dtype_size(static_cast<DType>(code));
  if (code == 16) return sizeof(bool);
  for (const std::uint8_t base : {std::uint8_t{32}, std::uint8_t{48}}) {
    for (const std::uint8_t width : {std::uint8_t{1}, std::uint8_t{2}, std::uint8_t{4}, std::uint8_t{8}}) {
      if (code == base + width) return width;
    }
  }
  return 0;
}

/// Copies the `shape`d elements at `from` into `to`, from row-major to column-major order (`to_column_major`)
/// or back. Bytes on at least one side, so memcpy: the payload holds no T objects.
template <class T, std::size_t N>
void copy_reordered(const char* from, char* to, const std::array<Eigen::Index, N>& shape,
                    bool to_column_major) {
  for_each_reordered(shape, to_column_major, !to_column_major, [&](std::size_t k, std::size_t from_offset) {
    std::memcpy(to + k * sizeof(T), from + from_offset * sizeof(T), sizeof(T));
  });
}

/// Whether a row-major leaf of this shape stores its elements in another order than column-major.
template <class L, std::size_t N>
bool reordered_in_file(const std::array<Eigen::Index, N>& shape) {
  if constexpr (leaf_row_major<L>()) {
    return layout_matters(shape);
  } else {
    return false;
  }
}

/// Random characters for a temporary file name. O_EXCL makes the name unique; the randomness only makes a
/// name that is taken unlikely, so any failure of std::random_device is no error.
inline std::string random_suffix() {
  static std::atomic<std::uint64_t> calls{0};
  std::uint64_t seed =
      calls.fetch_add(1) * 0x9E3779B97F4A7C15ull ^
      static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
#if defined(XAX_CHECKPOINT_HAS_POSIX)
  seed ^= static_cast<std::uint64_t>(::getpid()) << 40;
#endif
  try {
    std::random_device device;
    seed ^= (static_cast<std::uint64_t>(device()) << 32) ^ device();
  } catch (...) {
  }
  std::mt19937_64 generator(seed);
  constexpr std::string_view alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string suffix(8, '\0');
  for (char& c : suffix) c = alphabet[generator() % alphabet.size()];
  return suffix;
}

/// A temporary name beside `path` for one write (the rename over `path` must stay in its directory):
/// `<name>.tmp.<random>`, or, where that would pass the 255 bytes a file name may have on Linux's file
/// systems, `.xax.tmp.<random>`, so that every name a checkpoint may have can be written.
inline std::filesystem::path temporary_beside(const std::filesystem::path& path) {
  const std::string suffix = ".tmp." + random_suffix();
  constexpr std::size_t longest_name = 255;
  if (path.filename().native().size() + suffix.size() <= longest_name) {
    std::filesystem::path temporary = path;
    temporary += suffix;
    return temporary;
  }
  return path.parent_path() / (".xax" + suffix);
}

/// The file `path` names once symbolic links in its last component are followed (a relative target read
/// from the link's directory), as opening `path` for writing would: a checkpoint saved through a link
/// (`latest.xax -> run/step_1000.xax`) replaces the file the link points to, and the link stays. A dangling
/// link names the file it would create. Throws CheckpointError on a loop of links.
inline std::filesystem::path follow_links(const std::filesystem::path& given) {
  constexpr int most_links = 40;  // Linux's own limit on the links one lookup follows
  std::filesystem::path path = given;
  for (int followed = 0; followed < most_links; ++followed) {
    std::error_code error;
    if (!std::filesystem::is_symlink(std::filesystem::symlink_status(path, error))) return path;
    const std::filesystem::path target = std::filesystem::read_symlink(path, error);
    if (error) return path;  // unreadable: the write itself reports what is wrong with the path
    path = target.is_absolute() ? target : path.parent_path() / target;
  }
  throw CheckpointError("cannot write checkpoint '" + given.string() + "': more than " +
                        std::to_string(most_links) + " symbolic links to follow (a loop?)");
}

/// Whether the entries of a tree under `prefix` include `name`: the reader counts them as the tree's.
inline bool entry_under(std::string_view prefix, std::string_view name) {
  if (prefix.empty()) return true;
  if (!name.starts_with(prefix)) return false;
  return name.size() == prefix.size() || name[prefix.size()] == '.' || name[prefix.size()] == '[';
}

}  // namespace detail

/// How CheckpointReader::read_tree treats the shapes of dynamic-size leaves.
enum class LeafShapes {
  exact,            ///< every leaf must already have the stored shape (restoring a live state)
  from_checkpoint,  ///< dynamic dimensions take the stored size (reading into an empty tree)
};

/// Collects named trees and strings, then writes them atomically.
class CheckpointWriter {
 public:
  /// Adds every leaf of `tree` as an entry named `prefix.path` (just `prefix` for a root leaf).
  /// Elements are stored in column-major order whatever the leaf's layout. Throws CheckpointError if the
  /// prefix is one a tree was already added under, or extends one with '.' or '[' (or is extended by one).
  template <class Tree>
  void add_tree(std::string_view prefix, const Tree& tree) {
    check_tree_prefix(prefix);
    // Every leaf's entry is made and checked before the tree is added: a failure (a name already taken, an
    // allocation) leaves the writer as it was, with neither the tree's prefix nor some of its leaves.
    std::map<std::string, detail::CheckpointEntry> tree_entries;
    for_each_leaf_with_path(
        [&]<class L>(const TreePath& path, const L& leaf) {
          using Scalar = leaf_scalar_t<L>;
          detail::CheckpointEntry entry;
          entry.element = detail::element_code<Scalar>();
          const auto shape = detail::leaf_shape(leaf);
          for (const Eigen::Index d : shape) entry.dims.push_back(static_cast<std::int64_t>(d));
          const auto span = leaf_span(leaf);
          const auto* first = reinterpret_cast<const char*>(span.data());
          if (detail::reordered_in_file<L>(shape)) {
            // One element order in every file, so that a leaf of either layout restores the other.
            entry.payload.resize(span.size_bytes());
            detail::copy_reordered<Scalar>(first, entry.payload.data(), shape, true);
          } else {
            entry.payload.assign(first, first + span.size_bytes());
          }
          std::string name = detail::checkpoint_entry_name(prefix, path);
          if (entries_.contains(name) || tree_entries.contains(name)) throw added_twice(name);
          tree_entries.emplace(std::move(name), std::move(entry));
        },
        tree);
    tree_prefixes_.emplace_back(prefix);
    entries_.merge(tree_entries);  // moves the nodes: nothing left to fail
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

  /// Writes to `path` atomically: a temporary file of this call's own beside it (created exclusively, never
  /// through a link), flushed to disk, given the mode of the file it replaces, renamed over `path`, and the
  /// directory flushed. When `path` is a symbolic link, the file it points to is replaced that way, and the
  /// link stays. On failure the temporary file is removed, any previous checkpoint at `path` is untouched,
  /// and CheckpointError says what failed.
  void write(const std::filesystem::path& path) const {
    if (path.empty()) throw CheckpointError("cannot write checkpoint: the path is empty; give a file path");
    if (!path.has_filename()) {
      throw CheckpointError("cannot write checkpoint '" + path.string() +
                            "': the path names a directory, not a file; give a file path");
    }
    const std::filesystem::path file = detail::follow_links(path);
    const std::string data = bytes();
    std::filesystem::path temporary;
    const auto fail = [&](const std::string& what) {
      // Only the temporary file this call created is removed: its name is unique to it.
      std::error_code ignored;
      if (!temporary.empty()) std::filesystem::remove(temporary, ignored);
      return CheckpointError("cannot write checkpoint '" + path.string() + "': " + what +
                             "; the previous checkpoint, if any, is unchanged");
    };
#if defined(XAX_CHECKPOINT_HAS_POSIX)
    // A fixed temporary name would be shared by concurrent writers (one renaming the file while the other
    // still writes into it) and would open whatever stands there: a link's target, a FIFO that blocks, a
    // user's file. O_EXCL makes the name this call's own and refuses links; another random name is tried if
    // it is taken.
    int fd = -1;
    for (int attempt = 0; fd < 0; ++attempt) {
      temporary = detail::temporary_beside(file);
      fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
      if (fd >= 0) break;
      const int open_errno = errno;
      temporary.clear();  // not ours: nothing to remove
      if ((open_errno != EEXIST && open_errno != EINTR) || attempt >= 100)
        throw fail(std::strerror(open_errno));
    }
    const auto fail_closing = [&](const char* step) {
      const int step_errno = errno;  // before anything else can change it
      const std::string reason = std::string(step) + ": " + std::strerror(step_errno);
      ::close(fd);
      return fail(reason);
    };
    // Created 0666 less the umask (and any default ACL), as a new file is; a replaced checkpoint keeps its
    // mode, so that one made private stays private.
    struct stat old {};
    if (::stat(file.c_str(), &old) == 0 && S_ISREG(old.st_mode) &&
        ::fchmod(fd, old.st_mode & static_cast<mode_t>(07777)) != 0)
      throw fail_closing("setting the mode of the temporary file");
    std::size_t written = 0;
    while (written < data.size()) {
      const ::ssize_t n = ::write(fd, data.data() + written, data.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw fail_closing("writing the temporary file");
      if (n == 0) {
        errno = EIO;
        throw fail_closing("writing the temporary file");
      }
      written += static_cast<std::size_t>(n);
    }
    if (::fsync(fd) != 0) throw fail_closing("flushing the temporary file");
    if (::close(fd) != 0) throw fail(std::string("closing the temporary file: ") + std::strerror(errno));
    if (::rename(temporary.c_str(), file.c_str()) != 0) {
      throw fail(std::string("renaming the temporary file over it: ") + std::strerror(errno));
    }
    // The rename is an entry of the directory: until the directory is flushed, a power cut can undo it. The
    // flush is best effort: the checkpoint is in place once renamed, and a directory that cannot be opened
    // (write-only) or flushed (EINVAL, ENOTSUP on some network and FUSE file systems) is no reason to report
    // a save that happened as failed.
    const std::filesystem::path directory = file.has_parent_path() ? file.parent_path() : ".";
    const int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
      static_cast<void>(::fsync(dir_fd));
      ::close(dir_fd);
    }
#else
    // Without POSIX: a temporary name of this call's own, but no exclusive creation or directory flush.
    temporary = detail::temporary_beside(file);
    {
      std::ofstream file(temporary, std::ios::binary | std::ios::trunc);
      file.write(data.data(), static_cast<std::streamsize>(data.size()));
      file.flush();
      if (!file) throw fail("write failed");
    }
    std::error_code error;
    std::filesystem::rename(temporary, file, error);
    if (error) throw fail(error.message());
#endif
  }

 private:
  static CheckpointError added_twice(const std::string& name) {
    return CheckpointError("checkpoint entry '" + name + "' was added twice; give each tree its own prefix");
  }

  void add_entry(std::string name, detail::CheckpointEntry entry) {
    if (entries_.contains(name)) throw added_twice(name);
    entries_.emplace(std::move(name), std::move(entry));
  }

  // read_tree(prefix) takes every tensor under `prefix.` and `prefix[` for its tree's and requires as many
  // as the tree has leaves (which is what catches a checkpoint of another model structure). A tree under
  // another tree's prefix would be counted as part of it, so the writer refuses to write such a file, rather
  // than the reader guessing which entries are whose.
  void check_tree_prefix(std::string_view prefix) const {
    for (const std::string& other : tree_prefixes_) {
      if (other == prefix) {
        throw CheckpointError("checkpoint: a tree was already added under '" + other +
                              "'; give each tree its own prefix");
      }
      const bool under_other = detail::entry_under(other, prefix);
      if (under_other || detail::entry_under(prefix, other)) {
        const std::string outer = under_other ? other : std::string(prefix);
        const std::string whose = under_other ? std::string("its entries")
                                              : "the entries of the tree already under '" + other + "'";
        throw CheckpointError("checkpoint: cannot add a tree under '" + std::string(prefix) + "': " + whose +
                              " would be counted as part of the tree under '" + outer +
                              "' when it is read; give each tree a prefix that neither extends another's "
                              "with '.' or '[' nor is extended by one (e.g. 'model_ema' beside 'model')");
      }
    }
  }

  std::map<std::string, detail::CheckpointEntry> entries_;
  std::vector<std::string> tree_prefixes_;
};

/// A checkpoint read from disk and verified (magic, byte order, version, checksum) before anything is parsed.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::filesystem::path& path) : path_(path.string()) {
    if (path.empty())
      throw CheckpointError("cannot open checkpoint: the path is empty; give a checkpoint file");
    std::error_code status_error;
    const auto status = std::filesystem::status(path, status_error);
    if (!std::filesystem::exists(status)) {
      throw CheckpointError("cannot open checkpoint '" + path_ +
                            "': " + (status_error ? status_error.message() : std::string("no such file")));
    }
    if (std::filesystem::is_directory(status)) throw error("is a directory, not a checkpoint file");
    if (!std::filesystem::is_regular_file(status)) throw error("is not a regular file");
    std::string data;
    try {
      std::ifstream file(path, std::ios::binary);
      if (!file) throw CheckpointError("cannot open checkpoint '" + path_ + "': " + std::strerror(errno));
      // Read in chunks to the end rather than trusting a size taken before the read.
      std::vector<char> chunk(std::size_t{1} << 20);
      while (file) {
        file.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
        data.append(chunk.data(), static_cast<std::size_t>(file.gcount()));
      }
      if (file.bad()) throw CheckpointError("cannot read checkpoint '" + path_ + "'");
    } catch (const std::bad_alloc&) {
      throw error("is too large to read into memory");
    } catch (const std::length_error&) {
      throw error("is too large to read into memory");
    }
    parse(data);
  }

  /// A checkpoint held in memory (the bytes of a file, checksum included), verified and parsed as a file is;
  /// `name` stands for the path in messages.
  [[nodiscard]] static CheckpointReader from_bytes(const std::string& bytes, std::string name = "<memory>") {
    CheckpointReader reader;
    reader.path_ = std::move(name);
    reader.parse(bytes);
    return reader;
  }

  /// Restores every leaf of `tree` from the entries named `prefix.path`. Each entry's dtype and shape must
  /// match the leaf (with LeafShapes::from_checkpoint, dynamic dimensions take the stored size instead), and
  /// the entries under the prefix must be exactly the tree's leaves. Everything is checked before any leaf is
  /// written, so on CheckpointError the tree is unchanged.
  template <class Tree>
  void read_tree(std::string_view prefix, Tree& tree, LeafShapes shapes = LeafShapes::exact) const {
    std::vector<const detail::CheckpointEntry*> matched;
    for_each_leaf_with_path(
        [&]<class L>(const TreePath& path, const L& leaf) {
          const std::string name = detail::checkpoint_entry_name(prefix, path);
          const detail::CheckpointEntry& entry = find(name, detail::EntryKind::tensor);
          check_leaf(name, entry, leaf, shapes);
          matched.push_back(&entry);
        },
        std::as_const(tree));
    const std::size_t stored = count_under(prefix);
    if (stored != matched.size()) {
      throw error(std::to_string(stored) + " tensors are stored under '" + std::string(prefix) +
                  "' but the tree has " + std::to_string(matched.size()) +
                  " leaves; the checkpoint was written for another model structure");
    }
    std::size_t next = 0;
    for_each_leaf(
        [&]<class L>(L& leaf) {
          const detail::CheckpointEntry& entry = *matched[next++];
          if constexpr (eigen_plain_object<L>) {
            leaf.resize(entry.dims[0], entry.dims[1]);
          } else if constexpr (eigen_tensor_leaf<L> && requires { leaf.resize(leaf.dimensions()); }) {
            typename L::Dimensions dims;
            for (std::size_t i = 0; i < entry.dims.size(); ++i) dims[i] = entry.dims[i];
            leaf.resize(dims);
          }
          const auto span = leaf_span(leaf);
          const auto shape = detail::leaf_shape(leaf);
          if (version_ >= 2 && detail::reordered_in_file<L>(shape)) {
            // The file holds column-major order; a version 1 file holds the leaf's own, as it was read then.
            detail::copy_reordered<leaf_scalar_t<L>>(entry.payload.data(),
                                                     reinterpret_cast<char*>(span.data()), shape, false);
          } else if (!entry.payload.empty()) {
            std::memcpy(span.data(), entry.payload.data(), entry.payload.size());
          }
        },
        tree);
  }

  /// The string entry `name`.
  [[nodiscard]] std::string read_string(std::string_view name) const {
    const auto& payload = find(std::string(name), detail::EntryKind::string).payload;
    return {payload.begin(), payload.end()};
  }

  [[nodiscard]] bool contains(std::string_view name) const { return entries_.contains(std::string(name)); }

 private:
  CheckpointReader() = default;

  CheckpointError error(const std::string& what) const {
    return CheckpointError("checkpoint '" + path_ + "': " + what);
  }

  // Whether `entry` can be copied into `leaf`: same element type and shape, where with
  // LeafShapes::from_checkpoint a dimension the leaf can resize may differ, up to the leaf's compile-time
  // maximum; and an element order the file records for this leaf.
  template <class L>
  void check_leaf(const std::string& name, const detail::CheckpointEntry& entry, const L& leaf,
                  LeafShapes shapes) const {
    using Scalar = leaf_scalar_t<L>;
    if (entry.element != detail::element_code<Scalar>()) {
      throw error("entry '" + name + "' holds " + detail::element_name(entry.element) + " but the tree has " +
                  detail::element_name(detail::element_code<Scalar>()));
    }
    const auto live = detail::leaf_shape(leaf);
    const auto mismatch = [&](const std::string& why) {
      return error("entry '" + name + "' has shape " + detail::shape_string(entry.dims) +
                   " but the live leaf has " + detail::shape_string(live) + why);
    };
    if (entry.dims.size() != live.size()) throw mismatch(" (another rank)");
    for (std::size_t i = 0; i < live.size(); ++i) {
      if (entry.dims[i] == static_cast<std::int64_t>(live[i])) continue;
      if (shapes == LeafShapes::exact) {
        throw mismatch(
            resizable_dimension<L>(i)
                ? "; the checkpoint was written for another model shape (to take the stored shapes "
                  "into an empty tree, read it with LeafShapes::from_checkpoint)"
                : "; the checkpoint was written for another model shape");
      }
      if (!resizable_dimension<L>(i)) throw mismatch(", a size the tree's fixed-size leaf cannot take");
      // A dynamic dimension with a compile-time maximum lives in inline storage of that size: resize() to
      // more would write past it.
      const std::int64_t most = max_dimension<L>(i);
      if (most >= 0 && entry.dims[i] > most) {
        throw mismatch(std::string(", more ") + (i == 0 ? "rows" : "columns") +
                       " than the tree's leaf can hold (at most " + std::to_string(most) + ", its " +
                       (i == 0 ? "MaxRowsAtCompileTime" : "MaxColsAtCompileTime") + ")");
      }
    }
  }

  template <class L>
  static constexpr bool resizable_dimension(std::size_t i) {
    if constexpr (eigen_plain_object<L>) {
      return (i == 0 ? L::RowsAtCompileTime : L::ColsAtCompileTime) == Eigen::Dynamic;
    } else if constexpr (eigen_tensor_leaf<L>) {
      return requires(L & leaf) {
        leaf.resize(leaf.dimensions());
      };
    } else {
      return false;
    }
  }

  // The compile-time maximum of a resizable dimension, -1 for none. Eigen::Tensor has none: it always
  // allocates.
  template <class L>
  static constexpr std::int64_t max_dimension(std::size_t i) {
    if constexpr (eigen_plain_object<L>) {
      const Eigen::Index most = i == 0 ? L::MaxRowsAtCompileTime : L::MaxColsAtCompileTime;
      return most == Eigen::Dynamic ? -1 : static_cast<std::int64_t>(most);
    } else {
      return -1;
    }
  }

  const detail::CheckpointEntry& find(const std::string& name, detail::EntryKind kind) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) throw error("has no entry '" + name + "'");
    if (it->second.kind != kind) throw error("entry '" + name + "' is of another kind");
    return it->second;
  }

  // The tensors a tree under `prefix` takes for its own (CheckpointWriter refuses trees under one another's
  // prefix, so in a file it wrote these are exactly the tree's entries).
  std::size_t count_under(std::string_view prefix) const {
    std::size_t count = 0;
    for (const auto& [name, entry] : entries_) {
      if (entry.kind == detail::EntryKind::tensor && detail::entry_under(prefix, name)) ++count;
    }
    return count;
  }

  void parse(const std::string& data) {
    constexpr std::size_t header = sizeof(detail::checkpoint_magic) + 2 * sizeof(std::uint32_t);
    constexpr std::size_t smallest = header + sizeof(std::uint64_t) + sizeof(std::uint32_t);
    if (data.size() < smallest) {
      throw error("is truncated or empty (" + std::to_string(data.size()) +
                  " bytes; a checkpoint has at least " + std::to_string(smallest) + ")");
    }
    if (std::memcmp(data.data(), detail::checkpoint_magic, sizeof(detail::checkpoint_magic)) != 0)
      throw error("is not an xax checkpoint");
    std::uint32_t mark = 0, version = 0, stored_crc = 0;
    std::memcpy(&mark, data.data() + sizeof(detail::checkpoint_magic), sizeof(mark));
    if (mark != detail::checkpoint_byte_order_mark)
      throw error("was written on a machine of another byte order");
    std::memcpy(&version, data.data() + sizeof(detail::checkpoint_magic) + sizeof(mark), sizeof(version));
    if (version < checkpoint_oldest_format_version || version > checkpoint_format_version) {
      throw error("has format version " + std::to_string(version) + "; this xax reads versions " +
                  std::to_string(checkpoint_oldest_format_version) + " and " +
                  std::to_string(checkpoint_format_version));
    }
    version_ = version;
    const std::size_t end = data.size() - sizeof(stored_crc);
    std::memcpy(&stored_crc, data.data() + end, sizeof(stored_crc));
    if (detail::crc32_of(data, end) != stored_crc) {
      throw error("fails its checksum: the file is corrupt or was cut short");
    }

    // From here on `offset <= end` holds: every read is bounded by the data's end, before the checksum.
    std::size_t offset = header;
    const auto require = [&](std::size_t size, const std::string& what) {
      if (end - offset < size) {
        throw error("is malformed: " + what + " (" + std::to_string(size) + " bytes at offset " +
                    std::to_string(offset) + ") runs past the end of the data (" + std::to_string(end) +
                    " bytes)");
      }
    };
    const auto take = [&](void* out, std::size_t size, const std::string& what) {
      require(size, what);
      std::memcpy(out, data.data() + offset, size);
      offset += size;
    };
    std::uint64_t count = 0;
    take(&count, sizeof(count), "the entry count");
    for (std::uint64_t i = 0; i < count; ++i) {
      const std::string ordinal = "entry " + std::to_string(i);
      std::uint32_t name_size = 0;
      take(&name_size, sizeof(name_size), "the name length of " + ordinal);
      // Checked before the name is allocated: the length is untrusted and may claim up to 4 GiB.
      require(name_size, "the name of " + ordinal);
      std::string name(name_size, '\0');
      take(name.data(), name_size, "the name of " + ordinal);
      const std::string what = ordinal + " '" + name + "'";
      detail::CheckpointEntry entry;
      std::uint8_t kind = 0, rank = 0;
      take(&kind, 1, "the kind of " + what);
      take(&entry.element, 1, "the element code of " + what);
      take(&rank, 1, "the rank of " + what);
      if (kind > 1)
        throw error(what + " has kind " + std::to_string(kind) +
                    "; known kinds are 0 (tensor) and 1 (string)");
      entry.kind = static_cast<detail::EntryKind>(kind);
      entry.dims.resize(rank);
      for (std::int64_t& d : entry.dims) take(&d, sizeof(d), "a dimension of " + what);
      std::uint64_t size = 0;
      take(&size, sizeof(size), "the payload size of " + what);
      if (end - offset < size) {
        throw error("is malformed: the payload of " + what + " (" + std::to_string(size) +
                    " bytes) runs past the end of the data (" + std::to_string(end - offset) +
                    " bytes left)");
      }
      check_layout(what, entry, size);
      if (entry.kind == detail::EntryKind::tensor && entry.element == detail::element_code<bool>())
        check_bools(what, data.data() + offset, static_cast<std::size_t>(size));
      entry.payload.assign(data.begin() + static_cast<std::ptrdiff_t>(offset),
                           data.begin() + static_cast<std::ptrdiff_t>(offset + size));
      offset += size;
      if (!entries_.emplace(name, std::move(entry)).second) throw error("holds entry '" + name + "' twice");
    }
    if (offset != end) throw error("has " + std::to_string(end - offset) + " unexpected trailing bytes");
  }

  // An entry's header must describe its payload: strings have no element type or shape; a tensor has a known
  // element type and non-negative dimensions whose product, times the element size, is the payload size.
  void check_layout(const std::string& what, const detail::CheckpointEntry& entry, std::uint64_t size) const {
    if (entry.kind == detail::EntryKind::string) {
      if (entry.element != 0 || !entry.dims.empty()) {
        throw error(what + " is a string but has element code " + std::to_string(entry.element) +
                    " and rank " + std::to_string(entry.dims.size()) + "; a string has 0 and 0");
      }
      return;
    }
    const std::size_t element_bytes = detail::element_size(entry.element);
    if (element_bytes == 0) {
      throw error(what + " has unknown element code " + std::to_string(entry.element) +
                  "; known codes are 0-3 (float16, bfloat16, float32, float64), 16 (bool), 33-40 and 49-56 "
                  "(integers)");
    }
    // Dimensions are Eigen::Index values. The product of the non-zero ones must fit too, so that no order of
    // multiplying them (Eigen's included) overflows.
    std::int64_t nonzero_product = 1;
    bool empty = false;
    for (std::size_t k = 0; k < entry.dims.size(); ++k) {
      const std::int64_t d = entry.dims[k];
      if (d < 0) {
        throw error(what + " has dimension " + std::to_string(k) + " = " + std::to_string(d) +
                    "; dimensions are >= 0");
      }
      if (d == 0) {
        empty = true;
      } else if (nonzero_product > std::numeric_limits<std::int64_t>::max() / d) {
        throw error(what + " has shape " + detail::shape_string(entry.dims) +
                    ", whose element count overflows a 64-bit integer");
      }
      if (d != 0) nonzero_product *= d;
    }
    const auto elements = static_cast<std::uint64_t>(empty ? 0 : nonzero_product);
    if (elements > size / element_bytes || elements * element_bytes != size) {
      throw error(what + " has shape " + detail::shape_string(entry.dims) + " of " +
                  detail::element_name(entry.element) + ", which takes " +
                  (elements > std::numeric_limits<std::uint64_t>::max() / element_bytes
                       ? std::string("more than 2^64")
                       : std::to_string(elements * element_bytes)) +
                  " bytes, but its payload holds " + std::to_string(size));
    }
  }

  // A bool holds 0 or 1 and nothing else: copying any other byte into one is undefined behaviour.
  void check_bools(const std::string& what, const char* payload, std::size_t size) const {
    static_assert(sizeof(bool) == 1, "xax checkpoints store a bool as one byte");
    for (std::size_t k = 0; k < size; ++k) {
      const auto byte = static_cast<unsigned char>(payload[k]);
      if (byte > 1) {
        throw error(what + " holds byte " + std::to_string(byte) + " at element " + std::to_string(k) +
                    "; bool bytes must be 0 or 1");
      }
    }
  }

  std::string path_;
  std::uint32_t version_ = checkpoint_format_version;
  std::map<std::string, detail::CheckpointEntry> entries_;
};

/// What a train-state load (TrainStep::load_train_state, MixedPrecisionMixin::load_train_state) calls once it
/// has read and checked everything, right before the live state changes: throwing from `before_commit`
/// cancels the load and leaves the state as it was. TrainMixin::load_checkpoint passes one under data
/// parallelism, so that the processes either all adopt a checkpoint or all refuse it (one process whose copy
/// of the file is unreadable would otherwise leave the others waiting in a collective for ever).
struct LoadCommitHook {
  std::function<void()> before_commit;
};

namespace detail {
/// Throws CheckpointError unless an optimizer's step count read from checkpoint entry `entry` is one a run
/// can hold and still count its next step from: 0 <= step < the type's maximum (adding one past it is
/// undefined behaviour, and a crafted file could otherwise ask for it).
template <std::integral Count>
void require_countable_step(Count step, const std::string& entry) {
  if (step < 0 || step == std::numeric_limits<Count>::max()) {
    throw CheckpointError("checkpoint entry '" + entry + "' is " + std::to_string(step) +
                          "; an optimizer's step count is >= 0 and < " +
                          std::to_string(std::numeric_limits<Count>::max()) + " (the next step adds one)");
  }
}
}  // namespace detail

}  // namespace xax
