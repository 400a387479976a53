#pragma once
/// \file
/// Everything in xax.

#include <xax/nn/activation.hpp>
#include <xax/nn/linear.hpp>
#include <xax/nn/loss.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/optim/optimizer.hpp>
#include <xax/optim/sgd.hpp>
#include <xax/utils/mixed_precision.hpp>
