# Locate the llama.cpp engine source tree.
#
# The engine is the llama.cpp tree vendored in the llama-cpp-python source distribution,
# pinned by version and sha256. It is downloaded once with pip, checked, and the parts we
# build (plus the reference converter used by the test suite) are extracted into a user
# cache directory that later builds reuse. GLM4V_LLAMA_CPP_DIR (CMake variable or
# environment variable) points the build at a user's own llama.cpp checkout instead.
#
# The pinned tree gets the patches in csrc/patches/*.patch (applied in name order, each a
# unified diff against the pinned tree, documented in csrc/patches/README.md); the cache
# directory name carries a hash of them, so a changed patch set extracts a fresh tree. A user
# checkout is never modified: the patches are listed as not applied.
#
# Output: GLM4V_ENGINE_DIR, GLM4V_ENGINE_ORIGIN, GLM4V_ENGINE_PATCHES (applied patch names).

set(GLM4V_ENGINE_PACKAGE "llama-cpp-python")
set(GLM4V_ENGINE_PACKAGE_VERSION "0.3.36")
set(GLM4V_ENGINE_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
set(GLM4V_ENGINE_COMMIT "0c1e57098bba43ac29e6e3b677cdceebdd22334f")

file(GLOB _patches "${CMAKE_CURRENT_LIST_DIR}/../csrc/patches/*.patch")
list(SORT _patches)
set(_patch_names "")
set(_patch_sums "")
foreach(_p IN LISTS _patches)
  get_filename_component(_n "${_p}" NAME)
  file(SHA256 "${_p}" _sum)
  list(APPEND _patch_names "${_n}")
  string(APPEND _patch_sums "${_n}:${_sum};")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_p}")
endforeach()

if(NOT GLM4V_LLAMA_CPP_DIR AND DEFINED ENV{GLM4V_LLAMA_CPP_DIR})
  set(GLM4V_LLAMA_CPP_DIR "$ENV{GLM4V_LLAMA_CPP_DIR}")
endif()

if(GLM4V_LLAMA_CPP_DIR)
  get_filename_component(GLM4V_ENGINE_DIR "${GLM4V_LLAMA_CPP_DIR}" ABSOLUTE)
  if(NOT EXISTS "${GLM4V_ENGINE_DIR}/tools/mtmd/mtmd.h")
    message(FATAL_ERROR
      "GLM4V_LLAMA_CPP_DIR=${GLM4V_ENGINE_DIR} is not a llama.cpp source tree "
      "(tools/mtmd/mtmd.h is missing). Unset it to use the pinned engine source.")
  endif()
  set(GLM4V_ENGINE_ORIGIN "user checkout")
  set(GLM4V_ENGINE_PATCHES "")
  if(_patch_names)
    message(STATUS "glm4v-mtmd: engine patches not applied to a user checkout: ${_patch_names}")
  endif()
  # Report the checkout's own commit when it is a git tree; the pinned one does not apply.
  execute_process(COMMAND git -C "${GLM4V_ENGINE_DIR}" rev-parse HEAD
    OUTPUT_VARIABLE _commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
  if(_rc EQUAL 0 AND _commit)
    set(GLM4V_ENGINE_COMMIT "${_commit}")
  else()
    set(GLM4V_ENGINE_COMMIT "unknown")
  endif()
  return()
endif()

# The cache directory: GLM4V_CACHE_DIR, else XDG_CACHE_HOME/glm4v-mtmd, else ~/.cache/glm4v-mtmd.
if(DEFINED ENV{GLM4V_CACHE_DIR})
  set(_cache "$ENV{GLM4V_CACHE_DIR}")
elseif(DEFINED ENV{XDG_CACHE_HOME})
  set(_cache "$ENV{XDG_CACHE_HOME}/glm4v-mtmd")
elseif(DEFINED ENV{LOCALAPPDATA})
  set(_cache "$ENV{LOCALAPPDATA}/glm4v-mtmd")
else()
  set(_cache "$ENV{HOME}/.cache/glm4v-mtmd")
endif()
string(SUBSTRING "${GLM4V_ENGINE_SHA256}" 0 12 _short)
set(_root "${_cache}/engine-${GLM4V_ENGINE_PACKAGE_VERSION}-${_short}")
if(_patch_sums)
  string(SHA256 _patch_hash "${_patch_sums}")
  string(SUBSTRING "${_patch_hash}" 0 8 _patch_hash)
  string(APPEND _root "-p${_patch_hash}")
endif()
set(GLM4V_ENGINE_DIR "${_root}/llama.cpp")
set(GLM4V_ENGINE_ORIGIN "${GLM4V_ENGINE_PACKAGE}==${GLM4V_ENGINE_PACKAGE_VERSION}")
set(GLM4V_ENGINE_PATCHES "${_patch_names}")

if(EXISTS "${_root}/.complete")
  message(STATUS "glm4v-mtmd: using cached engine source ${GLM4V_ENGINE_DIR}")
  return()
endif()

set(_sdist_name "llama_cpp_python-${GLM4V_ENGINE_PACKAGE_VERSION}.tar.gz")
set(_download_dir "${_cache}/downloads")
set(_sdist "${_download_dir}/${_sdist_name}")

if(EXISTS "${_sdist}")
  file(SHA256 "${_sdist}" _have)
  if(NOT _have STREQUAL GLM4V_ENGINE_SHA256)
    file(REMOVE "${_sdist}")
  endif()
endif()

if(NOT EXISTS "${_sdist}")
  message(STATUS "glm4v-mtmd: downloading engine source ${GLM4V_ENGINE_ORIGIN} (once; cached in ${_cache})")
  file(MAKE_DIRECTORY "${_download_dir}")
  # --no-build-isolation: pip prepares the sdist's metadata with the scikit-build-core
  # already present in this build environment instead of fetching another copy.
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --no-binary :all:
            --no-build-isolation --disable-pip-version-check
            -d "${_download_dir}" "${GLM4V_ENGINE_PACKAGE}==${GLM4V_ENGINE_PACKAGE_VERSION}"
    RESULT_VARIABLE _rc
    OUTPUT_VARIABLE _out
    ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0 OR NOT EXISTS "${_sdist}")
    message(FATAL_ERROR
      "glm4v-mtmd: could not download the engine source ${GLM4V_ENGINE_ORIGIN} with pip.\n"
      "${_out}\n${_err}\n"
      "Fix: make the package index reachable, or download ${_sdist_name} yourself into "
      "${_download_dir}, or set GLM4V_LLAMA_CPP_DIR to a llama.cpp checkout at commit "
      "${GLM4V_ENGINE_COMMIT}.")
  endif()
endif()

file(SHA256 "${_sdist}" _have)
if(NOT _have STREQUAL GLM4V_ENGINE_SHA256)
  file(REMOVE "${_sdist}")
  message(FATAL_ERROR
    "glm4v-mtmd: ${_sdist_name} has sha256 ${_have}, expected ${GLM4V_ENGINE_SHA256}. "
    "The corrupt download was removed; build again to retry.")
endif()

# Extract only what the build and the reference converter need, into a temporary
# directory first so an interrupted extraction never looks complete.
set(_prefix "llama_cpp_python-${GLM4V_ENGINE_PACKAGE_VERSION}/vendor/llama.cpp")
set(_tmp "${_root}.tmp")
file(REMOVE_RECURSE "${_tmp}" "${_root}")
file(ARCHIVE_EXTRACT INPUT "${_sdist}" DESTINATION "${_tmp}"
  PATTERNS
    "${_prefix}/CMakeLists.txt" "${_prefix}/LICENSE" "${_prefix}/cmake" "${_prefix}/ggml"
    "${_prefix}/src" "${_prefix}/include" "${_prefix}/tools/mtmd" "${_prefix}/vendor"
    "${_prefix}/licenses" "${_prefix}/common" "${_prefix}/tools/CMakeLists.txt"
    "${_prefix}/gguf-py" "${_prefix}/conversion" "${_prefix}/convert_hf_to_gguf.py"
    "${_prefix}/requirements")
if(NOT EXISTS "${_tmp}/${_prefix}/tools/mtmd/mtmd.h")
  message(FATAL_ERROR "glm4v-mtmd: ${_sdist_name} does not contain ${_prefix}/tools/mtmd")
endif()
if(_patches)
  find_program(GLM4V_PATCH_EXECUTABLE patch)
  find_program(GLM4V_GIT_EXECUTABLE git)
endif()
foreach(_p IN LISTS _patches)
  get_filename_component(_n "${_p}" NAME)
  if(GLM4V_PATCH_EXECUTABLE)
    set(_apply "${GLM4V_PATCH_EXECUTABLE}" -p1 --batch --forward --silent -i "${_p}")
  elseif(GLM4V_GIT_EXECUTABLE)
    set(_apply "${GLM4V_GIT_EXECUTABLE}" apply -p1 "${_p}")
  else()
    message(FATAL_ERROR "glm4v-mtmd: applying the engine patch ${_n} needs `patch` or `git`; install one")
  endif()
  execute_process(COMMAND ${_apply} WORKING_DIRECTORY "${_tmp}/${_prefix}"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    file(REMOVE_RECURSE "${_tmp}")
    message(FATAL_ERROR "glm4v-mtmd: engine patch ${_n} does not apply to ${GLM4V_ENGINE_ORIGIN}:\n${_out}\n${_err}")
  endif()
  message(STATUS "glm4v-mtmd: applied engine patch ${_n}")
endforeach()
file(MAKE_DIRECTORY "${_root}")
file(RENAME "${_tmp}/${_prefix}" "${GLM4V_ENGINE_DIR}")
file(REMOVE_RECURSE "${_tmp}")
file(WRITE "${_root}/.complete" "${GLM4V_ENGINE_SHA256}\n")
message(STATUS "glm4v-mtmd: engine source extracted to ${GLM4V_ENGINE_DIR}")
