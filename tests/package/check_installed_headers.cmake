# After package.install: the installed library holds xax's headers and none of the data-set readers, which live
# beside the benchmark and the examples (datasets/, DESIGN.md section 2).
#   cmake -DPREFIX=<install prefix> -P check_installed_headers.cmake
cmake_minimum_required(VERSION 3.25)

if(NOT DEFINED PREFIX)
  message(FATAL_ERROR "check_installed_headers.cmake: pass -DPREFIX=...")
endif()
file(GLOB_RECURSE installed RELATIVE "${PREFIX}" "${PREFIX}/*.hpp" "${PREFIX}/*.h")
if(NOT "include/xax/xax.hpp" IN_LIST installed)
  message(FATAL_ERROR "include/xax/xax.hpp is not installed under ${PREFIX}; installed headers: ${installed}")
endif()
set(unwanted ${installed})
list(FILTER unwanted INCLUDE REGEX "(^|/)(xax/data|xax_datasets)/")
if(unwanted)
  list(JOIN unwanted "\n  " unwanted)
  message(FATAL_ERROR "data-set readers must not be installed, but ${PREFIX} holds:\n  ${unwanted}")
endif()
list(LENGTH installed count)
message(STATUS "${count} headers installed, no data-set readers")
