# Runs one compile-fail test: cmake -DBINARY_DIR=... -DTARGET=... -DSOURCE=... -P check.cmake
#
# The test passes only when BOTH hold:
#   1. building TARGET fails, and
#   2. one diagnostic line of the build output that names an error matches the regular expression after
#      "// expected-error: " on SOURCE's first line (the static_assert message, #error text or concept name).
# Matching a single error line, rather than the whole output, keeps an expected text from being found in an
# echoed command line, a quoted source line or a note about some unrelated failure; a regex like `XAX_FIELDS`
# on the whole output would pass for almost any diagnostic, and a file that compiled would pass as long as
# something printed the text.
foreach(variable IN ITEMS BINARY_DIR TARGET SOURCE)
  if(NOT DEFINED ${variable})
    message(FATAL_ERROR "check.cmake: pass -D${variable}=...")
  endif()
endforeach()

file(STRINGS "${SOURCE}" first_line LIMIT_COUNT 1)
if(NOT first_line MATCHES "^// expected-error: (.+)$")
  message(FATAL_ERROR "${SOURCE}: the first line must be `// expected-error: <regex>`, not `${first_line}`")
endif()
set(expected "${CMAKE_MATCH_1}")

execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --target "${TARGET}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)

if(result EQUAL 0)
  message(FATAL_ERROR "${TARGET} built, but ${SOURCE} must not compile (expected an error matching "
                      "`${expected}`)")
endif()

# One list element per output line (semicolons would otherwise split lines).
string(REPLACE ";" "\\;" lines "${output}")
string(REPLACE "\n" ";" lines "${lines}")
foreach(line IN LISTS lines)
  if(line MATCHES "error" AND line MATCHES "${expected}")
    message(STATUS "${TARGET} failed to build as expected: ${line}")
    return()
  endif()
endforeach()
message(FATAL_ERROR "${TARGET} failed to build, but no error line matches `${expected}`; the build said:\n"
                    "${output}")
