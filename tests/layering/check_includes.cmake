# Checks that a header does not pull in a heavy dependency:
#   cmake -DCOMPILER=... -DSTD_FLAG=... -DINCLUDES=a|b -DDEFINES=X=1|Y -DOPTIONS=... -DHEADER=xax/utils/tree.hpp
#         -DFORBIDDEN=dnnl.hpp|... -P check_includes.cmake
#
# The header is preprocessed with -H, which makes GCC and Clang print every file they open, and the test fails if
# one of the FORBIDDEN file names appears. Lists come '|'-separated so that add_test does not split them. It
# passes trivially when the dependency is not installed (its header cannot be found, so it cannot be opened),
# which is what a build without it needs.
cmake_minimum_required(VERSION 3.25)

foreach(variable IN ITEMS COMPILER HEADER FORBIDDEN)
  if(NOT DEFINED ${variable} OR "${${variable}}" STREQUAL "")
    message(FATAL_ERROR "check_includes.cmake: pass -D${variable}=...")
  endif()
endforeach()

set(arguments)
if(STD_FLAG)
  list(APPEND arguments "${STD_FLAG}")
endif()
string(REPLACE "|" ";" includes "${INCLUDES}")
foreach(directory IN LISTS includes)
  if(directory)
    list(APPEND arguments "-I${directory}")
  endif()
endforeach()
string(REPLACE "|" ";" defines "${DEFINES}")
foreach(define IN LISTS defines)
  if(define)
    list(APPEND arguments "-D${define}")
  endif()
endforeach()
string(REPLACE "|" ";" options "${OPTIONS}")
list(APPEND arguments ${options})

string(REGEX REPLACE "[/.]" "_" probe_name "${HEADER}")
set(probe "${CMAKE_CURRENT_BINARY_DIR}/check_includes_${probe_name}.cpp")
file(WRITE "${probe}" "#include <${HEADER}>\n")

execute_process(
  COMMAND "${COMPILER}" ${arguments} -E -H "${probe}"
  RESULT_VARIABLE result
  OUTPUT_QUIET
  ERROR_VARIABLE opened)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "preprocessing ${HEADER} failed:\n${opened}")
endif()

string(REPLACE "|" ";" forbidden "${FORBIDDEN}")
string(REPLACE ";" "\\;" lines "${opened}")
string(REPLACE "\n" ";" lines "${lines}")
set(found)
foreach(line IN LISTS lines)
  foreach(name IN LISTS forbidden)
    string(REPLACE "." "\\." pattern "${name}")
    if(line MATCHES "^\\.+ .*[/\\\\]${pattern}$")
      list(APPEND found "${line}")
    endif()
  endforeach()
endforeach()
if(found)
  string(REPLACE ";" "\n" found "${found}")
  message(FATAL_ERROR "${HEADER} must not include ${FORBIDDEN}, but opens (-H, one dot per nesting level):\n"
                      "${found}\nFull include tree:\n${opened}")
endif()
message(STATUS "${HEADER} opens none of ${FORBIDDEN}")
