# Runs the data_parallel example on 1 and on 2 ranks (synthetic data, a few steps) and checks that both end
# with the same params_crc32: deterministic mode is bit-identical across world sizes.
cmake_minimum_required(VERSION 3.25)
set(crcs)
foreach(ranks IN ITEMS 1 2)
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env ${ENVIRONMENT} XAX_FASHION_MNIST_DIR=/nonexistent OMP_NUM_THREADS=1
            ${LAUNCHER_${ranks}} "${PROGRAM}" max_steps=12 hidden=64
    TIMEOUT 240 RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  message(STATUS "${ranks} rank(s):\n${output}")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "data_parallel on ${ranks} rank(s) failed: ${result}")
  endif()
  if(NOT output MATCHES "params_crc32 ([0-9a-f]+)")
    message(FATAL_ERROR "data_parallel on ${ranks} rank(s) printed no params_crc32")
  endif()
  list(APPEND crcs "${CMAKE_MATCH_1}")
endforeach()
list(GET crcs 0 one)
list(GET crcs 1 two)
if(NOT one STREQUAL two)
  message(FATAL_ERROR "1 rank ended with params_crc32 ${one}, 2 ranks with ${two}: not bit-identical")
endif()
