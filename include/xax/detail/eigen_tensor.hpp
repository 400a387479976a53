#pragma once
// Eigen's Tensor module, included after xax's Eigen configuration (see eigen.hpp).
#include <xax/detail/eigen.hpp>

#include <unsupported/Eigen/CXX11/Tensor>
