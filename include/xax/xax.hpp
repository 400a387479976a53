#pragma once
/// \file
/// Everything in xax.

#include <xax/utils/mixed_precision.hpp>
