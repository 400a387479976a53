# Runs PROGRAM with ARGS ('|'-separated, since a list would not survive the command line) and passes when it exits with an ordinary non-zero status (not a signal) and its
# output mentions EXPECTED (a regular expression, case-insensitive through a lower-cased comparison).
string(REPLACE "|" ";" ARGS "${ARGS}")
execute_process(COMMAND "${PROGRAM}" ${ARGS} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 120)
string(TOLOWER "${out}${err}" text)
string(TOLOWER "${EXPECTED}" expected)
if(NOT status MATCHES "^[0-9]+$")
  message(FATAL_ERROR "${PROGRAM} ${ARGS} did not exit normally: ${status}\n${out}${err}")
endif()
if(status EQUAL 0)
  message(FATAL_ERROR "${PROGRAM} ${ARGS} exited with 0; a bad command line must fail\n${out}${err}")
endif()
if(NOT text MATCHES "${expected}")
  message(FATAL_ERROR "${PROGRAM} ${ARGS} failed (status ${status}) without mentioning '${EXPECTED}':\n${out}${err}")
endif()
message(STATUS "exit status ${status}: ${out}${err}")
