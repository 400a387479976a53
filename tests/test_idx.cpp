#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>
#include <system_error>
#include <vector>
#include <xax_datasets/fashion_mnist.hpp>
#include <xax_datasets/idx.hpp>
#include <xax_datasets/synthetic.hpp>

#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
#include <zlib.h>
#endif

namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

using Bytes = std::vector<std::uint8_t>;

/// The bytes of an IDX file: magic (0, 0, type, rank), big-endian dims, then `payload`.
Bytes idx_bytes(std::uint8_t type, const std::vector<std::uint32_t>& dims, const Bytes& payload) {
  Bytes out{0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (std::uint32_t dim : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<std::uint8_t>(dim >> shift));
  }
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Bytes iota_bytes(std::size_t count, std::uint8_t modulo = 251) {
  Bytes out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<std::uint8_t>(i % modulo);
  return out;
}

class IdxFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("xax_test_idx_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    for (int fd : pipe_read_ends_) ::close(fd);
    std::filesystem::remove_all(dir_);
  }

  std::filesystem::path write_plain(const std::string& name, const Bytes& bytes) const {
    const auto path = dir_ / name;
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    return path;
  }

#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
  std::filesystem::path write_gzip(const std::string& name, const Bytes& bytes) const {
    const auto path = dir_ / name;
    gzFile file = gzopen(path.c_str(), "wb");
    EXPECT_NE(file, nullptr);
    EXPECT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
    EXPECT_EQ(gzclose(file), Z_OK);
    return path;
  }
#endif

  /// A path naming the read end of a pipe that holds `bytes` and then ends: input that cannot be rewound,
  /// as from `cat file | program /dev/stdin`. `bytes` must fit the pipe's buffer (64 KiB on Linux).
  std::filesystem::path write_pipe(const Bytes& bytes) {
    std::array<int, 2> ends{};
    EXPECT_EQ(::pipe(ends.data()), 0);
    pipe_read_ends_.push_back(ends[0]);
    EXPECT_EQ(::write(ends[1], bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    ::close(ends[1]);
    return "/dev/fd/" + std::to_string(ends[0]);
  }

  static Bytes read_all(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

  /// The message of the DataError that reading `path` as an IDX file throws ("" if it does not throw).
  static std::string read_error(const std::filesystem::path& path) {
    try {
      (void)xax::read_idx(path);
    } catch (const xax::DataError& error) {
      return error.what();
    }
    return "";
  }

  std::filesystem::path dir_;
  std::vector<int> pipe_read_ends_;
};

TEST_F(IdxFiles, ReadsPlainImages) {
  const Bytes pixels = iota_bytes(3 * 2 * 4);
  const auto path = write_plain("images-idx3-ubyte", idx_bytes(0x08, {3, 2, 4}, pixels));
  const xax::IdxArray array = xax::read_idx(path);
  EXPECT_EQ(array.type, xax::IdxType::uint8);
  EXPECT_EQ(array.shape, (std::vector<std::size_t>{3, 2, 4}));
  EXPECT_EQ(array.element_count(), 24u);
  EXPECT_EQ(array.bytes, pixels);

  const Eigen::MatrixXf images = xax::read_idx_images(path);
  ASSERT_EQ(images.rows(), 8);
  ASSERT_EQ(images.cols(), 3);
  // Image 1, row 0, column 3 is element 1*8 + 3 of the row-major file.
  EXPECT_FLOAT_EQ(images(3, 1), 11.0f / 255.0f);
  EXPECT_GE(images.minCoeff(), 0.0f);
  EXPECT_LE(images.maxCoeff(), 1.0f);
}

TEST_F(IdxFiles, ReadsOtherElementTypesAsStoredBigEndian) {
  const Bytes payload{0x00, 0x00, 0x01, 0x02, 0xFF, 0xFF, 0xFF, 0xFE};
  const xax::IdxArray array = xax::read_idx(write_plain("ints", idx_bytes(0x0C, {2}, payload)));
  EXPECT_EQ(array.type, xax::IdxType::int32);
  EXPECT_EQ(array.bytes, payload);
}

TEST_F(IdxFiles, ReadsLabels) {
  const auto path = write_plain("labels", idx_bytes(0x08, {5}, {0, 9, 3, 3, 7}));
  const Eigen::VectorX<std::int32_t> labels = xax::read_idx_labels(path, 10);
  EXPECT_EQ(labels, (Eigen::VectorX<std::int32_t>(5) << 0, 9, 3, 3, 7).finished());
}

TEST_F(IdxFiles, MissingFileNamesThePath) {
  const auto path = dir_ / "no-such-file.gz";
  EXPECT_THAT(read_error(path), AllOf(HasSubstr(path.string()), HasSubstr("does not exist")));
}

// A path that exists but cannot be resolved must say why, not claim the file is missing.
TEST_F(IdxFiles, UncheckablePathSaysWhy) {
  std::filesystem::create_symlink(dir_ / "loop2", dir_ / "loop1");
  std::filesystem::create_symlink(dir_ / "loop1", dir_ / "loop2");
  const std::string error = read_error(dir_ / "loop1");
  EXPECT_THAT(error,
              AllOf(HasSubstr((dir_ / "loop1").string()), HasSubstr("cannot be checked"),
                    HasSubstr(std::make_error_code(std::errc::too_many_symbolic_link_levels).message())));
  EXPECT_THAT(error, Not(HasSubstr("does not exist")));
}

TEST_F(IdxFiles, DirectoryIsRejected) {
  EXPECT_THAT(read_error(dir_), HasSubstr("is a directory"));
}

TEST_F(IdxFiles, EmptyFileIsRejected) {
  const auto path = write_plain("empty", {});
  EXPECT_THAT(read_error(path), AllOf(HasSubstr(path.string()), HasSubstr("shorter than the 4-byte")));
}

TEST_F(IdxFiles, BadMagicIsRejected) {
  Bytes bytes = idx_bytes(0x08, {4}, iota_bytes(4));
  bytes[0] = 0x1A;
  const auto path = write_plain("bad-magic", bytes);
  EXPECT_THAT(read_error(path), AllOf(HasSubstr(path.string()), HasSubstr("bad magic number 0x1A000801"),
                                      HasSubstr("not an IDX file")));
}

TEST_F(IdxFiles, UnknownDtypeCodeIsRejected) {
  const auto path = write_plain("bad-dtype", idx_bytes(0x07, {4}, iota_bytes(4)));
  EXPECT_THAT(read_error(path), AllOf(HasSubstr("unknown dtype code 0x07"), HasSubstr("0x08 uint8")));
}

TEST_F(IdxFiles, ZeroDimensionsAreRejected) {
  EXPECT_THAT(read_error(write_plain("rank0", idx_bytes(0x08, {}, {}))), HasSubstr("0 dimensions"));
}

TEST_F(IdxFiles, TruncatedHeaderIsRejected) {
  Bytes bytes = idx_bytes(0x08, {2, 3, 3}, iota_bytes(18));
  bytes.resize(9);
  EXPECT_THAT(read_error(write_plain("short-header", bytes)),
              AllOf(HasSubstr("ends inside the header"), HasSubstr("truncated")));
}

TEST_F(IdxFiles, TruncatedDataIsRejected) {
  Bytes bytes = idx_bytes(0x08, {2, 3, 3}, iota_bytes(18));
  bytes.resize(bytes.size() - 5);
  EXPECT_THAT(read_error(write_plain("short-data", bytes)),
              AllOf(HasSubstr("2x3x3 uint8"), HasSubstr("18 bytes"), HasSubstr("holds only 13"),
                    HasSubstr("truncated")));
}

TEST_F(IdxFiles, MoreDataThanTheHeaderSaysIsRejected) {
  const Bytes bytes = idx_bytes(0x08, {2, 3, 3}, iota_bytes(20));
  EXPECT_THAT(read_error(write_plain("long-data", bytes)),
              AllOf(HasSubstr("more data than the header"), HasSubstr("2x3x3")));
}

TEST_F(IdxFiles, WideElementSizesCountInTheSizeCheck) {
  // 3 float64 elements need 24 bytes; 12 are 3 float32s' worth, which a size check in elements would accept.
  EXPECT_THAT(read_error(write_plain("short-doubles", idx_bytes(0x0E, {3}, iota_bytes(12)))),
              HasSubstr("holds only 12"));
}

TEST_F(IdxFiles, HugeHeaderGivesDataErrorNotBadAlloc) {
  const auto path = write_plain("huge", idx_bytes(0x08, {0x7FFFFFFFu, 0xFFFFFFFFu}, iota_bytes(64)));
  EXPECT_THAT(read_error(path), HasSubstr("truncated"));
  const auto overflow =
      write_plain("overflow", idx_bytes(0x0E, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, iota_bytes(8)));
  EXPECT_THAT(read_error(overflow), HasSubstr("overflow"));
}

// With N = 0 the payload is empty whatever the other dimensions say, but readers still multiply them
// (rows x cols of read_idx_images): their product is bounded as for a non-empty array.
TEST_F(IdxFiles, EmptyArrayWithOverflowingDimensionsIsRejected) {
  const auto images = write_plain("no-images", idx_bytes(0x08, {0, 0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
  EXPECT_THAT(read_error(images), HasSubstr("overflow"));
  EXPECT_THROW((void)xax::read_idx_images(images), xax::DataError);
  const auto wide = write_plain("wide", idx_bytes(0x0E, {0xFFFFFFFFu, 0, 0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
  EXPECT_THAT(read_error(wide), HasSubstr("overflow"));

  // A genuinely empty set of 28x28 images reads as 784 pixels x 0 images.
  const auto empty = write_plain("empty", idx_bytes(0x08, {0, 28, 28}, {}));
  const Eigen::MatrixXf pixels = xax::read_idx_images(empty);
  EXPECT_EQ(pixels.rows(), 784);
  EXPECT_EQ(pixels.cols(), 0);
  EXPECT_EQ(xax::read_idx(empty).element_count(), 0u);
}

TEST_F(IdxFiles, LabelOutOfRangeIsRejected) {
  const auto path = write_plain("labels", idx_bytes(0x08, {4}, {1, 2, 10, 3}));
  try {
    (void)xax::read_idx_labels(path, 10);
    FAIL() << "expected a DataError";
  } catch (const xax::DataError& error) {
    EXPECT_THAT(error.what(), AllOf(HasSubstr(path.string()), HasSubstr("label 10 at index 2"),
                                    HasSubstr("outside [0, 10)")));
  }
  EXPECT_THROW((void)xax::read_idx_labels(path, 0), xax::ConfigError);
}

TEST_F(IdxFiles, WrongTypeOrRankForImagesAndLabelsIsRejected) {
  const auto labels_as_images = write_plain("labels", idx_bytes(0x08, {4}, {1, 2, 3, 4}));
  EXPECT_THROW((void)xax::read_idx_images(labels_as_images), xax::DataError);
  const auto int_images = write_plain("ints", idx_bytes(0x0C, {1, 1, 1}, {0, 0, 0, 1}));
  try {
    (void)xax::read_idx_images(int_images);
    FAIL() << "expected a DataError";
  } catch (const xax::DataError& error) {
    EXPECT_THAT(error.what(),
                HasSubstr("expected uint8 images with 3 dimensions (count x rows x cols), found "
                          "int32 with 3 dimensions"));
  }
  const auto images_as_labels = write_plain("images", idx_bytes(0x08, {1, 2, 2}, {1, 2, 3, 4}));
  EXPECT_THROW((void)xax::read_idx_labels(images_as_labels, 10), xax::DataError);
}

// Input that cannot be rewound (a pipe, /dev/stdin) is read from its first byte: sniffing for gzip must
// not lose the bytes it looked at, which would make a valid file fail and a file with two bytes too many
// pass.
TEST_F(IdxFiles, ReadsFromAPipe) {
  const Bytes file = idx_bytes(0x08, {3, 2, 4}, iota_bytes(24));
  const xax::IdxArray array = xax::read_idx(write_pipe(file));
  EXPECT_EQ(array.shape, (std::vector<std::size_t>{3, 2, 4}));
  EXPECT_EQ(array.bytes, iota_bytes(24));

  Bytes shifted{0, 0};
  shifted.insert(shifted.end(), file.begin(), file.end());
  EXPECT_THAT(read_error(write_pipe(shifted)), HasSubstr("unknown dtype code 0x00"));
  EXPECT_THAT(read_error(write_pipe({0})), HasSubstr("shorter than the 4-byte"));
}

#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB

TEST_F(IdxFiles, ReadsGzippedFilesLikePlainOnes) {
  const Bytes file = idx_bytes(0x08, {10, 28, 28}, iota_bytes(10 * 28 * 28));
  const xax::IdxArray plain = xax::read_idx(write_plain("images", file));
  const xax::IdxArray gzipped = xax::read_idx(write_gzip("images.gz", file));
  EXPECT_EQ(gzipped.shape, plain.shape);
  EXPECT_EQ(gzipped.bytes, plain.bytes);
}

// Data is read in chunks that start at 64 KiB and double, and a gzipped file over 32 KiB gets large zlib
// buffers: a payload across several chunks, plain and gzipped, reads back byte for byte, and one byte short
// or over is still found.
TEST_F(IdxFiles, PayloadAcrossSeveralReadChunks) {
  const Bytes pixels = iota_bytes(25 * 100 * 100, 253);  // 250,000 bytes: chunks of 64, 128 and 64 KiB
  const Bytes file = idx_bytes(0x08, {25, 100, 100}, pixels);
  EXPECT_EQ(xax::read_idx(write_plain("plain", file)).bytes, pixels);
  EXPECT_EQ(xax::read_idx(write_gzip("gzipped.gz", file)).bytes, pixels);
  const Bytes short_file(file.begin(), file.end() - 1);
  EXPECT_THAT(read_error(write_gzip("short.gz", short_file)), HasSubstr("holds only 249999"));
  Bytes long_file = file;
  long_file.push_back(0);
  EXPECT_THAT(read_error(write_plain("long", long_file)), HasSubstr("more data"));
}

TEST_F(IdxFiles, TruncatedGzipIsRejected) {
  const Bytes file = idx_bytes(0x08, {10, 28, 28}, iota_bytes(10 * 28 * 28, 7));
  Bytes compressed = read_all(write_gzip("whole.gz", file));
  compressed.resize(compressed.size() / 2);
  const auto path = write_plain("cut.gz", compressed);
  EXPECT_THAT(read_error(path), AllOf(HasSubstr(path.string()), HasSubstr("truncated")));
}

TEST_F(IdxFiles, GzipWithoutItsTrailerIsRejected) {
  // All the data decompresses, only the CRC and length at the end are missing: the reader must still notice.
  const Bytes file = idx_bytes(0x08, {4}, {1, 2, 3, 4});
  Bytes compressed = read_all(write_gzip("whole.gz", file));
  compressed.resize(compressed.size() - 8);
  EXPECT_THAT(read_error(write_plain("no-trailer.gz", compressed)), HasSubstr("truncated"));
}

TEST_F(IdxFiles, CorruptGzipIsRejected) {
  const Bytes file = idx_bytes(0x08, {10, 28, 28}, iota_bytes(10 * 28 * 28, 13));
  Bytes compressed = read_all(write_gzip("whole.gz", file));
  for (std::size_t i = 20; i < compressed.size() - 20; i += 7) compressed[i] ^= 0x5A;
  EXPECT_THAT(read_error(write_plain("corrupt.gz", compressed)), HasSubstr("gzip stream is corrupt"));
}

TEST_F(IdxFiles, GzipChecksumMismatchIsRejected) {
  const Bytes file = idx_bytes(0x08, {4}, {1, 2, 3, 4});
  Bytes compressed = read_all(write_gzip("whole.gz", file));
  compressed[compressed.size() - 8] ^= 0xFF;  // first byte of the CRC-32
  EXPECT_THAT(read_error(write_plain("bad-crc.gz", compressed)), HasSubstr("corrupt"));
}

// Bytes after the gzip stream that are not another gzip member (half of another file, a bad download) are
// corruption, as the same bytes after a plain IDX file are: zlib's gzread would drop them silently.
TEST_F(IdxFiles, NonGzipBytesAfterTheGzipStreamAreRejected) {
  const Bytes file = idx_bytes(0x08, {3}, {1, 2, 3});
  const Bytes compressed = read_all(write_gzip("whole.gz", file));
  for (const std::string& tail : {std::string("THIS IS NOT GZIP"), std::string(1, '\0'),
                                  std::string(1, '\x1f'), std::string(512, '\0')}) {
    Bytes bytes = compressed;
    bytes.insert(bytes.end(), tail.begin(), tail.end());
    const auto path = write_plain("trailing.gz", bytes);
    EXPECT_THAT(read_error(path), AllOf(HasSubstr(path.string()), HasSubstr("after the end of the gzip data"),
                                        HasSubstr("another gzip member")))
        << tail.size() << " trailing bytes";
  }
}

// RFC 1952 makes a gzip file a series of members, which gunzip and zlib decompress as one stream: `cat a.gz
// b.gz` is valid gzip and reads as the concatenation, a member boundary falling anywhere in the IDX data.
TEST_F(IdxFiles, ConcatenatedGzipMembersReadAsOneStream) {
  const Bytes file = idx_bytes(0x08, {3, 2, 4}, iota_bytes(24));
  Bytes members = read_all(write_gzip("head.gz", Bytes(file.begin(), file.begin() + 6)));
  const Bytes tail = read_all(write_gzip("tail.gz", Bytes(file.begin() + 6, file.end())));
  members.insert(members.end(), tail.begin(), tail.end());
  const xax::IdxArray array = xax::read_idx(write_plain("members.gz", members));
  EXPECT_EQ(array.shape, (std::vector<std::size_t>{3, 2, 4}));
  EXPECT_EQ(array.bytes, iota_bytes(24));
  EXPECT_EQ(xax::read_idx(write_pipe(members)).bytes, iota_bytes(24));

  // A member whose data goes beyond what the header declares is found as in a single stream.
  const Bytes extra = read_all(write_gzip("extra.gz", {7}));
  members.insert(members.end(), extra.begin(), extra.end());
  EXPECT_THAT(read_error(write_plain("extra-member.gz", members)), HasSubstr("more data than the header"));
}

TEST_F(IdxFiles, BadMagicInsideGzipIsRejected) {
  Bytes file = idx_bytes(0x08, {4}, {1, 2, 3, 4});
  file[1] = 0x42;
  EXPECT_THAT(read_error(write_gzip("bad-magic.gz", file)), HasSubstr("bad magic number 0x00420801"));
}

#else

TEST_F(IdxFiles, GzipWithoutZlibSaysHowToGetIt) {
  // A gzip header (magic 1f 8b, deflate): without zlib the reader must say so rather than call it corrupt.
  const auto path = write_plain("images.gz", {0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03});
  EXPECT_THAT(read_error(path),
              AllOf(HasSubstr("gzip-compressed"), HasSubstr("zlib1g-dev"), HasSubstr("gunzip")));
}

#endif  // XAX_HAS_ZLIB

// ---------------------------------------------------------------------------------------------------------------
// Fashion-MNIST layout

class FashionMnistFiles : public IdxFiles {
 protected:
  void write_split(const std::string& prefix, std::uint32_t count, const Bytes& labels) const {
    write_plain(prefix + "-images-idx3-ubyte", idx_bytes(0x08, {count, 28, 28}, iota_bytes(count * 784u)));
    write_plain(prefix + "-labels-idx1-ubyte",
                idx_bytes(0x08, {static_cast<std::uint32_t>(labels.size())}, labels));
  }
};

TEST_F(FashionMnistFiles, LoadsBothSplits) {
  write_split("train", 3, {0, 5, 9});
  write_split("t10k", 2, {1, 2});
  const xax::ClassificationSplits data = xax::load_fashion_mnist(dir_);
  EXPECT_EQ(data.name, "fashion-mnist");
  EXPECT_EQ(data.train.features.rows(), 784);
  EXPECT_EQ(data.train.size(), 3);
  EXPECT_EQ(data.test.size(), 2);
  EXPECT_EQ(data.train.labels[2], 9);
  EXPECT_EQ(data.test.num_classes, 10);
  EXPECT_NO_THROW(xax::validate_dataset(data.train, "train"));
}

TEST_F(FashionMnistFiles, MissingFileSaysWhatToInstall) {
  write_split("train", 3, {0, 5, 9});
  try {
    (void)xax::load_fashion_mnist(dir_);
    FAIL() << "expected a DataError";
  } catch (const xax::DataError& error) {
    EXPECT_THAT(error.what(), AllOf(HasSubstr("t10k-images-idx3-ubyte"), HasSubstr("dataset-fashion-mnist")));
  }
}

TEST_F(FashionMnistFiles, ImageAndLabelCountsMustAgree) {
  write_split("train", 3, {0, 5});
  write_split("t10k", 2, {1, 2});
  EXPECT_THAT([&] { (void)xax::load_fashion_mnist(dir_); },
              ::testing::ThrowsMessage<xax::DataError>(HasSubstr("holds 3 images but")));
}

TEST_F(FashionMnistFiles, OtherImageSizesAreRejected) {
  write_plain("train-images-idx3-ubyte", idx_bytes(0x08, {1, 32, 32}, iota_bytes(1024)));
  write_plain("train-labels-idx1-ubyte", idx_bytes(0x08, {1}, {0}));
  write_split("t10k", 2, {1, 2});
  EXPECT_THAT([&] { (void)xax::load_fashion_mnist(dir_); },
              ::testing::ThrowsMessage<xax::DataError>(HasSubstr("1024 pixels")));
}

TEST_F(FashionMnistFiles, EnvironmentVariableChoosesTheDirectory) {
  write_split("train", 3, {0, 5, 9});
  write_split("t10k", 2, {1, 2});
  ::setenv("XAX_FASHION_MNIST_DIR", dir_.c_str(), 1);
  EXPECT_EQ(xax::find_fashion_mnist(), dir_);
  ::setenv("XAX_FASHION_MNIST_DIR", (dir_ / "elsewhere").c_str(), 1);
  EXPECT_EQ(xax::find_fashion_mnist(), std::nullopt);
  ::unsetenv("XAX_FASHION_MNIST_DIR");
}

#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
TEST(FashionMnist, DebianPackageLoadsWhenInstalled) {
  if (!xax::detail::has_fashion_mnist_files(xax::fashion_mnist_debian_dir)) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  const xax::ClassificationSplits data = xax::load_fashion_mnist(xax::fashion_mnist_debian_dir);
  EXPECT_EQ(data.train.features.rows(), 784);
  EXPECT_EQ(data.train.size(), 60000);
  EXPECT_EQ(data.test.size(), 10000);
  EXPECT_GE(data.train.features.minCoeff(), 0.0f);
  EXPECT_LE(data.train.features.maxCoeff(), 1.0f);
  // Fashion-MNIST is balanced: 6000 training images per class.
  for (int label = 0; label < 10; ++label) EXPECT_EQ((data.train.labels.array() == label).count(), 6000);
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Synthetic data

TEST(SyntheticClassification, HasTheRequestedShapeAndRange) {
  xax::SyntheticClassificationOptions options;
  options.train_samples = 500;
  options.test_samples = 100;
  const xax::ClassificationSplits data = xax::make_synthetic_classification(options);
  EXPECT_EQ(data.name, "synthetic");
  EXPECT_EQ(data.train.features.rows(), 784);
  EXPECT_EQ(data.train.size(), 500);
  EXPECT_EQ(data.test.size(), 100);
  EXPECT_GE(data.train.features.minCoeff(), 0.0f);
  EXPECT_LE(data.train.features.maxCoeff(), 1.0f);
  EXPECT_NO_THROW(xax::validate_dataset(data.train, "train"));
  EXPECT_NO_THROW(xax::validate_dataset(data.test, "test"));
  for (int label = 0; label < 10; ++label) EXPECT_GT((data.train.labels.array() == label).count(), 20);
}

TEST(SyntheticClassification, IsDeterministicAndSeeded) {
  xax::SyntheticClassificationOptions options;
  options.train_samples = 64;
  options.test_samples = 16;
  const auto a = xax::make_synthetic_classification(options);
  const auto b = xax::make_synthetic_classification(options);
  EXPECT_EQ(a.train.features, b.train.features);
  EXPECT_EQ(a.test.labels, b.test.labels);
  options.seed += 1;
  const auto c = xax::make_synthetic_classification(options);
  EXPECT_NE(a.train.features, c.train.features);
}

TEST(SyntheticClassification, ClassesAreSeparableByTheirMeans) {
  // A nearest-class-mean classifier fitted on train must beat chance by far on test: the task is learnable.
  xax::SyntheticClassificationOptions options;
  options.train_samples = 4000;
  options.test_samples = 1000;
  const auto data = xax::make_synthetic_classification(options);
  Eigen::MatrixXf means = Eigen::MatrixXf::Zero(784, 10);
  Eigen::VectorXf counts = Eigen::VectorXf::Zero(10);
  for (Eigen::Index i = 0; i < data.train.size(); ++i) {
    means.col(data.train.labels[i]) += data.train.features.col(i);
    counts[data.train.labels[i]] += 1.0f;
  }
  for (Eigen::Index c = 0; c < 10; ++c) means.col(c) /= counts[c];
  Eigen::Index correct = 0;
  for (Eigen::Index i = 0; i < data.test.size(); ++i) {
    Eigen::Index best = 0;
    (means.colwise() - data.test.features.col(i)).colwise().squaredNorm().minCoeff(&best);
    correct += best == data.test.labels[i] ? 1 : 0;
  }
  EXPECT_GT(static_cast<double>(correct) / static_cast<double>(data.test.size()), 0.6);
}

TEST(SyntheticClassification, RejectsBadOptions) {
  xax::SyntheticClassificationOptions options;
  options.train_samples = 0;
  EXPECT_THAT([&] { (void)xax::make_synthetic_classification(options); },
              ::testing::ThrowsMessage<xax::ConfigError>(HasSubstr("train_samples is 0")));
  options = {};
  options.classes = 1;
  EXPECT_THROW((void)xax::make_synthetic_classification(options), xax::ConfigError);
  options = {};
  options.pixel_noise = -1.0f;
  EXPECT_THROW((void)xax::make_synthetic_classification(options), xax::ConfigError);
}

}  // namespace
