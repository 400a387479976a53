# Runs the fault program under mpiexec and checks that the job ends by itself, fails, and says why.
#   cmake -DLAUNCHER=<mpiexec;-n;4;...> -DPROGRAM=<path> -DFAULT=throw|kill -DENVIRONMENT=<A=1;B=2> -P check_fault.cmake
cmake_minimum_required(VERSION 3.25)
set(bound 60)  # seconds; the job normally ends in about one
string(TIMESTAMP start "%s")
execute_process(COMMAND "${CMAKE_COMMAND}" -E env ${ENVIRONMENT} ${LAUNCHER} "${PROGRAM}" "${FAULT}"
                TIMEOUT ${bound} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
string(TIMESTAMP finish "%s")
math(EXPR seconds "${finish} - ${start}")
message(STATUS "fault '${FAULT}': mpiexec returned '${result}' after ${seconds} s; output:\n${output}")
if(result MATCHES "timeout")
  message(FATAL_ERROR "the job did not end within ${bound} s after a rank failed: a rank hangs")
endif()
if(result EQUAL 0)
  message(FATAL_ERROR "the job succeeded although a rank failed")
endif()
if(FAULT STREQUAL "throw")
  if(NOT output MATCHES "rank 3 of 4 failed: injected fault: 100 consecutive steps overflowed")
    message(FATAL_ERROR "the failing rank's message is missing from the job's output")
  endif()
elseif(NOT output MATCHES "signal 9|Killed|KILLED|killed")
  message(FATAL_ERROR "the output does not say that a rank was killed")
endif()
