/* glm4v-mtmd: a small, stable C API over llama.cpp's llama.h and mtmd.h for GLM-4.xV.
 *
 * Python binds only this header (cffi, API mode). The declarations live in
 * glm4v_api.h so the same text serves as the cffi cdef. */
#ifndef GLM4V_H
#define GLM4V_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "glm4v_api.h"

#ifdef __cplusplus
}
#endif

#endif /* GLM4V_H */
