// glm4v-mtmd C API implementation over llama.h + mtmd.h.
//
// Every exported function catches C++ exceptions and reports a status; messages go to a
// per-session string (or a thread-local one when there is no session). Engine log lines of
// level ERROR seen during a call are appended to the message, because the engine explains
// most failures only through its log.

#include "glm4v.h"
#include "glm4v_internal.h"

#include "llama.h"
#include "mtmd.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef GLM4V_ENGINE_COMMIT
#define GLM4V_ENGINE_COMMIT "unknown"
#endif

namespace {

// ---------------------------------------------------------------------------------------
// logging and errors
// ---------------------------------------------------------------------------------------

std::atomic<glm4v_log_fn> g_log_fn{nullptr};
std::atomic<void *> g_log_user{nullptr};

thread_local std::string t_global_error;
thread_local std::string t_engine_errors;  // ERROR-level engine log text of the current call
thread_local int t_last_level = 0;

void log_trampoline(enum ggml_log_level level, const char * text, void * /*user*/) {
    int lvl = (int) level;
    if (lvl == GGML_LOG_LEVEL_CONT) {
        lvl = t_last_level;
    } else {
        t_last_level = lvl;
    }
    if (lvl == GGML_LOG_LEVEL_ERROR && text) {
        if (t_engine_errors.size() < 4096) {
            t_engine_errors += text;
        }
    }
    glm4v_log_fn fn = g_log_fn.load();
    if (fn) {
        fn((int) level, text ? text : "", g_log_user.load());
    }
}

void install_log_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_trampoline, nullptr);
        mtmd_log_set(log_trampoline, nullptr);
        llama_backend_init();
    });
}

std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\r')) {
        s.pop_back();
    }
    return s;
}

std::string with_engine_detail(const std::string & msg) {
    std::string detail = trim(t_engine_errors);
    if (detail.empty()) {
        return msg;
    }
    // Keep it readable: collapse engine lines into one "engine: ..." suffix.
    for (auto & c : detail) {
        if (c == '\n') c = ';';
    }
    return msg + " (engine: " + detail + ")";
}

std::string fmt(const char * f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    return buf;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Complete UTF-8 prefix length of s (an incomplete trailing sequence is held back).
size_t utf8_complete_prefix(const std::string & s) {
    size_t n = s.size();
    size_t i = n;
    // look back at most 3 bytes for a lead byte
    for (size_t back = 1; back <= 4 && back <= n; ++back) {
        unsigned char c = (unsigned char) s[n - back];
        if ((c & 0xC0) == 0x80) {
            continue;  // continuation byte
        }
        size_t need = (c & 0x80) == 0 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
        i = (back >= need) ? n : n - back;
        return i;
    }
    return n;
}

}  // namespace

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

struct glm4v_session {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    mtmd_context * mctx = nullptr;
    const llama_vocab * vocab = nullptr;
    llama_batch_ext * batch = nullptr;
    int32_t n_batch = 512;
    bool use_mrope = false;

    std::string last_error;
    std::atomic<bool> cancel{false};

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

namespace {

glm4v_status fail(glm4v_session * s, glm4v_status st, const std::string & msg) {
    std::string full = with_engine_detail(msg);
    if (s) {
        s->last_error = full;
    } else {
        t_global_error = full;
    }
    return st;
}

// Start of every API call: forget engine errors of earlier calls.
void begin_call(glm4v_session * s) {
    t_engine_errors.clear();
    if (s) s->last_error.clear();
}

bool abort_cb(void * data) {
    auto * s = static_cast<glm4v_session *>(data);
    return s->cancel.load();
}

#define GLM4V_GUARD(s)                                                                      \
    catch (const std::bad_alloc &) {                                                        \
        return fail((s), GLM4V_ERR_INTERNAL, "out of memory");                              \
    }                                                                                       \
    catch (const std::exception & e) {                                                      \
        return fail((s), GLM4V_ERR_INTERNAL, std::string("internal error: ") + e.what());    \
    }                                                                                       \
    catch (...) {                                                                           \
        return fail((s), GLM4V_ERR_INTERNAL, "internal error");                             \
    }

// Decode batch; maps llama_process return codes to statuses.
glm4v_status run_batch(glm4v_session * s, const char * what) {
    int32_t rc = llama_process(s->ctx, LLAMA_PROCESS_TYPE_DECODE, s->batch);
    if (rc == 0) return GLM4V_OK;
    if (rc == 2 || s->cancel.load()) {
        return fail(s, GLM4V_ERR_CANCELLED, fmt("%s cancelled", what));
    }
    if (rc == 1) {
        return fail(s, GLM4V_ERR_CONTEXT_FULL,
                    fmt("%s: no KV cache slot available (n_ctx %u is full)", what, llama_n_ctx(s->ctx)));
    }
    return fail(s, GLM4V_ERR_DECODE, fmt("%s failed (llama_process returned %d)", what, rc));
}

void record_cells(glm4v_session * s, int32_t n, int32_t next, int32_t image_id) {
    s->cell_next.insert(s->cell_next.end(), (size_t) n, next);
    s->cell_image.insert(s->cell_image.end(), (size_t) n, image_id);
    s->next_pos = next;
}

glm4v_status eval_text(glm4v_session * s, const int32_t * toks, int32_t n, bool want_logits_last,
                       int32_t * pos_out) {
    const int32_t n_vocab = llama_vocab_n_tokens(s->vocab);
    for (int32_t i = 0; i < n; ++i) {
        if (toks[i] < 0 || toks[i] >= n_vocab) {
            return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("token id %d is outside the vocabulary (0..%d)", toks[i], n_vocab - 1));
        }
    }
    for (int32_t off = 0; off < n; off += s->n_batch) {
        const int32_t m = std::min(s->n_batch, n - off);
        llama_batch_ext_clear(s->batch);
        for (int32_t i = 0; i < m; ++i) {
            const int32_t idx = llama_batch_ext_add_token(s->batch, 0, toks[off + i]);
            if (idx < 0) return fail(s, GLM4V_ERR_INTERNAL, "batch full");
            const llama_pos p = s->next_pos + i;
            llama_batch_ext_set_pos(s->batch, idx, &p);
            if (want_logits_last && off + i == n - 1) {
                llama_batch_ext_set_output_logits(s->batch, idx, true);
            }
        }
        glm4v_status st = run_batch(s, "prompt evaluation");
        if (st != GLM4V_OK) return st;
        if (pos_out) {
            for (int32_t i = 0; i < m; ++i) {
                for (int k = 0; k < 3; ++k) pos_out[(size_t) (off + i) * 3 + k] = s->next_pos + i;
            }
        }
        // Text advances one position per token (transformers get_rope_index).
        for (int32_t i = 0; i < m; ++i) record_cells(s, 1, s->next_pos + 1, 0);
    }
    return GLM4V_OK;
}

glm4v_status eval_image(glm4v_session * s, const glm4v_part * img, bool want_logits_last, int32_t * pos_out) {
    const int32_t n_embd = img->n_embd;
    const int32_t st = s->next_pos;
    const int32_t n = img->rows * img->cols;
    const int32_t image_id = ++s->n_images_seen;
    for (int32_t off = 0; off < n; off += s->n_batch) {
        const int32_t m = std::min(s->n_batch, n - off);
        llama_batch_ext_clear(s->batch);
        for (int32_t i = 0; i < m; ++i) {
            const int32_t j = off + i;
            const llama_embd e = {img->embd + (size_t) j * n_embd, 1, (size_t) n_embd};
            const int32_t idx = llama_batch_ext_add_embd(s->batch, 0, e);
            if (idx < 0) return fail(s, GLM4V_ERR_INTERNAL, "batch full");
            // Merged-grid token (r, c) sits at (t, h, w) = (st, st + r, st + c):
            // transformers Glm4vModel.get_rope_index. Section order in the batch is t, h, w.
            const int32_t r = j / img->cols, c = j % img->cols;
            llama_pos p[4] = {st, st + r, st + c, 0};
            if (!s->use_mrope) {
                p[0] = p[1] = p[2] = p[3] = st + j;
            }
            llama_batch_ext_set_pos(s->batch, idx, p);
            if (pos_out) {
                pos_out[(size_t) j * 3 + 0] = p[0];
                pos_out[(size_t) j * 3 + 1] = p[1];
                pos_out[(size_t) j * 3 + 2] = p[2];
            }
            if (want_logits_last && j == n - 1) {
                llama_batch_ext_set_output_logits(s->batch, idx, true);
            }
        }
        glm4v_status stt = run_batch(s, "image evaluation");
        if (stt != GLM4V_OK) return stt;
        // An image fills rows*cols cells but moves the position by max(rows, cols).
        const int32_t next = s->use_mrope ? st + std::max(img->rows, img->cols) : st + off + m;
        record_cells(s, m, next, image_id);
    }
    return GLM4V_OK;
}

void reset_generation(glm4v_session * s) {
    if (s->smpl) {
        llama_sampler_free(s->smpl);
        s->smpl = nullptr;
    }
    s->gen_active = false;
    s->pending_token = -1;
    s->pending_text.clear();
    s->finish = GLM4V_FINISH_NONE;
    s->n_generated = 0;
}

// Keep exactly the first n cells of the KV cache.
glm4v_status truncate_cells(glm4v_session * s, int32_t n) {
    const int32_t have = (int32_t) s->cell_next.size();
    if (n < 0 || n > have) {
        return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("cannot keep %d cells: the cache holds %d", n, have));
    }
    if (n == have) return GLM4V_OK;
    // Cells of one image share their temporal position, so a cut inside one is refused.
    if (n > 0 && s->cell_image[(size_t) n] != 0 && s->cell_image[(size_t) n] == s->cell_image[(size_t) n - 1]) {
        return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("cannot keep %d cells: that cuts through an image", n));
    }
    // Every later cell has a temporal position >= the position that followed cell n-1.
    const int32_t p0 = n == 0 ? 0 : s->cell_next[(size_t) n - 1];
    llama_memory_t mem = llama_get_memory(s->ctx);
    if (!llama_memory_seq_rm(mem, 0, p0, -1)) {
        return fail(s, GLM4V_ERR_INTERNAL, fmt("could not remove KV cells from position %d", p0));
    }
    s->cell_next.resize((size_t) n);
    s->cell_image.resize((size_t) n);
    s->next_pos = p0;
    s->have_logits = false;
    return GLM4V_OK;
}

ggml_type kv_type_checked(int32_t t, bool & ok) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1:
        case GGML_TYPE_IQ4_NL:
            ok = true;
            return (ggml_type) t;
        default:
            ok = false;
            return GGML_TYPE_F16;
    }
}

}  // namespace

glm4v_status glm4v_fail_global(glm4v_status st, const std::string & msg) { return fail(nullptr, st, msg); }
void glm4v_begin_global_call() {
    install_log_once();
    begin_call(nullptr);
}

// ---------------------------------------------------------------------------------------
// library
// ---------------------------------------------------------------------------------------

extern "C" {

const char * glm4v_engine_version(void) { return GLM4V_ENGINE_COMMIT; }

const char * glm4v_system_info(void) {
    install_log_once();
    return llama_print_system_info();
}

const char * glm4v_last_global_error(void) { return t_global_error.c_str(); }

void glm4v_set_log_callback(glm4v_log_fn fn, void * user_data) {
    g_log_user.store(user_data);
    g_log_fn.store(fn);
    install_log_once();
}

glm4v_load_params glm4v_load_params_default(void) {
    glm4v_load_params p;
    p.n_ctx = 4096;
    p.n_batch = 2048;
    p.n_ubatch = 512;
    p.n_threads = 4;
    p.n_threads_batch = 4;
    p.n_gpu_layers = 0;
    p.flash_attn = -1;
    p.type_k = GGML_TYPE_F16;
    p.type_v = GGML_TYPE_F16;
    p.use_mmap = 1;
    p.mmproj_use_gpu = 1;
    // Transformers' Glm4vImageProcessor limits (12544 / 9633792 pixels over two frames).
    p.image_min_tokens = 8;
    p.image_max_tokens = 6144;
    p.warmup = 0;
    return p;
}

glm4v_sampling glm4v_sampling_default(void) {
    glm4v_sampling s;
    s.temperature = 0.0f;
    s.top_k = 0;
    s.top_p = 1.0f;
    s.min_p = 0.0f;
    s.repeat_penalty = 1.0f;
    s.repeat_last_n = 64;
    s.presence_penalty = 0.0f;
    s.frequency_penalty = 0.0f;
    s.seed = 0;
    return s;
}

// ---------------------------------------------------------------------------------------
// session
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_session_load(const char * model_path, const char * mmproj_path,
                                const glm4v_load_params * params, glm4v_session ** out) {
    install_log_once();
    begin_call(nullptr);
    if (!out) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (!model_path || !params) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "model path and params are required");
    glm4v_session * s = nullptr;
    try {
        const double t0 = now_ms();
        bool ok_k = false, ok_v = false;
        const ggml_type tk = kv_type_checked(params->type_k, ok_k);
        const ggml_type tv = kv_type_checked(params->type_v, ok_v);
        if (!ok_k || !ok_v) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "unsupported KV cache type");
        if (params->n_ctx <= 0 || params->n_batch <= 0 || params->n_ubatch <= 0 || params->n_threads <= 0 ||
            params->n_threads_batch <= 0) {
            return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "n_ctx, n_batch, n_ubatch and thread counts must be positive");
        }

        s = new glm4v_session();
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = params->n_gpu_layers;
        mp.load_mode = params->use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
        s->model = llama_model_load_from_file(model_path, mp);
        if (!s->model) {
            delete s;
            return fail(nullptr, GLM4V_ERR_LOAD, fmt("failed to load the text model '%s'", model_path));
        }
        s->vocab = llama_model_get_vocab(s->model);

        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = (uint32_t) params->n_ctx;
        cp.n_batch = (uint32_t) params->n_batch;
        cp.n_ubatch = (uint32_t) std::min(params->n_ubatch, params->n_batch);
        cp.n_seq_max = 1;
        cp.n_threads = params->n_threads;
        cp.n_threads_batch = params->n_threads_batch;
        cp.flash_attn_type = (llama_flash_attn_type) params->flash_attn;
        cp.type_k = tk;
        cp.type_v = tv;
        cp.abort_callback = abort_cb;
        cp.abort_callback_data = s;
        cp.no_perf = false;
        s->ctx = llama_init_from_model(s->model, cp);
        if (!s->ctx) {
            delete s;
            return fail(nullptr, GLM4V_ERR_LOAD, fmt("failed to create a context of %d tokens for '%s'", params->n_ctx, model_path));
        }
        s->n_batch = (int32_t) llama_n_batch(s->ctx);
        s->batch = llama_batch_ext_init(s->ctx);
        s->use_mrope = llama_model_rope_type(s->model) == LLAMA_ROPE_TYPE_MROPE ||
                       llama_model_rope_type(s->model) == LLAMA_ROPE_TYPE_IMROPE;

        if (mmproj_path && mmproj_path[0]) {
            mtmd_context_params mcp = mtmd_context_params_default();
            mcp.use_gpu = params->mmproj_use_gpu != 0;
            mcp.print_timings = false;
            mcp.n_threads = params->n_threads_batch;
            mcp.flash_attn_type = (llama_flash_attn_type) params->flash_attn;
            mcp.warmup = params->warmup != 0;
            mcp.image_min_tokens = params->image_min_tokens;
            mcp.image_max_tokens = params->image_max_tokens;
            s->mctx = mtmd_init_from_file(mmproj_path, s->model, mcp);
            if (!s->mctx) {
                delete s;
                return fail(nullptr, GLM4V_ERR_LOAD, fmt("failed to load the projector '%s'", mmproj_path));
            }
            if (!mtmd_support_vision(s->mctx)) {
                delete s;
                return fail(nullptr, GLM4V_ERR_LOAD, fmt("the projector '%s' has no vision encoder", mmproj_path));
            }
        }
        s->timings.t_load_ms = now_ms() - t0;
        *out = s;
        return GLM4V_OK;
    }
    catch (const std::exception & e) {
        delete s;
        return fail(nullptr, GLM4V_ERR_LOAD, std::string("failed to load: ") + e.what());
    }
    catch (...) {
        delete s;
        return fail(nullptr, GLM4V_ERR_LOAD, "failed to load: unknown error");
    }
}

void glm4v_session_free(glm4v_session * s) { delete s; }

const char * glm4v_last_error(const glm4v_session * s) {
    return s ? s->last_error.c_str() : t_global_error.c_str();
}

glm4v_status glm4v_session_info(const glm4v_session * s, glm4v_model_info * out) {
    if (!s || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    out->n_vocab = llama_vocab_n_tokens(s->vocab);
    out->n_embd = llama_model_n_embd_inp(s->model);
    out->n_ctx = (int32_t) llama_n_ctx(s->ctx);
    out->n_ctx_train = llama_model_n_ctx_train(s->model);
    out->n_layer = llama_model_n_layer(s->model);
    out->mmproj_n_embd = -1;
    out->use_mrope = s->use_mrope ? 1 : 0;
    out->image_token = glm4v_token_id(const_cast<glm4v_session *>(s), "<|image|>");
    out->begin_image_token = glm4v_token_id(const_cast<glm4v_session *>(s), "<|begin_of_image|>");
    out->end_image_token = glm4v_token_id(const_cast<glm4v_session *>(s), "<|end_of_image|>");
    out->n_params = (int64_t) llama_model_n_params(s->model);
    out->model_size = llama_model_size(s->model);
    if (s->mctx) {
        out->mmproj_n_embd = out->n_embd;  // equality is enforced by mtmd_init_from_file
    }
    return GLM4V_OK;
}

glm4v_status glm4v_meta_str(const glm4v_session * s, const char * key, char * buf, int32_t cap, int32_t * n_out) {
    if (!s || !key || !n_out) return GLM4V_ERR_INVALID_ARGUMENT;
    char small[1];
    int32_t n = llama_model_meta_val_str(s->model, key, cap > 0 ? buf : small, cap > 0 ? (size_t) cap : 1);
    if (n < 0) {
        *n_out = -1;
        return GLM4V_ERR_INVALID_ARGUMENT;
    }
    *n_out = n;
    return n < cap ? GLM4V_OK : GLM4V_ERR_BUFFER_TOO_SMALL;
}

glm4v_status glm4v_get_timings(const glm4v_session * s, glm4v_timings * out) {
    if (!s || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    *out = s->timings;
    return GLM4V_OK;
}

void glm4v_cancel(glm4v_session * s) {
    if (s) s->cancel.store(true);
}

// ---------------------------------------------------------------------------------------
// vocabulary
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_tokenize(glm4v_session * s, const char * text, int32_t len, int32_t parse_special,
                            int32_t * out, int32_t cap, int32_t * n_out) {
    if (!s || !text || !n_out || len < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    try {
        // GLM has no BOS: the prompt itself starts with [gMASK]<sop>, so add_special is false.
        int32_t n = llama_tokenize(s->vocab, text, len, out, cap, false, parse_special != 0);
        if (n == INT32_MIN) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "text too long to tokenize");
        if (n < 0) {
            *n_out = -n;
            return GLM4V_ERR_BUFFER_TOO_SMALL;
        }
        *n_out = n;
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_detokenize(glm4v_session * s, const int32_t * tokens, int32_t n, int32_t render_special,
                              char * buf, int32_t cap, int32_t * n_out) {
    if (!s || (!tokens && n > 0) || !n_out || n < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    try {
        const int32_t n_vocab = llama_vocab_n_tokens(s->vocab);
        for (int32_t i = 0; i < n; ++i) {
            if (tokens[i] < 0 || tokens[i] >= n_vocab) {
                return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("token id %d is outside the vocabulary (0..%d)", tokens[i], n_vocab - 1));
            }
        }
        int32_t r = llama_detokenize(s->vocab, tokens, n, buf, cap, false, render_special != 0);
        if (r < 0) {
            *n_out = -r;
            return GLM4V_ERR_BUFFER_TOO_SMALL;
        }
        *n_out = r;
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_token_piece(glm4v_session * s, int32_t token, int32_t render_special, char * buf, int32_t cap,
                               int32_t * n_out) {
    return glm4v_detokenize(s, &token, 1, render_special, buf, cap, n_out);
}

int32_t glm4v_token_is_eog(const glm4v_session * s, int32_t token) {
    if (!s || token < 0 || token >= llama_vocab_n_tokens(s->vocab)) return 0;
    return llama_vocab_is_eog(s->vocab, token) ? 1 : 0;
}

int32_t glm4v_token_id(glm4v_session * s, const char * piece) {
    if (!s || !piece) return -1;
    int32_t tok[2];
    int32_t n = llama_tokenize(s->vocab, piece, (int32_t) strlen(piece), tok, 2, false, true);
    if (n != 1) return -1;
    // Only an exact special piece counts, not an ordinary token that happens to match.
    const char * text = llama_vocab_get_text(s->vocab, tok[0]);
    return (text && strcmp(text, piece) == 0) ? tok[0] : -1;
}

// ---------------------------------------------------------------------------------------
// images
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_encode_image(glm4v_session * s, const uint8_t * rgb, int32_t width, int32_t height,
                                glm4v_image ** out) {
    if (!s || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    *out = nullptr;
    if (!s->mctx) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no projector (mmproj) is loaded: images are unavailable");
    if (!rgb || width <= 0 || height <= 0) {
        return fail(s, GLM4V_ERR_IMAGE, fmt("invalid image size %dx%d", width, height));
    }
    s->cancel.store(false);
    mtmd_bitmap * bmp = nullptr;
    mtmd_input_chunks * chunks = nullptr;
    glm4v_image * img = nullptr;
    auto cleanup = [&] {
        if (bmp) mtmd_bitmap_free(bmp);
        if (chunks) mtmd_input_chunks_free(chunks);
    };
    try {
        const double t0 = now_ms();
        bmp = mtmd_bitmap_init((uint32_t) width, (uint32_t) height, rgb);
        chunks = mtmd_input_chunks_init();
        const char * marker = mtmd_default_marker();
        mtmd_input_text txt = {marker, strlen(marker), false, true};
        const mtmd_bitmap * bmps[1] = {bmp};
        int32_t rc = mtmd_tokenize(s->mctx, chunks, &txt, bmps, 1);
        if (rc != 0) {
            cleanup();
            return fail(s, GLM4V_ERR_IMAGE, fmt("the engine could not preprocess a %dx%d image (code %d)", width, height, rc));
        }
        const mtmd_input_chunk * chunk = nullptr;
        for (size_t i = 0; i < mtmd_input_chunks_size(chunks); ++i) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, i);
            if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_IMAGE) chunk = c;
        }
        if (!chunk) {
            cleanup();
            return fail(s, GLM4V_ERR_INTERNAL, "the engine produced no image chunk");
        }
        const mtmd_image_tokens * it = mtmd_input_chunk_get_tokens_image(chunk);
        const int32_t n_tokens = (int32_t) mtmd_image_tokens_get_n_tokens(it);
        const mtmd_decoder_pos last = mtmd_image_tokens_get_decoder_pos(it, 0, (size_t) n_tokens - 1);
        rc = mtmd_encode_chunk(s->mctx, chunk);
        if (rc != 0) {
            cleanup();
            if (s->cancel.load()) return fail(s, GLM4V_ERR_CANCELLED, "image encoding cancelled");
            return fail(s, GLM4V_ERR_IMAGE, fmt("image encoding failed (code %d)", rc));
        }
        const float * embd = mtmd_get_output_embd(s->mctx);
        img = new glm4v_image();
        img->n_tokens = n_tokens;
        img->n_embd = llama_model_n_embd_inp(s->model);
        img->cols = (int32_t) last.x + 1;
        img->rows = (int32_t) last.y + 1;
        if (img->rows * img->cols != n_tokens) {
            // Non-grid layouts cannot occur for GLM4V; keep positions well defined anyway.
            img->rows = 1;
            img->cols = n_tokens;
        }
        img->data.assign(embd, embd + (size_t) n_tokens * (size_t) img->n_embd);
        cleanup();
        s->timings.t_encode_ms = now_ms() - t0;
        *out = img;
        return GLM4V_OK;
    }
    catch (const std::exception & e) {
        cleanup();
        delete img;
        return fail(s, GLM4V_ERR_INTERNAL, std::string("image encoding failed: ") + e.what());
    }
}

void glm4v_image_free(glm4v_image * img) { delete img; }
int32_t glm4v_image_n_tokens(const glm4v_image * img) { return img ? img->n_tokens : 0; }
int32_t glm4v_image_n_embd(const glm4v_image * img) { return img ? img->n_embd : 0; }
int32_t glm4v_image_rows(const glm4v_image * img) { return img ? img->rows : 0; }
int32_t glm4v_image_cols(const glm4v_image * img) { return img ? img->cols : 0; }
const float * glm4v_image_data(const glm4v_image * img) { return img ? img->data.data() : nullptr; }

// ---------------------------------------------------------------------------------------
// KV cache and prompt evaluation
// ---------------------------------------------------------------------------------------

int32_t glm4v_n_cells(const glm4v_session * s) { return s ? (int32_t) s->cell_next.size() : 0; }
int32_t glm4v_next_pos(const glm4v_session * s) { return s ? s->next_pos : 0; }

glm4v_status glm4v_kv_truncate(glm4v_session * s, int32_t n_cells) {
    if (!s) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    try {
        reset_generation(s);
        return truncate_cells(s, n_cells);
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_eval(glm4v_session * s, const glm4v_part * parts, int32_t n_parts, int32_t * positions_out,
                        int32_t positions_cap) {
    if (!s || (!parts && n_parts > 0) || n_parts < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    try {
        reset_generation(s);
        s->cancel.store(false);
        int64_t total = 0;
        for (int32_t i = 0; i < n_parts; ++i) {
            const glm4v_part & p = parts[i];
            if (p.embd && p.tokens) {
                return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d has both tokens and an image", i));
            }
            if (p.embd) {
                const int32_t n_embd = llama_model_n_embd_inp(s->model);
                if (p.rows <= 0 || p.cols <= 0 || p.rows > 65536 || p.cols > 65536) {
                    return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d: invalid image grid %dx%d", i, p.rows, p.cols));
                }
                if (p.n_embd != n_embd) {
                    return fail(s, GLM4V_ERR_INVALID_ARGUMENT,
                                fmt("part %d: image embedding width %d does not match the model's %d", i, p.n_embd, n_embd));
                }
                total += (int64_t) p.rows * p.cols;
            } else {
                if (p.n_tokens < 0 || (p.n_tokens > 0 && !p.tokens)) {
                    return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d has an invalid token array", i));
                }
                total += p.n_tokens;
            }
        }
        if (total == 0) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "the prompt is empty");
        const int64_t n_ctx = (int64_t) llama_n_ctx(s->ctx);
        const int64_t have = (int64_t) s->cell_next.size();
        if (have + total > n_ctx) {
            return fail(s, GLM4V_ERR_CONTEXT_FULL,
                        fmt("the prompt needs %lld KV cells but only %lld of n_ctx=%lld are free",
                            (long long) total, (long long) (n_ctx - have), (long long) n_ctx));
        }
        if (positions_out && positions_cap < total) {
            return fail(s, GLM4V_ERR_BUFFER_TOO_SMALL, "positions buffer too small");
        }
        const double t0 = now_ms();
        const int32_t start_cells = (int32_t) have;
        int64_t done = 0;
        glm4v_status st = GLM4V_OK;
        for (int32_t i = 0; i < n_parts && st == GLM4V_OK; ++i) {
            const bool last = (i == n_parts - 1);
            int32_t * pos = positions_out ? positions_out + done * 3 : nullptr;
            if (parts[i].embd) {
                st = eval_image(s, &parts[i], last, pos);
                done += (int64_t) parts[i].rows * parts[i].cols;
            } else if (parts[i].n_tokens > 0) {
                st = eval_text(s, parts[i].tokens, parts[i].n_tokens, last, pos);
                done += parts[i].n_tokens;
            } else if (last) {
                // An empty last part: the logits of the previous part are not requested.
                st = fail(s, GLM4V_ERR_INVALID_ARGUMENT, "the last prompt part is empty");
            }
        }
        if (st != GLM4V_OK) {
            // Leave the cache as it was before the call: the failed call changes nothing.
            std::string msg = s->last_error;
            truncate_cells(s, start_cells);
            s->last_error = msg;
            return st;
        }
        s->have_logits = true;
        s->timings.t_eval_ms = now_ms() - t0;
        s->timings.n_eval = (int32_t) total;
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_get_logits(glm4v_session * s, float * out, int32_t cap) {
    if (!s || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    const int32_t n_vocab = llama_vocab_n_tokens(s->vocab);
    if (cap < n_vocab) return fail(s, GLM4V_ERR_BUFFER_TOO_SMALL, "logits buffer too small");
    if (!s->have_logits) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no logits: evaluate a prompt first");
    const float * l = llama_get_logits_ith(s->ctx, -1);
    if (!l) return fail(s, GLM4V_ERR_INTERNAL, "the engine returned no logits");
    memcpy(out, l, sizeof(float) * (size_t) n_vocab);
    return GLM4V_OK;
}

// ---------------------------------------------------------------------------------------
// generation
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_gen_begin(glm4v_session * s, const glm4v_sampling * sp, const int32_t * stop_tokens,
                             int32_t n_stop, int32_t max_tokens) {
    if (!s || !sp || n_stop < 0 || (n_stop > 0 && !stop_tokens)) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_call(s);
    try {
        if (!s->have_logits) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "evaluate a prompt before generating");
        if (max_tokens < 0) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "max_tokens must be >= 0");
        reset_generation(s);
        const int32_t n_vocab = llama_vocab_n_tokens(s->vocab);
        llama_sampler_chain_params cparams = llama_sampler_chain_default_params();
        cparams.no_perf = true;
        llama_sampler * chain = llama_sampler_chain_init(cparams);
        if (sp->repeat_penalty != 1.0f || sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f) {
            const int32_t last_n = sp->repeat_last_n < 0 ? (int32_t) llama_n_ctx(s->ctx) : sp->repeat_last_n;
            llama_sampler_chain_add(chain, llama_sampler_init_penalties(n_vocab, last_n, sp->repeat_penalty,
                                                                        sp->frequency_penalty, sp->presence_penalty));
        }
        if (sp->temperature <= 0.0f) {
            llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        } else {
            // The order of transformers' logits processors: temperature, top-k, top-p, min-p.
            llama_sampler_chain_add(chain, llama_sampler_init_temp(sp->temperature));
            if (sp->top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(sp->top_k));
            if (sp->top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(sp->top_p, 1));
            if (sp->min_p > 0.0f) llama_sampler_chain_add(chain, llama_sampler_init_min_p(sp->min_p, 1));
            llama_sampler_chain_add(chain, llama_sampler_init_dist(sp->seed));
        }
        s->smpl = chain;
        s->stop_tokens.assign(stop_tokens, stop_tokens + n_stop);
        s->max_tokens = max_tokens;
        s->gen_active = true;
        s->cancel.store(false);
        s->timings.t_sample_ms = 0;
        s->timings.t_decode_ms = 0;
        s->timings.n_decode = 0;
        if (max_tokens == 0) s->finish = GLM4V_FINISH_LENGTH;
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_gen_step(glm4v_session * s, int32_t max_steps, char * text_out, int32_t text_cap,
                            int32_t * text_len, int32_t * tokens_out, int32_t tokens_cap, int32_t * n_tokens,
                            int32_t * finish, int32_t * stop_token) {
    if (!s || !text_out || !text_len || !n_tokens || !finish || !stop_token || text_cap < 8 ||
        (tokens_cap > 0 && !tokens_out) || max_steps <= 0) {
        return GLM4V_ERR_INVALID_ARGUMENT;
    }
    begin_call(s);
    *text_len = 0;
    *n_tokens = 0;
    *finish = GLM4V_FINISH_NONE;
    *stop_token = -1;
    if (!s->gen_active) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no generation in progress: call gen_begin first");
    try {
        char piece[256];
        const int32_t n_ctx = (int32_t) llama_n_ctx(s->ctx);
        int32_t steps = 0;
        while (s->finish == GLM4V_FINISH_NONE && steps < max_steps && *n_tokens < tokens_cap &&
               (int32_t) s->pending_text.size() < text_cap / 2) {
            if (s->cancel.load()) {
                s->finish = GLM4V_FINISH_CANCELLED;
                break;
            }
            // Decode the token emitted by the previous step, so that the cache always holds
            // everything but the last emitted token (which is decoded only if needed).
            if (s->pending_token >= 0) {
                if ((int32_t) s->cell_next.size() >= n_ctx) {
                    s->finish = GLM4V_FINISH_CONTEXT;
                    break;
                }
                const double t0 = now_ms();
                llama_batch_ext_clear(s->batch);
                const int32_t idx = llama_batch_ext_add_token(s->batch, 0, s->pending_token);
                const llama_pos p = s->next_pos;
                llama_batch_ext_set_pos(s->batch, idx, &p);
                llama_batch_ext_set_output_logits(s->batch, idx, true);
                glm4v_status st = run_batch(s, "decoding");
                if (st == GLM4V_ERR_CANCELLED) {
                    s->finish = GLM4V_FINISH_CANCELLED;
                    s->last_error.clear();
                    break;
                }
                if (st != GLM4V_OK) {
                    s->gen_active = false;
                    return st;
                }
                record_cells(s, 1, s->next_pos + 1, 0);
                s->pending_token = -1;
                s->timings.t_decode_ms += now_ms() - t0;
                s->timings.n_decode += 1;
            }
            const double t1 = now_ms();
            const llama_token tok = llama_sampler_sample(s->smpl, s->ctx, -1);
            s->timings.t_sample_ms += now_ms() - t1;
            ++steps;
            if (std::find(s->stop_tokens.begin(), s->stop_tokens.end(), tok) != s->stop_tokens.end()) {
                s->finish = GLM4V_FINISH_STOP;
                *stop_token = tok;
                break;
            }
            // Render special pieces: grounding markers (<|begin_of_box|>) are special tokens.
            int32_t n = llama_token_to_piece(s->vocab, tok, piece, sizeof(piece), 0, true);
            if (n > 0) s->pending_text.append(piece, (size_t) n);
            tokens_out[(*n_tokens)++] = tok;
            s->pending_token = tok;
            s->n_generated += 1;
            s->have_logits = false;
            if (s->n_generated >= s->max_tokens) {
                s->finish = GLM4V_FINISH_LENGTH;
            }
        }
        // Hand out complete UTF-8 text; at the end, everything.
        size_t n_out = s->finish != GLM4V_FINISH_NONE ? s->pending_text.size() : utf8_complete_prefix(s->pending_text);
        if (n_out > (size_t) text_cap) {
            n_out = utf8_complete_prefix(s->pending_text.substr(0, (size_t) text_cap));
        }
        memcpy(text_out, s->pending_text.data(), n_out);
        s->pending_text.erase(0, n_out);
        *text_len = (int32_t) n_out;
        if (s->finish != GLM4V_FINISH_NONE && s->pending_text.empty()) {
            *finish = s->finish;
            s->gen_active = false;
            if (s->smpl) {
                llama_sampler_free(s->smpl);
                s->smpl = nullptr;
            }
        }
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

}  // extern "C"
