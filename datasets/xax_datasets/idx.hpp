#pragma once
/// \file
/// Reading IDX files (the format of MNIST and Fashion-MNIST), gzipped or plain, with every header field
/// checked against the bytes that follow.
///
///     xax::IdxArray images = xax::read_idx("train-images-idx3-ubyte.gz");  // type uint8, shape {60000, 28,
///     28}
///
/// An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions), one
/// big-endian uint32 per dimension, then the elements in row-major order, big-endian. Every way a file can
/// disagree with that (bad magic, unknown dtype code, fewer or more bytes than the dimensions say, a corrupt
/// or truncated gzip stream, bytes after the gzip data, a missing file) throws xax::DataError naming the file
/// and what was wrong. A gzipped file may hold several gzip members, read as one stream as gunzip does. Pipes
/// and /dev/stdin are read like files.
///
/// Gzipped files need zlib: with it (the xax_datasets CMake target links it when found and defines
/// XAX_HAS_ZLIB), plain and gzipped files are both read. Without it, plain files are still read and a gzipped
/// one throws a DataError saying how to get zlib, so this header compiles everywhere.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>
#include <xax/utils/error.hpp>

#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
#include <zlib.h>
#define XAX_IDX_GZIP 1
#else
#define XAX_IDX_GZIP 0
#endif

namespace xax {

/// The element types IDX defines, with their codes (the third byte of the magic number).
enum class IdxType : std::uint8_t {
  uint8 = 0x08,
  int8 = 0x09,
  int16 = 0x0B,
  int32 = 0x0C,
  float32 = 0x0D,
  float64 = 0x0E,
};

/// Bytes per element of an IDX type.
constexpr std::size_t idx_type_size(IdxType type) {
  switch (type) {
    case IdxType::uint8:
    case IdxType::int8:
      return 1;
    case IdxType::int16:
      return 2;
    case IdxType::int32:
    case IdxType::float32:
      return 4;
    case IdxType::float64:
      return 8;
  }
  return 0;
}

/// The name of an IDX type: "uint8", "int8", "int16", "int32", "float32" or "float64".
constexpr std::string_view idx_type_name(IdxType type) {
  switch (type) {
    case IdxType::uint8:
      return "uint8";
    case IdxType::int8:
      return "int8";
    case IdxType::int16:
      return "int16";
    case IdxType::int32:
      return "int32";
    case IdxType::float32:
      return "float32";
    case IdxType::float64:
      return "float64";
  }
  return "invalid IdxType";
}

/// The contents of one IDX file. `bytes` holds the elements as stored: row-major and big-endian.
struct IdxArray {
  IdxType type = IdxType::uint8;
  std::vector<std::size_t> shape;
  std::vector<std::uint8_t> bytes;

  /// The number of elements: the product of the shape.
  [[nodiscard]] std::size_t element_count() const {
    std::size_t count = 1;
    for (std::size_t dim : shape) count *= dim;
    return count;
  }
};

namespace detail {

[[noreturn]] inline void throw_idx_error(const std::filesystem::path& file, std::string_view problem) {
  std::string message = "IDX file '";
  message += file.string();
  message += "': ";
  message += problem;
  throw DataError(message);
}

inline std::string hex(std::uint32_t value, int digits) {
  std::array<char, 16> text{};
  std::snprintf(text.data(), text.size(), "0x%0*X", digits, static_cast<unsigned>(value));
  return text.data();
}

inline std::uint32_t read_big_endian_u32(const std::uint8_t* bytes) {
  return (std::uint32_t{bytes[0]} << 24) | (std::uint32_t{bytes[1]} << 16) | (std::uint32_t{bytes[2]} << 8) |
         std::uint32_t{bytes[3]};
}

/// A byte stream over a plain or gzipped file, which may be a pipe or /dev/stdin. read() returns fewer bytes
/// than asked only at the end of the data; a corrupt stream throws.
class IdxByteSource {
 public:
  explicit IdxByteSource(const std::filesystem::path& file) : file_(file) {
    std::error_code error;
    const auto status = std::filesystem::status(file, error);
    if (status.type() == std::filesystem::file_type::not_found)
      throw_idx_error(file, "the file does not exist");
    // The path exists but stat failed (a symlink loop, a directory on the way that may not be searched):
    // "does not exist" would send the user looking for the wrong problem.
    if (error) throw_idx_error(file, "cannot be checked: " + error.message());
    if (std::filesystem::is_directory(status)) throw_idx_error(file, "is a directory, not a file");
    handle_.reset(std::fopen(file.c_str(), "rb"));
    if (!handle_) {
      const int open_error = errno;
      throw_idx_error(file, "cannot be opened for reading: " + std::generic_category().message(open_error));
    }
    // The first two bytes tell gzip from plain data. They are kept and served by read() rather than
    // rewound over: a pipe cannot be rewound, and a failed rewind would silently drop them.
    head_size_ = std::fread(head_.data(), 1, head_.size(), handle_.get());
    check_read_error();
    const bool gzip = head_size_ == 2 && head_[0] == 0x1f && head_[1] == 0x8b;
#if XAX_IDX_GZIP
    if (gzip) start_gzip(status);
#else
    if (gzip) {
      throw_idx_error(
          file,
          "is gzip-compressed, but this build of xax has no zlib; install zlib (Debian: zlib1g-dev) "
          "and reconfigure with CMake, or decompress the file with gunzip");
    }
#endif
  }

  /// Reads up to `size` bytes into `out`; returns how many were read (less than `size` only at the end).
  std::size_t read(std::uint8_t* out, std::size_t size) {
#if XAX_IDX_GZIP
    if (inflate_) return read_gzip(out, size);
#endif
    std::size_t done = 0;
    for (; head_used_ < head_size_ && done < size; ++head_used_) out[done++] = head_[head_used_];
    while (done < size) {
      const std::size_t got = std::fread(out + done, 1, size - done, handle_.get());
      check_read_error();
      if (got == 0) break;
      done += got;
    }
    return done;
  }

 private:
  void check_read_error() {
    if (std::ferror(handle_.get()) != 0) {
      const int read_error = errno;
      throw_idx_error(file_, "a read error occurred: " + std::generic_category().message(read_error));
    }
  }

#if XAX_IDX_GZIP
  // zlib's inflate rather than gzread: gzread silently drops whatever follows the gzip data when it is not
  // another gzip member, so a file with junk appended would read as valid.
  struct InflateEnd {
    void operator()(z_stream* stream) const {
      inflateEnd(stream);
      delete stream;
    }
  };

  void start_gzip(const std::filesystem::file_status& status) {
    // Large reads keep Fashion-MNIST's 26 MB of compressed pixels quick to read (zlib's default 8 KiB made
    // it several times slower); a small file gets a buffer of its own size, as allocating large buffers
    // dominated reading many small files.
    constexpr std::size_t large_buffer = std::size_t{1} << 18;
    std::size_t buffer = large_buffer;
    std::error_code error;
    const std::uintmax_t size =
        std::filesystem::is_regular_file(status) ? std::filesystem::file_size(file_, error) : large_buffer;
    if (!error)
      buffer = static_cast<std::size_t>(std::clamp<std::uintmax_t>(size, head_.size(), large_buffer));
    input_ = std::make_unique_for_overwrite<std::uint8_t[]>(buffer);
    input_size_ = buffer;
    std::copy_n(head_.data(), head_size_, input_.get());
    head_used_ = head_size_;

    auto stream = std::make_unique<z_stream>();
    // 16 + MAX_WBITS: the gzip format only (header, CRC-32 and length checked), with the largest window.
    const int code = inflateInit2(stream.get(), 16 + MAX_WBITS);
    if (code == Z_MEM_ERROR) throw std::bad_alloc();
    if (code != Z_OK) throw_gzip_error("zlib could not be initialised", code);
    inflate_.reset(stream.release());
    inflate_->next_in = input_.get();
    inflate_->avail_in = static_cast<uInt>(head_size_);
    input_read_ = head_size_;
  }

  std::size_t read_gzip(std::uint8_t* out, std::size_t size) {
    z_stream& stream = *inflate_;
    std::size_t done = 0;
    while (done < size) {
      if (member_ended_ && !start_next_member()) break;
      if (stream.avail_in == 0 && fill_input() == 0) {
        throw_idx_error(file_,
                        "the gzip stream is truncated (the file ends inside a gzip member); download or "
                        "reinstall the file");
      }
      // avail_out is an unsigned int: inflate in chunks that fit it.
      const std::size_t chunk = std::min<std::size_t>(size - done, std::size_t{1} << 30);
      stream.next_out = out + done;
      stream.avail_out = static_cast<uInt>(chunk);
      const int code = inflate(&stream, Z_NO_FLUSH);
      done += chunk - stream.avail_out;
      if (code == Z_STREAM_END) {
        member_ended_ = true;
      } else if (code == Z_MEM_ERROR) {
        throw std::bad_alloc();
      } else if (code != Z_OK) {
        // With input and output space both available inflate always progresses, so anything but Z_OK here
        // (Z_DATA_ERROR, also for a wrong CRC-32 or length) means the data is bad.
        throw_gzip_error("the gzip stream is corrupt", code);
      }
    }
    return done;
  }

  // RFC 1952 makes a gzip file a series of members, and gunzip and zlib decompress them as one stream (`cat
  // a.gz b.gz > c.gz` is valid gzip), so another member may follow the one that ended: it is accepted.
  // Anything else after the gzip data (half of another file, a corrupted tail, zero padding) is refused, as
  // bytes after a plain IDX file's data are. Returns false at a clean end of the file.
  bool start_next_member() {
    z_stream& stream = *inflate_;
    if (stream.avail_in < 2) fill_input();
    if (stream.avail_in == 0) return false;
    if (stream.avail_in < 2 || stream.next_in[0] != 0x1f || stream.next_in[1] != 0x8b) {
      throw_idx_error(file_, "the file holds bytes after the end of the gzip data, at byte offset " +
                                 std::to_string(input_read_ - stream.avail_in) +
                                 ", that do not start another gzip member (a gzip file is one or more gzip "
                                 "members and nothing else); the file is corrupt or has data appended: "
                                 "download or reinstall it");
    }
    if (inflateReset(&stream) != Z_OK) throw_gzip_error("zlib could not be reset", Z_STREAM_ERROR);
    member_ended_ = false;
    return true;
  }

  // Moves the input not yet consumed to the front of the buffer and reads more after it; returns how many
  // bytes were read (0 at the end of the file).
  std::size_t fill_input() {
    z_stream& stream = *inflate_;
    const std::size_t kept = stream.avail_in;
    if (kept > 0) std::memmove(input_.get(), stream.next_in, kept);
    const std::size_t got = std::fread(input_.get() + kept, 1, input_size_ - kept, handle_.get());
    check_read_error();
    stream.next_in = input_.get();
    stream.avail_in = static_cast<uInt>(kept + got);
    input_read_ += got;
    return got;
  }

  [[noreturn]] void throw_gzip_error(std::string_view what, int code) {
    std::string problem(what);
    problem += " (zlib: ";
    problem += inflate_ && inflate_->msg != nullptr ? inflate_->msg : zError(code);
    problem += "); download or reinstall the file";
    throw_idx_error(file_, problem);
  }

  std::unique_ptr<z_stream, InflateEnd> inflate_;  // null for plain data
  std::unique_ptr<std::uint8_t[]> input_;
  std::size_t input_size_ = 0;
  std::uint64_t input_read_ = 0;  // bytes read from the file so far, for the offset in messages
  bool member_ended_ = false;
#endif
  struct FileClose {
    void operator()(std::FILE* handle) const { std::fclose(handle); }
  };
  std::unique_ptr<std::FILE, FileClose> handle_;
  std::filesystem::path file_;
  std::array<std::uint8_t, 2> head_{};
  std::size_t head_size_ = 0;
  std::size_t head_used_ = 0;
};

inline bool valid_idx_type_code(std::uint8_t code) {
  switch (static_cast<IdxType>(code)) {
    case IdxType::uint8:
    case IdxType::int8:
    case IdxType::int16:
    case IdxType::int32:
    case IdxType::float32:
    case IdxType::float64:
      return true;
  }
  return false;
}

}  // namespace detail

/// Reads a plain or gzipped IDX file. Throws DataError naming the file when it is missing, is not IDX, names
/// an unknown dtype, holds fewer or more bytes than its dimensions say, or its gzip stream is corrupt.
inline IdxArray read_idx(const std::filesystem::path& file) {
  detail::IdxByteSource source(file);

  std::array<std::uint8_t, 4> magic{};
  if (source.read(magic.data(), magic.size()) != magic.size()) {
    detail::throw_idx_error(file, "the file is shorter than the 4-byte IDX magic number; is it empty?");
  }
  const std::uint32_t magic_number = detail::read_big_endian_u32(magic.data());
  if (magic[0] == 0x1f && magic[1] == 0x8b) {
    detail::throw_idx_error(file,
                            "the data is gzip-compressed after decompression: the file was compressed twice; "
                            "decompress it once with gunzip");
  }
  if (magic[0] != 0 || magic[1] != 0) {
    detail::throw_idx_error(file, "bad magic number " + detail::hex(magic_number, 8) +
                                      ": an IDX file starts with two zero bytes, a dtype code and the number "
                                      "of dimensions (0x00000803 for uint8 images, 0x00000801 for labels); "
                                      "this is not an IDX file");
  }
  if (!detail::valid_idx_type_code(magic[2])) {
    detail::throw_idx_error(file, "unknown dtype code " + detail::hex(magic[2], 2) + " in magic number " +
                                      detail::hex(magic_number, 8) +
                                      "; IDX defines 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D "
                                      "float32 and 0x0E float64");
  }
  const std::size_t rank = magic[3];
  if (rank == 0)
    detail::throw_idx_error(file, "the header declares 0 dimensions; an IDX array has at least 1");

  IdxArray array;
  array.type = static_cast<IdxType>(magic[2]);
  std::vector<std::uint8_t> dims(4 * rank);
  if (source.read(dims.data(), dims.size()) != dims.size()) {
    detail::throw_idx_error(file, "the file ends inside the header, which declares " + std::to_string(rank) +
                                      " dimensions; the file is truncated");
  }
  const std::size_t element_size = idx_type_size(array.type);
  // The product of the non-zero dimensions is bounded even when another dimension is 0 (an empty array):
  // readers multiply sub-shapes such as rows x cols of N = 0 images, which must not overflow either. The
  // bound is what an Eigen index and a std::vector of bytes can hold.
  constexpr auto max_bytes = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());
  std::size_t nonzero_bytes = element_size;
  bool empty = false;
  std::string shape_text;
  for (std::size_t i = 0; i < rank; ++i) {
    const std::size_t dim = detail::read_big_endian_u32(dims.data() + 4 * i);
    array.shape.push_back(dim);
    if (i != 0) shape_text += 'x';
    shape_text += std::to_string(dim);
    if (dim == 0) {
      empty = true;
      continue;
    }
    if (nonzero_bytes > max_bytes / dim) {
      detail::throw_idx_error(file, "the dimensions " + shape_text +
                                        "... overflow the address space (the non-zero dimensions must "
                                        "multiply to at most " +
                                        std::to_string(max_bytes) + " bytes)");
    }
    nonzero_bytes *= dim;
  }
  const std::size_t payload = empty ? 0 : nonzero_bytes;

  // Grow the buffer as the data arrives rather than trusting the header with one allocation: a corrupt header
  // claiming terabytes must give a DataError, not std::bad_alloc.
  // Reads start small and double up to 16 MiB, so that a short or corrupt file costs little.
  constexpr std::size_t max_chunk = std::size_t{1} << 24;
  std::size_t chunk = std::size_t{1} << 16;
  array.bytes.reserve(std::min(payload, chunk));
  while (array.bytes.size() < payload) {
    const std::size_t before = array.bytes.size();
    const std::size_t want = std::min(chunk, payload - before);
    chunk = std::min(2 * chunk, max_chunk);
    array.bytes.resize(before + want);
    const std::size_t got = source.read(array.bytes.data() + before, want);
    if (got < want) {
      detail::throw_idx_error(file, "the header declares " + shape_text + " " +
                                        std::string(idx_type_name(array.type)) + " elements (" +
                                        std::to_string(payload) + " bytes of data) but the file holds only " +
                                        std::to_string(before + got) +
                                        "; the file is truncated or the header "
                                        "is wrong");
    }
  }
  std::uint8_t extra = 0;
  if (source.read(&extra, 1) != 0) {
    detail::throw_idx_error(file, "the file holds more data than the header's " + shape_text + " " +
                                      std::string(idx_type_name(array.type)) + " elements (" +
                                      std::to_string(payload) +
                                      " bytes); the header does not match the data");
  }
  return array;
}

/// Reads an IDX file of uint8 images (shape N x rows x cols) as a (rows*cols) x N float matrix with one image
/// per column, pixels scaled to [0, 1]. Throws DataError for any other type or rank.
inline Eigen::MatrixXf read_idx_images(const std::filesystem::path& file) {
  const IdxArray array = read_idx(file);
  if (array.type != IdxType::uint8 || array.shape.size() != 3) {
    std::string found = std::string(idx_type_name(array.type)) + " with " +
                        std::to_string(array.shape.size()) + " dimensions";
    detail::throw_idx_error(file,
                            "expected uint8 images with 3 dimensions (count x rows x cols), found " + found);
  }
  const auto count = static_cast<Eigen::Index>(array.shape[0]);
  const auto pixels = static_cast<Eigen::Index>(array.shape[1] * array.shape[2]);
  const Eigen::Map<const Eigen::Matrix<std::uint8_t, Eigen::Dynamic, Eigen::Dynamic>> raw(array.bytes.data(),
                                                                                          pixels, count);
  return raw.cast<float>() * (1.0f / 255.0f);
}

/// Reads an IDX file of uint8 labels (shape N) as int32, checking each lies in [0, num_classes). Throws
/// DataError for another type or rank, or naming the first label out of range.
inline Eigen::VectorX<std::int32_t> read_idx_labels(const std::filesystem::path& file, int num_classes) {
  if (num_classes < 1) {
    throw ConfigError("read_idx_labels: num_classes is " + std::to_string(num_classes) + "; give 1 or more");
  }
  const IdxArray array = read_idx(file);
  if (array.type != IdxType::uint8 || array.shape.size() != 1) {
    std::string found = std::string(idx_type_name(array.type)) + " with " +
                        std::to_string(array.shape.size()) + " dimensions";
    detail::throw_idx_error(file, "expected uint8 labels with 1 dimension, found " + found);
  }
  Eigen::VectorX<std::int32_t> labels(static_cast<Eigen::Index>(array.shape[0]));
  for (std::size_t i = 0; i < array.bytes.size(); ++i) {
    const int label = array.bytes[i];
    if (label >= num_classes) {
      detail::throw_idx_error(file, "label " + std::to_string(label) + " at index " + std::to_string(i) +
                                        " is outside [0, " + std::to_string(num_classes) +
                                        "); the file does not belong to a " + std::to_string(num_classes) +
                                        "-class data set");
    }
    labels[static_cast<Eigen::Index>(i)] = label;
  }
  return labels;
}

}  // namespace xax
