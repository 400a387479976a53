#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>
#include <xax/task/checkpoint.hpp>

namespace {

using ::testing::HasSubstr;

template <class T>
struct Layer {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  Eigen::Matrix<T, Eigen::Dynamic, 1> b;
  XAX_FIELDS(w, b);
};

template <class T>
struct Model {
  std::vector<Layer<T>> layers;
  Eigen::Tensor<T, 3> conv;
  Eigen::Matrix<T, 2, 2> fixed;
  std::map<std::string, T> scalars;
  std::int64_t step = 0;
  XAX_FIELDS(layers, conv, fixed, scalars, step);
};

template <class T>
Model<T> make_model() {
  Model<T> m;
  m.layers.resize(2);
  m.layers[0] = {Eigen::MatrixXf::Random(3, 4).cast<T>(), Eigen::VectorXf::Random(3).cast<T>()};
  m.layers[1] = {Eigen::MatrixXf::Random(2, 3).cast<T>(), Eigen::VectorXf::Random(2).cast<T>()};
  m.conv.resize(2, 1, 3);
  m.conv.setConstant(T(0.25f));
  m.fixed << T(1.0f), T(2.0f), T(3.0f), T(4.0f);
  m.scalars = {{"lr", T(0.5f)}, {"momentum", T(0.875f)}};
  m.step = 42;
  return m;
}

// An empty model of the same structure, as a resumed run has before loading.
template <class T>
Model<T> empty_like() {
  Model<T> m;
  m.layers.resize(2);
  m.scalars = {{"lr", T(0)}, {"momentum", T(0)}};
  return m;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("xax_checkpoint_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

template <class T>
class CheckpointRoundTrip : public CheckpointTest {};
using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16, double>;
TYPED_TEST_SUITE(CheckpointRoundTrip, Scalars);

TYPED_TEST(CheckpointRoundTrip, RestoresEveryLeafBitForBit) {
  const Model<TypeParam> saved = make_model<TypeParam>();
  xax::CheckpointWriter writer;
  writer.add_tree("model", saved);
  writer.add_string("note", std::string("binary\0safe", 11));
  writer.write(this->dir_ / "a.xax");

  const xax::CheckpointReader reader(this->dir_ / "a.xax");
  Model<TypeParam> loaded = empty_like<TypeParam>();
  reader.read_tree("model", loaded);
  EXPECT_EQ(xax::tree_cast<double>(loaded).layers[1].w, xax::tree_cast<double>(saved).layers[1].w);
  xax::for_each_leaf(
      []<class L>(const L& a, const L& b) {
        const auto x = xax::leaf_span(a);
        const auto y = xax::leaf_span(b);
        ASSERT_EQ(x.size_bytes(), y.size_bytes());
        EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size_bytes()), 0);
      },
      loaded, saved);
  EXPECT_EQ(reader.read_string("note"), std::string("binary\0safe", 11));
  EXPECT_TRUE(reader.contains("model.layers[1].w"));
  EXPECT_TRUE(reader.contains("model.scalars[\"lr\"]"));
}

TEST_F(CheckpointTest, RejectsAnotherDtypeShapeOrStructureNamingTheEntry) {
  xax::CheckpointWriter writer;
  writer.add_tree("model", make_model<float>());
  writer.write(dir_ / "a.xax");
  const xax::CheckpointReader reader(dir_ / "a.xax");

  Model<double> wrong_dtype = empty_like<double>();
  EXPECT_THAT([&] { reader.read_tree("model", wrong_dtype); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("'model.layers[0].w' holds float32")));

  Model<float> more_layers = empty_like<float>();
  more_layers.layers.resize(3);
  EXPECT_THAT([&] { reader.read_tree("model", more_layers); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("no entry 'model.layers[2].w'")));

  Model<float> fewer_layers = empty_like<float>();
  fewer_layers.layers.resize(1);
  EXPECT_THAT([&] { reader.read_tree("model", fewer_layers); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("another model structure")));

  Eigen::Matrix3f fixed;
  EXPECT_THAT([&] { reader.read_tree("model.fixed", fixed); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("fixed-size leaf cannot take")));

  EXPECT_THROW((void)reader.read_string("absent"), xax::CheckpointError);
  EXPECT_THROW((void)reader.read_string("model.step"), xax::CheckpointError) << "a tensor is not a string";
}

TEST_F(CheckpointTest, DuplicateEntryNamesAreRefused) {
  xax::CheckpointWriter writer;
  writer.add_tree("a", 1.0f);
  EXPECT_THROW(writer.add_tree("a", 2.0f), xax::CheckpointError);
}

TEST_F(CheckpointTest, EveryTruncationAndEveryFlippedByteIsRefused) {
  xax::CheckpointWriter writer;
  writer.add_tree("model", make_model<float>());
  const std::string bytes = writer.bytes();
  const auto path = dir_ / "c.xax";
  const auto write_raw = [&](const std::string& data) {
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(data.data(), static_cast<std::streamsize>(data.size()));
  };
  for (std::size_t size = 0; size < bytes.size(); size += 7) {
    write_raw(bytes.substr(0, size));
    EXPECT_THROW(xax::CheckpointReader{path}, xax::CheckpointError) << "truncated to " << size;
  }
  for (std::size_t at = 0; at < bytes.size(); at += 5) {
    std::string corrupt = bytes;
    corrupt[at] = static_cast<char>(corrupt[at] ^ 0x20);
    write_raw(corrupt);
    EXPECT_THROW(xax::CheckpointReader{path}, xax::CheckpointError) << "byte " << at << " flipped";
  }
  write_raw(bytes);
  EXPECT_NO_THROW(xax::CheckpointReader{path});
}

TEST_F(CheckpointTest, MessagesSayWhatIsWrong) {
  const auto path = dir_ / "m.xax";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot open checkpoint")));
  std::ofstream(path, std::ios::binary) << "this is not a checkpoint at all, just some text";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("is not an xax checkpoint")));
  xax::CheckpointWriter writer;
  writer.add_string("x", "y");
  std::string bytes = writer.bytes();
  bytes[bytes.size() - 1] = static_cast<char>(bytes[bytes.size() - 1] ^ 1);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("fails its checksum")));
}

TEST_F(CheckpointTest, AFailedWriteLeavesThePreviousCheckpointIntact) {
  const auto path = dir_ / "keep.xax";
  xax::CheckpointWriter first;
  first.add_string("generation", "1");
  first.write(path);

  // The temporary file cannot be created where a directory of that name stands.
  std::filesystem::create_directories(dir_ / "keep.xax.tmp");
  xax::CheckpointWriter second;
  second.add_string("generation", "2");
  EXPECT_THAT([&] { second.write(path); }, ::testing::ThrowsMessage<xax::CheckpointError>(
                                               HasSubstr("previous checkpoint, if any, is unchanged")));
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "1");

  std::filesystem::remove_all(dir_ / "keep.xax.tmp");
  second.write(path);
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "2");
  EXPECT_FALSE(std::filesystem::exists(dir_ / "keep.xax.tmp")) << "no temporary file is left behind";
}

TEST_F(CheckpointTest, WritingIntoAMissingDirectoryThrows) {
  xax::CheckpointWriter writer;
  writer.add_string("a", "b");
  EXPECT_THROW(writer.write(dir_ / "no" / "such" / "dir" / "x.xax"), xax::CheckpointError);
}

}  // namespace
