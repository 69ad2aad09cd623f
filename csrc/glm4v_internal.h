// Internal declarations shared by the C API's translation units (not part of the API).
#pragma once

#include "glm4v.h"

#include "llama.h"
#include "mtmd.h"

#include <atomic>
#include <cstdio>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------
// handles
// ---------------------------------------------------------------------------------------

struct glm4v_image {
    int32_t n_tokens = 0;
    int32_t n_embd = 0;
    int32_t rows = 0;
    int32_t cols = 0;
    std::vector<float> data;
};

// Rows of the text model's token embedding table, read from its GGUF file. A prompt with an
// image is evaluated as one embedding sequence (text rows from here, image rows from the
// projector) so the engine's batches span part boundaries: one image between two short
// texts is otherwise four ubatches, two of them small and slow. Unavailable (ok() false)
// when the table is not in the main file (split models) or its type has no row converter;
// evaluation then goes part by part (eval_parts in glm4v_eval.cpp).
struct glm4v_token_rows {
    std::FILE * file = nullptr;
    int32_t type = -1;        // ggml_type of the stored rows
    size_t row_bytes = 0;
    int64_t n_rows = 0;
    int64_t offset = 0;       // of row 0 in the file
    int32_t n_embd = 0;
    std::vector<uint8_t> scratch;

    bool ok() const { return file != nullptr; }
    // Open model_path and locate token_embd.weight; leaves ok() false on any mismatch.
    void open(const char * model_path, int32_t n_embd_model, int32_t n_vocab);
    // Row `token` as n_embd floats, converted as the engine's get_rows converts it.
    bool read(int32_t token, float * out);
    ~glm4v_token_rows() {
        if (file) std::fclose(file);
    }
};

struct glm4v_session {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    mtmd_context * mctx = nullptr;
    const llama_vocab * vocab = nullptr;
    llama_batch_ext * batch = nullptr;
    int32_t n_batch = 512;
    glm4v_token_rows token_rows;
    bool use_mrope = false;

    std::string last_error;
    std::atomic<bool> cancel{false};
    glm4v_poll_fn poll_fn = nullptr;  // see glm4v_set_interrupt_poll
    void * poll_user = nullptr;
    double poll_interval_ms = 50.0;
    double poll_last_ms = 0.0;

    // Ask poll_fn whether to stop (rate_limited: at most every poll_interval_ms); sets cancel if so.
    bool poll_interrupt(bool rate_limited);

    // KV bookkeeping: for every cell, the position the next cell would take after it, and
    // which image it belongs to (0 for text).
    std::vector<int32_t> cell_next;
    std::vector<int32_t> cell_image;
    int32_t n_images_seen = 0;
    int32_t next_pos = 0;
    bool have_logits = false;

    // generation state
    llama_sampler * smpl = nullptr;
    std::vector<int32_t> stop_tokens;
    int32_t max_tokens = 0;
    int32_t n_generated = 0;
    int32_t pending_token = -1;  // sampled and emitted, not yet decoded
    std::string pending_text;    // bytes not yet returned (incomplete UTF-8 or no room)
    int32_t finish = GLM4V_FINISH_NONE;
    bool gen_active = false;

    glm4v_timings timings{};

    ~glm4v_session() {
        if (smpl) llama_sampler_free(smpl);
        if (batch) llama_batch_ext_free(batch);
        if (mctx) mtmd_free(mctx);
        if (ctx) llama_free(ctx);
        if (model) llama_model_free(model);
    }
};

namespace glm4v_detail {

// Record msg (with the engine's ERROR log lines of the current call appended) as the last
// error of s, or of this thread when s is NULL; returns st.
glm4v_status fail(glm4v_session * s, glm4v_status st, const std::string & msg);
// Start of every API call: forget engine errors of earlier calls.
void begin_call(glm4v_session * s);
// Initialise the backend and route engine logs through our callback (once per process).
void install_log_once();
std::string fmt(const char * f, ...);
double now_ms();
// GLM4V_ERR_INVALID_ARGUMENT (recorded on s) if a token id is outside the vocabulary.
glm4v_status check_token_ids(glm4v_session * s, const int32_t * tokens, int32_t n);
// Length of the longest prefix of s that does not end inside a UTF-8 sequence.
size_t utf8_complete_prefix(const std::string & s);

// glm4v_eval.cpp
glm4v_status run_batch(glm4v_session * s, const char * what);
void record_cells(glm4v_session * s, int32_t n, int32_t next, int32_t image_id);
void reset_generation(glm4v_session * s);
glm4v_status truncate_cells(glm4v_session * s, int32_t n);

}  // namespace glm4v_detail

// Closes a try block of an exported function: exceptions never cross the C boundary.
#define GLM4V_GUARD(s)                                                                      \
    catch (const std::bad_alloc &) {                                                        \
        return glm4v_detail::fail((s), GLM4V_ERR_INTERNAL, "out of memory");                              \
    }                                                                                       \
    catch (const std::exception & e) {                                                      \
        return glm4v_detail::fail((s), GLM4V_ERR_INTERNAL, std::string("internal error: ") + e.what());    \
    }                                                                                       \
    catch (...) {                                                                           \
        return glm4v_detail::fail((s), GLM4V_ERR_INTERNAL, "internal error");                             \
    }

