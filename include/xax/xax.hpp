#pragma once
/// \file
/// Everything in xax: every public header (all but detail/). tests/layering checks that none is missing.

#include <xax/nn/activation.hpp>
#include <xax/nn/linear.hpp>
#include <xax/nn/loss.hpp>
#include <xax/nn/mlp.hpp>
#include <xax/ops/activation.hpp>
#include <xax/ops/convert.hpp>
#include <xax/ops/matmul.hpp>
#include <xax/ops/matmul_concepts.hpp>
#include <xax/ops/reduce.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/optim/optimizer.hpp>
#include <xax/optim/param_groups.hpp>
#include <xax/optim/sgd.hpp>
#include <xax/task/any_optimizer.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/task/config.hpp>
#include <xax/task/mixins/mixed_precision.hpp>
#include <xax/task/mixins/train.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/mixed_precision.hpp>
