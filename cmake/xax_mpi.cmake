# Decides whether the optional MPI part (xax::mpi, headers under include/xax/distributed/) is built, so that
# XAX_WITH_MPI=AUTO never breaks a configure and the core never depends on MPI.
#
# FindMPI's CXX component means "MPI usable from C++", i.e. the C API through mpicxx's flags; xax uses only the
# C API (which Open MPI and MPICH both ship), so MPI_CXX_SKIP_MPICXX keeps the deprecated C++ bindings out.
# AUTO falls back to no MPI part with the reason; ON stops with it.
function(xax_find_mpi out_found)
  set(${out_found} OFF PARENT_SCOPE)
  if(XAX_WITH_MPI STREQUAL "OFF")
    return()
  endif()
  if(NOT XAX_WITH_MPI MATCHES "^(AUTO|ON)$")
    message(FATAL_ERROR "xax: XAX_WITH_MPI=${XAX_WITH_MPI} is not accepted; use AUTO, ON or OFF")
  endif()
  set(how_to_get_it
      "Data-parallel training needs MPI: on Debian 12, apt-get install libopenmpi-dev openmpi-bin (or libmpich-dev mpich).")
  set(MPI_CXX_SKIP_MPICXX ON CACHE BOOL "xax uses MPI's C API only")
  find_package(MPI QUIET COMPONENTS CXX)
  if(MPI_CXX_FOUND)
    set(${out_found} ON PARENT_SCOPE)
    return()
  endif()
  if(XAX_WITH_MPI STREQUAL "ON")
    message(FATAL_ERROR "xax: XAX_WITH_MPI=ON, but MPI was not found.\n${how_to_get_it}")
  endif()
  message(STATUS "xax: MPI was not found; the optional data-parallel part (xax::mpi) is not built.\n"
                 "   ${how_to_get_it}")
endfunction()

# How ctest launches an MPI test on `ranks` processes: FindMPI's launcher, its process-count flag, and for Open
# MPI --oversubscribe (the tests run 4 ranks on machines with fewer cores). Running as root is allowed through
# Open MPI's environment switches instead of --allow-run-as-root, so that a tree configured by one user can be
# tested by another (CI configures and tests as root in a fresh Debian root). Sets ${out_command} to the
# launcher prefix and ${out_environment} to the test ENVIRONMENT entries.
function(xax_mpi_launcher ranks out_command out_environment)
  set(command "${MPIEXEC_EXECUTABLE}" ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${MPIEXEC_PREFLAGS})
  set(environment "")
  execute_process(COMMAND "${MPIEXEC_EXECUTABLE}" --version OUTPUT_VARIABLE version ERROR_VARIABLE version)
  if(version MATCHES "Open MPI|OpenRTE")
    list(APPEND command --oversubscribe)
    # Shared memory in /tmp rather than /dev/shm, and no cross-memory-attach single copy: both are missing in
    # chroots and containers (CI's fresh Debian root), where Open MPI's defaults fail.
    set(environment OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_backing_directory=/tmp
                    OMPI_MCA_btl_vader_single_copy_mechanism=none)
  endif()
  set(${out_command} "${command}" PARENT_SCOPE)
  set(${out_environment} "${environment}" PARENT_SCOPE)
endfunction()
