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
/// or truncated gzip stream, a missing file) throws xax::DataError naming the file and what was wrong.
///
/// Gzipped files need zlib: with it (the xax_datasets CMake target links it when found and defines
/// XAX_HAS_ZLIB), plain and gzipped files are both read. Without it, plain files are still read and a gzipped
/// one throws a DataError saying how to get zlib, so this header compiles everywhere.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
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

/// A byte stream over a plain or gzipped file. read() returns fewer bytes than asked only at the end of the
/// data; a corrupt stream throws. With zlib, gzread reads plain files unchanged, so one path serves both.
class IdxByteSource {
 public:
  explicit IdxByteSource(const std::filesystem::path& file) : file_(file) {
    std::error_code error;
    const auto status = std::filesystem::status(file, error);
    if (!std::filesystem::exists(status)) throw_idx_error(file, "the file does not exist");
    if (std::filesystem::is_directory(status)) throw_idx_error(file, "is a directory, not a file");
#if XAX_IDX_GZIP
    handle_.reset(gzopen(file.c_str(), "rb"));
    if (!handle_) throw_idx_error(file, "cannot be opened for reading (permissions?)");
    // The default 8 KiB buffer makes reading Fashion-MNIST's 47 MB of pixels several times slower; a small
    // file keeps it rather than allocating 768 KiB of buffers (which dominated reading many small files).
    constexpr std::uintmax_t large_buffer = 1u << 18;
    const std::uintmax_t size = std::filesystem::file_size(file, error);
    if (!error && size > large_buffer / 8) gzbuffer(handle_.get(), static_cast<unsigned>(large_buffer));
#else
    handle_.reset(std::fopen(file.c_str(), "rb"));
    if (!handle_) throw_idx_error(file, "cannot be opened for reading (permissions?)");
    std::array<unsigned char, 2> magic{};
    if (std::fread(magic.data(), 1, magic.size(), handle_.get()) == magic.size() && magic[0] == 0x1f &&
        magic[1] == 0x8b) {
      throw_idx_error(
          file,
          "is gzip-compressed, but this build of xax has no zlib; install zlib (Debian: zlib1g-dev) "
          "and reconfigure with CMake, or decompress the file with gunzip");
    }
    std::rewind(handle_.get());
#endif
  }

  /// Reads up to `size` bytes into `out`; returns how many were read (less than `size` only at the end).
  std::size_t read(std::uint8_t* out, std::size_t size) {
    std::size_t done = 0;
    while (done < size) {
#if XAX_IDX_GZIP
      // gzread takes an unsigned count and returns an int: read in chunks that fit both.
      const std::size_t chunk = std::min<std::size_t>(size - done, std::size_t{1} << 30);
      const int got = gzread(handle_.get(), out + done, static_cast<unsigned>(chunk));
      if (got < 0) throw_gzip_error();
      if (got == 0) {
        check_clean_end();
        break;
      }
      done += static_cast<std::size_t>(got);
#else
      const std::size_t got = std::fread(out + done, 1, size - done, handle_.get());
      if (std::ferror(handle_.get()) != 0) throw_idx_error(file_, "a read error occurred");
      if (got == 0) break;
      done += got;
#endif
    }
    return done;
  }

 private:
#if XAX_IDX_GZIP
  struct GzClose {
    void operator()(gzFile handle) const { gzclose(handle); }
  };
  std::unique_ptr<gzFile_s, GzClose> handle_;

  // gzread reports a gzip stream cut short as a plain end of data; gzerror tells the two apart.
  void check_clean_end() {
    int code = Z_OK;
    const char* text = gzerror(handle_.get(), &code);
    if (code != Z_OK) throw_gzip_error(code, text);
  }
  void throw_gzip_error() {
    int code = Z_OK;
    const char* text = gzerror(handle_.get(), &code);
    throw_gzip_error(code, text);
  }
  [[noreturn]] void throw_gzip_error(int code, const char* text) {
    std::string problem = code == Z_BUF_ERROR ? "the gzip stream is truncated" : "the gzip stream is corrupt";
    problem += " (zlib: ";
    problem += text != nullptr ? text : "unknown error";
    problem += "); download or reinstall the file";
    throw_idx_error(file_, problem);
  }
#else
  struct FileClose {
    void operator()(std::FILE* handle) const { std::fclose(handle); }
  };
  std::unique_ptr<std::FILE, FileClose> handle_;
#endif
  std::filesystem::path file_;
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
