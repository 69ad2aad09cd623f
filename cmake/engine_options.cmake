# Engine build options shared by the package build (CMakeLists.txt) and the benchmark's
# llama-mtmd-cli build (bench/cli/CMakeLists.txt), so both run the same kernels.
# Backend options (GGML_CUDA, GGML_VULKAN, GGML_METAL, ...) are left to the caller (CMAKE_ARGS).
#
# GLM4V_WITH_COMMON: build llama.cpp's common library too (needed by llama-mtmd-cli only).

if(NOT DEFINED GLM4V_WITH_COMMON)
  set(GLM4V_WITH_COMMON OFF)
endif()
set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
set(LLAMA_BUILD_COMMON ${GLM4V_WITH_COMMON} CACHE BOOL "" FORCE)
set(LLAMA_BUILD_TOOLS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_TESTS OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_SERVER OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_APP OFF CACHE BOOL "" FORCE)
set(LLAMA_BUILD_MTMD ON CACHE BOOL "" FORCE)
set(LLAMA_OPENSSL OFF CACHE BOOL "" FORCE)
set(LLAMA_SUBPROCESS OFF CACHE BOOL "" FORCE)
set(MTMD_VIDEO OFF CACHE BOOL "" FORCE)
set(GGML_BUILD_TESTS OFF CACHE BOOL "" FORCE)
set(GGML_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
# ggml RPC (layers on other machines, `rpc_servers=` / `glm4v-mtmd rpc-server`): on by default.
# RDMA off: it would make the library depend on libibverbs, which a wheel cannot carry.
if(NOT DEFINED GGML_RPC)
  set(GGML_RPC ON CACHE BOOL "ggml: use RPC")
endif()
set(GGML_RPC_RDMA OFF CACHE BOOL "" FORCE)

# Each engine library keeps to itself what it links from static archives. A CUDA build's
# libggml-cuda.so was seen exporting ~1,900 of libstdc++'s own functions (from a static
# libstdc++): the dynamic linker then bound other libraries' C++ calls to that copy, and the
# process crashed on model load (llama_model::print_info) or when torch was imported after the
# engine. --exclude-libs keeps archive members out of the dynamic symbol table.
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  add_link_options("LINKER:--exclude-libs,ALL")
endif()
