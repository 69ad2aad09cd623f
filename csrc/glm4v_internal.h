// Internal helpers shared by the C API's translation units (not part of the API).
#pragma once

#include "glm4v.h"

#include <string>

// Record a session-less error (glm4v_last_global_error) with the engine's ERROR log lines
// of the current call appended, and return st.
glm4v_status glm4v_fail_global(glm4v_status st, const std::string & msg);
// Start of a session-less call: forget engine errors of earlier calls.
void glm4v_begin_global_call();
