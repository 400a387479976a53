# Decides whether the oneDNN backend is used, so that XAX_WITH_ONEDNN=AUTO never breaks a configure.
#
# find_package(dnnl) cannot simply be tried: Debian's dnnl-config.cmake calls find_package(OpenCL REQUIRED), which
# stops the whole configure with a fatal error when ocl-icd-opencl-dev (only a Recommends of libdnnl-dev) is missing,
# and the backend needs oneDNN's 2.x API. So a child CMake process tries first; only when it succeeds does this
# configure call find_package(dnnl) itself. AUTO falls back to the Eigen backend with the reason; ON stops with it.
function(xax_find_onednn out_found)
  set(${out_found} OFF PARENT_SCOPE)
  if(XAX_WITH_ONEDNN STREQUAL "OFF")
    return()
  endif()

  set(probe_dir "${PROJECT_BINARY_DIR}/xax_onednn_probe")
  set(probe_result "${probe_dir}/result.txt")
  file(REMOVE "${probe_result}")
  # The child searches where this configure would: the same compiler, prefixes and search switches.
  set(forwarded "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}")
  foreach(variable IN ITEMS CMAKE_PREFIX_PATH CMAKE_FIND_ROOT_PATH CMAKE_FIND_USE_CMAKE_SYSTEM_PATH CMAKE_IGNORE_PATH CMAKE_IGNORE_PREFIX_PATH dnnl_DIR)
    if(DEFINED ${variable})
      string(REPLACE ";" "\\;" value "${${variable}}")  # keep a list one argument
      list(APPEND forwarded "-D${variable}=${value}")
    endif()
  endforeach()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -S "${PROJECT_SOURCE_DIR}/cmake/onednn_probe" -B "${probe_dir}/build"
            -G "${CMAKE_GENERATOR}" ${forwarded} "-DXAX_PROBE_RESULT=${probe_result}"
    RESULT_VARIABLE probe_status
    OUTPUT_VARIABLE probe_output
    ERROR_VARIABLE probe_output)

  set(how_to_get_it
      "The fast bf16/f16 path needs oneDNN 2.x: on Debian 12, apt-get install libdnnl-dev ocl-icd-opencl-dev.")
  set(reason "")
  if(EXISTS "${probe_result}")
    file(READ "${probe_result}" outcome)
  else()
    set(outcome "failed")
  endif()
  if(outcome MATCHES "^found ")
    find_package(dnnl 2.0...<3.0 CONFIG REQUIRED)
    set(${out_found} ON PARENT_SCOPE)
    return()
  elseif(outcome STREQUAL "missing")
    set(reason "oneDNN was not found.")
  elseif(outcome MATCHES "^version (.*)")
    set(reason "oneDNN ${CMAKE_MATCH_1} was found, but xax's backend uses the oneDNN 2.x API.")
  else()
    # The package's own config stopped with an error (typically a dependency of oneDNN that is not installed):
    # quote the first error's text.
    string(REGEX MATCH "CMake Error[^\n]*\n([^\n]+\n?)+" first_error "${probe_output}")
    string(REGEX REPLACE "\nCall Stack.*" "" first_error "${first_error}")
    string(STRIP "${first_error}" first_error)
    set(reason "oneDNN's CMake package failed to load:\n  ${first_error}\n")
  endif()

  if(XAX_WITH_ONEDNN STREQUAL "ON")
    message(FATAL_ERROR "xax: XAX_WITH_ONEDNN=ON, but ${reason}\n${how_to_get_it}")
  endif()
  message(STATUS "xax: ${reason} Using the portable Eigen backend (16-bit products widened to fp32).\n"
                 "   ${how_to_get_it}")
endfunction()
