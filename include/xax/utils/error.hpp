#pragma once
/// \file
/// The exception hierarchy of xax. Every error a user can cause derives from xax::Error, and its message says
/// what was wrong, the value seen, what is accepted and, where it helps, what to do.

#include <stdexcept>
#include <string>

namespace xax {

/// Base of every exception xax throws on bad input or a failed operation.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A configuration value (policy string, dtype name, loss-scale option, config field) is not accepted.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// Tensor or tree shapes do not agree (zip of trees with different structure, matmul operands, ...).
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// Loss scaling cannot make progress, e.g. the scale sits at its minimum and gradients keep overflowing.
class LossScaleError : public Error {
 public:
  using Error::Error;
};

/// A checkpoint could not be written, or one that was read is truncated, corrupt or of another format.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// A data set file is missing, truncated or malformed.
class DataError : public Error {
 public:
  using Error::Error;
};

}  // namespace xax
