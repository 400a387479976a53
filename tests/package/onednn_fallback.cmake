# XAX_WITH_ONEDNN=AUTO must never break a configure: with a oneDNN package whose own config fails (Debian's without
# OpenCL) or one of the 3.x API, AUTO configures on the Eigen backend and says why; ON stops with the same reason.
#   cmake -DXAX_SOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=... -DEigen3_DIR=... -P onednn_fallback.cmake
foreach(package IN ITEMS broken v3)
  foreach(mode IN ITEMS AUTO ON)
    set(build_dir "${WORK_DIR}/${package}-${mode}")
    file(REMOVE_RECURSE "${build_dir}")
    execute_process(
      COMMAND "${CMAKE_COMMAND}" -S "${XAX_SOURCE_DIR}" -B "${build_dir}" -G "${GENERATOR}" -DXAX_BUILD_TESTS=OFF
              -DXAX_BUILD_BENCHMARKS=OFF -DXAX_BUILD_EXAMPLES=OFF -DXAX_WITH_ONEDNN=${mode} "-DEigen3_DIR=${Eigen3_DIR}"
              "-Ddnnl_DIR=${XAX_SOURCE_DIR}/tests/package/fake_onednn/${package}"
              # Hide the system's oneDNN so that only the fake package can be found.
              "-DCMAKE_IGNORE_PREFIX_PATH=/usr;/"
      RESULT_VARIABLE status
      OUTPUT_VARIABLE output
      ERROR_VARIABLE output)
    if(package STREQUAL "broken")
      set(reason "oneDNN's CMake package failed to load")
    else()
      set(reason "oneDNN 3.1.0 was found, but xax's backend uses the oneDNN 2.x API")
    endif()
    if(mode STREQUAL "AUTO" AND NOT (status EQUAL 0 AND output MATCHES "oneDNN backend OFF"))
      message(FATAL_ERROR "AUTO with the ${package} package did not fall back to Eigen (exit ${status}):\n${output}")
    endif()
    if(mode STREQUAL "ON" AND status EQUAL 0)
      message(FATAL_ERROR "ON with the ${package} package configured instead of failing:\n${output}")
    endif()
    string(REPLACE "\n  " " " flat_output "${output}") # CMake wraps message text
    if(NOT flat_output MATCHES "${reason}" OR NOT flat_output MATCHES "apt-get install libdnnl-dev ocl-icd-opencl-dev")
      message(FATAL_ERROR "${mode} with the ${package} package did not say why and how to fix it:\n${output}")
    endif()
  endforeach()
endforeach()
