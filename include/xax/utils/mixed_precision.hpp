#pragma once
/// \file
/// The core utilities of xax (the seed's `xax/utils/mixed_precision.py`): dtypes, trees, policies, loss
/// scaling and finiteness checks.

#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/loss_scale.hpp>
#include <xax/utils/platform.hpp>
#include <xax/utils/policy.hpp>
#include <xax/utils/threads.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>
