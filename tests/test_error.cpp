#include <gtest/gtest.h>

#include <type_traits>
#include <xax/utils/error.hpp>

namespace {

template <class E>
class ErrorHierarchy : public ::testing::Test {};
using Errors = ::testing::Types<xax::ConfigError, xax::ShapeError, xax::LossScaleError, xax::CheckpointError,
                                xax::DataError>;
TYPED_TEST_SUITE(ErrorHierarchy, Errors);

TYPED_TEST(ErrorHierarchy, DerivesFromXaxErrorAndKeepsTheMessage) {
  static_assert(std::is_base_of_v<xax::Error, TypeParam>);
  try {
    throw TypeParam("what was wrong; what is accepted");
  } catch (const xax::Error& error) {
    EXPECT_STREQ(error.what(), "what was wrong; what is accepted");
  }
}

}  // namespace
