# Warnings, -Werror and sanitizers for xax's own targets (tests, benchmarks, examples). Never applied to the
# xax INTERFACE target, so none of it reaches consumers.
function(xax_configure_target target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(
      ${target} PRIVATE -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow -Wnon-virtual-dtor
                        -Wold-style-cast -Wcast-align -Woverloaded-virtual -Werror)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4 /WX /permissive-)
  endif()
  if(XAX_SANITIZERS)
    target_compile_options(${target} PRIVATE -fsanitize=${XAX_SANITIZERS} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${XAX_SANITIZERS})
  endif()
endfunction()
