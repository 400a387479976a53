# Runs the data_parallel example on 1 and on 2 ranks, and on 2 ranks with ZeRO-1 (synthetic data, a few steps),
# and checks that all end with the same params_crc32: deterministic mode is bit-identical across world sizes,
# and ZeRO-1 to the unsharded run.
cmake_minimum_required(VERSION 3.25)
set(crcs)
foreach(run IN ITEMS 1 2 2-zero1)
  string(REGEX MATCH "^[0-9]+" ranks "${run}")
  set(extra)
  if(run MATCHES "zero1")
    set(extra zero_stage=1)
  endif()
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -E env ${ENVIRONMENT} XAX_FASHION_MNIST_DIR=/nonexistent OMP_NUM_THREADS=1
            ${LAUNCHER_${ranks}} "${PROGRAM}" max_steps=12 hidden=64 ${extra}
    TIMEOUT 240 RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  message(STATUS "${run} rank(s):\n${output}")
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
list(GET crcs 2 zero1)
if(NOT one STREQUAL two)
  message(FATAL_ERROR "1 rank ended with params_crc32 ${one}, 2 ranks with ${two}: not bit-identical")
endif()
if(NOT zero1 STREQUAL two)
  message(FATAL_ERROR "2 ranks ended with params_crc32 ${two}, 2 ranks with ZeRO-1 with ${zero1}: not bit-identical")
endif()
