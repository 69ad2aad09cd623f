// glm4v-mtmd C API over llama.h + mtmd.h: library, logging and errors, model, contexts, vocabulary.
//
// Every exported function catches C++ exceptions and reports a status; messages go to a
// per-context string (or a thread-local one for calls on the model or on nothing). Engine log lines of
// level ERROR seen during a call are appended to the message, because the engine explains
// most failures only through its log.

#include "glm4v_internal.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>

// Our bound on sequences of one model (the engine's is LLAMA_MAX_SEQ, 256).
#define GLM4V_MAX_PARALLEL 256

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

}  // namespace

namespace glm4v_detail {

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

std::string engine_detail_suffix(const std::string & errors) {
    std::string detail = trim(errors);
    if (detail.empty()) {
        return "";
    }
    // Keep it readable: collapse engine lines into one "engine: ..." suffix.
    for (auto & c : detail) {
        if (c == '\n') c = ';';
    }
    return " (engine: " + detail + ")";
}

std::string with_engine_detail(const std::string & msg) { return msg + engine_detail_suffix(t_engine_errors); }

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

std::string engine_errors() { return t_engine_errors; }

glm4v_status check_token_ids(const glm4v_model * m, glm4v_ctx * c, const int32_t * tokens, int32_t n) {
    const int32_t n_vocab = m->n_vocab;
    for (int32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("token id %d is outside the vocabulary (0..%d)", tokens[i], n_vocab - 1));
        }
    }
    return GLM4V_OK;
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


glm4v_status fail(glm4v_ctx * c, glm4v_status st, const std::string & msg) {
    std::string full = with_engine_detail(msg);
    if (c) {
        c->last_error = full;
    } else {
        t_global_error = full;
    }
    return st;
}

void begin_api_call(glm4v_ctx * c) {
    t_engine_errors.clear();
    if (c) c->last_error.clear();
}

}  // namespace glm4v_detail

using namespace glm4v_detail;

bool glm4v_ctx::poll_interrupt(bool rate_limited) {
    if (!poll_fn) return false;
    if (rate_limited) {
        const double t = now_ms();
        if (t - poll_last_ms < poll_interval_ms) return false;
        poll_last_ms = t;
    }
    if (poll_fn(poll_user) == 0) return false;
    cancel.store(true);
    return true;
}

namespace {

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
    p.n_parallel = 1;
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
    // The engine's per-image window: outside it mtmd resizes an image (or a video's frame pair) again.
    // Still images are kept to transformers' Glm4vImageProcessor limits (8 .. 6144 tokens) in Python.
    // Video frame pairs share one budget over the whole clip (the video processors' max_pixels,
    // 47040000 = 30000 tokens), so one pair of a 2-frame clip can reach 30000 tokens and a pair of a
    // long clip can come down to a single token: the window spans both, and the engine never
    // rescales what the processor made. Warm-up does not grow with it (GLM4V warms up at 46x46 tokens).
    p.image_min_tokens = 1;
    p.image_max_tokens = 30000;
    p.warmup = 0;
    p.rpc_servers = nullptr;
    p.tensor_split = nullptr;
    p.n_tensor_split = 0;
    p.mmproj_rpc_server = -1;
    p.cpu_repack = 1;
    p.rpc_timeout_ms = 120000;
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
    s.bias_tokens = nullptr;
    s.bias_values = nullptr;
    s.n_bias = 0;
    return s;
}

// ---------------------------------------------------------------------------------------
// model
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_model_load(const char * model_path, const char * mmproj_path,
                              const glm4v_load_params * params, glm4v_model ** out) {
    install_log_once();
    begin_api_call(nullptr);
    if (!out) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (!model_path || !params) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "model path and params are required");
    glm4v_model * m = nullptr;
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
        if (params->n_parallel <= 0 || params->n_parallel > GLM4V_MAX_PARALLEL) {
            return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT,
                        fmt("n_parallel must be in 1..%d (got %d)", GLM4V_MAX_PARALLEL, params->n_parallel));
        }
        if ((int64_t) params->n_ctx * params->n_parallel > INT32_MAX) {
            return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "n_ctx * n_parallel does not fit in 32 bits");
        }

        glm4v_rpc_placement rpc;
        std::string rpc_err;
        if (!rpc_place(params, rpc, rpc_err)) return fail(nullptr, GLM4V_ERR_LOAD, rpc_err);

        m = new glm4v_model();
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = params->n_gpu_layers;
        mp.load_mode = params->use_mmap ? LLAMA_LOAD_MODE_MMAP : LLAMA_LOAD_MODE_NONE;
        mp.use_extra_bufts = params->cpu_repack != 0;
        if (!rpc.devices.empty()) {
            mp.devices = rpc.devices.data();  // NULL-terminated; RPC first, then local GPUs
            mp.split_mode = LLAMA_SPLIT_MODE_LAYER;
            if (!rpc.split.empty()) mp.tensor_split = rpc.split.data();
        }
        m->rpc_endpoints = rpc.endpoints;
        m->rpc_seen = rpc.failures;
        if (!rpc.endpoints.empty()) m->rpc_failures = rpc.failure_count;
        // A server lost while the weights (or the KV cache, or the projector) go out fails the load
        // with the server's name, not with the allocation that happened to fail after it.
        auto rpc_lost = [&]() {
            const std::string msg = rpc_message(m);
            delete m;
            return fail(nullptr, GLM4V_ERR_LOAD, "failed to load: " + msg);
        };
        m->model = llama_model_load_from_file(model_path, mp);
        if (rpc_check(m)) return rpc_lost();
        if (!m->model) {
            delete m;
            return fail(nullptr, GLM4V_ERR_LOAD, fmt("failed to load the text model '%s'", model_path));
        }
        m->vocab = llama_model_get_vocab(m->model);
        m->n_vocab = llama_vocab_n_tokens(m->vocab);
        m->n_embd = llama_model_n_embd_inp(m->model);

        llama_context_params cp = llama_context_default_params();
        // Each sequence gets a KV stream of its own with n_ctx cells (kv_unified off): its attention
        // reads its own cells only, as llama-batched-bench runs without -kvu.
        cp.n_ctx = (uint32_t) params->n_ctx * (uint32_t) params->n_parallel;
        cp.n_batch = (uint32_t) params->n_batch;
        cp.n_ubatch = (uint32_t) std::min(params->n_ubatch, params->n_batch);
        cp.n_seq_max = (uint32_t) params->n_parallel;
        cp.kv_unified = false;
        cp.n_threads = params->n_threads;
        cp.n_threads_batch = params->n_threads_batch;
        cp.flash_attn_type = (llama_flash_attn_type) params->flash_attn;
        cp.type_k = tk;
        cp.type_v = tv;
        cp.abort_callback = step_abort;
        cp.abort_callback_data = m;
        cp.no_perf = false;
        m->lctx = llama_init_from_model(m->model, cp);
        if (rpc_check(m)) return rpc_lost();
        if (!m->lctx) {
            delete m;
            return fail(nullptr, GLM4V_ERR_LOAD,
                        fmt("failed to create a context of %d x %d tokens for '%s'", params->n_parallel, params->n_ctx, model_path));
        }
        m->n_batch = (int32_t) llama_n_batch(m->lctx);
        m->n_parallel = (int32_t) llama_n_seq_max(m->lctx);
        m->n_ctx_seq = (int32_t) llama_n_ctx_seq(m->lctx);
        m->seq_used.assign((size_t) m->n_parallel, false);
        m->batch = llama_batch_ext_init(m->lctx);
        m->use_mrope = llama_model_rope_type(m->model) == LLAMA_ROPE_TYPE_MROPE ||
                       llama_model_rope_type(m->model) == LLAMA_ROPE_TYPE_IMROPE;
        m->token_rows.open(model_path, m->n_embd, m->n_vocab);
        m->row_buf.resize((size_t) m->n_embd);
        if (m->n_parallel > 1) start_engine(m);  // one sequence runs its steps on the caller's thread

        if (mmproj_path && mmproj_path[0]) {
            mtmd_context_params mcp = mtmd_context_params_default();
            mcp.use_gpu = params->mmproj_use_gpu != 0;
            if (rpc.mmproj_device) {  // explicit, never the first "GPU" the registry happens to hold
                mcp.use_gpu = true;
                mcp.device = rpc.mmproj_device;
            }
            mcp.print_timings = false;
            mcp.n_threads = params->n_threads_batch;
            mcp.flash_attn_type = (llama_flash_attn_type) params->flash_attn;
            mcp.warmup = params->warmup != 0;
            mcp.image_min_tokens = params->image_min_tokens;
            mcp.image_max_tokens = params->image_max_tokens;
            mcp.cb_eval = encode_check;  // cancellable encodes (glm4v_encode_image's cancel flag)
            mcp.cb_eval_user_data = m;
            m->mctx = mtmd_init_from_file(mmproj_path, m->model, mcp);
            if (rpc_check(m)) return rpc_lost();
            if (!m->mctx) {
                delete m;
                return fail(nullptr, GLM4V_ERR_LOAD, fmt("failed to load the projector '%s'", mmproj_path));
            }
            if (!mtmd_support_vision(m->mctx)) {
                delete m;
                return fail(nullptr, GLM4V_ERR_LOAD, fmt("the projector '%s' has no vision encoder", mmproj_path));
            }
        }
        m->t_load_ms = now_ms() - t0;
        *out = m;
        return GLM4V_OK;
    }
    catch (const std::exception & e) {
        delete m;
        return fail(nullptr, GLM4V_ERR_LOAD, std::string("failed to load: ") + e.what());
    }
    catch (...) {
        delete m;
        return fail(nullptr, GLM4V_ERR_LOAD, "failed to load: unknown error");
    }
}

void glm4v_model_free(glm4v_model * m) { delete m; }

double glm4v_model_load_ms(const glm4v_model * m) { return m ? m->t_load_ms : 0.0; }

void glm4v_model_steps(glm4v_model * m, int64_t * steps, int64_t * requests) {
    if (m) model_steps(m, steps, requests);
}

glm4v_status glm4v_model_get_info(const glm4v_model * m, glm4v_model_info * out) {
    if (!m || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    out->n_vocab = m->n_vocab;
    out->n_embd = m->n_embd;
    out->n_ctx = m->n_ctx_seq;
    out->n_parallel = m->n_parallel;
    out->n_ctx_train = llama_model_n_ctx_train(m->model);
    out->n_layer = llama_model_n_layer(m->model);
    out->mmproj_n_embd = -1;
    out->use_mrope = m->use_mrope ? 1 : 0;
    out->image_token = glm4v_token_id(m, "<|image|>");
    out->begin_image_token = glm4v_token_id(m, "<|begin_of_image|>");
    out->end_image_token = glm4v_token_id(m, "<|end_of_image|>");
    out->n_params = (int64_t) llama_model_n_params(m->model);
    out->model_size = llama_model_size(m->model);
    if (m->mctx) {
        out->mmproj_n_embd = out->n_embd;  // equality is enforced by mtmd_init_from_file
    }
    return GLM4V_OK;
}

glm4v_status glm4v_meta_str(const glm4v_model * m, const char * key, char * buf, int32_t cap, int32_t * n_out) {
    if (!m || !key || !n_out) return GLM4V_ERR_INVALID_ARGUMENT;
    char small[1];
    int32_t n = llama_model_meta_val_str(m->model, key, cap > 0 ? buf : small, cap > 0 ? (size_t) cap : 1);
    if (n < 0) {
        *n_out = -1;
        return GLM4V_ERR_INVALID_ARGUMENT;
    }
    *n_out = n;
    return n < cap ? GLM4V_OK : GLM4V_ERR_BUFFER_TOO_SMALL;
}

// ---------------------------------------------------------------------------------------
// contexts
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_ctx_open(glm4v_model * m, glm4v_ctx ** out) {
    begin_api_call(nullptr);
    if (!m || !out) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "model and out are required");
    *out = nullptr;
    try {
        std::lock_guard<std::mutex> lk(m->seq_mu);
        // The lowest free id: the engine batches consecutive ids together (see take_step).
        auto it = std::find(m->seq_used.begin(), m->seq_used.end(), false);
        if (it == m->seq_used.end()) {
            return fail(nullptr, GLM4V_ERR_BUSY, fmt("all %d sequences of the model are in use", m->n_parallel));
        }
        auto * c = new glm4v_ctx();
        c->m = m;
        c->seq = (int32_t) (it - m->seq_used.begin());
        c->logits.reserve((size_t) m->n_vocab);
        // A sequence given back keeps nothing, but clear it anyway: a failed step may have left cells.
        llama_memory_seq_rm(llama_get_memory(m->lctx), c->seq, -1, -1);
        *it = true;
        *out = c;
        return GLM4V_OK;
    }
    GLM4V_GUARD(nullptr)
}

void glm4v_ctx_free(glm4v_ctx * c) {
    if (!c) return;
    glm4v_model * m = c->m;
    try {
        {
            glm4v_call_scope scope(c);
            reset_generation(c);
        }
        std::lock_guard<std::mutex> lk(m->seq_mu);
        llama_memory_seq_rm(llama_get_memory(m->lctx), c->seq, -1, -1);
        m->seq_used[(size_t) c->seq] = false;
    } catch (...) {
    }
    delete c;
}

const char * glm4v_last_error(const glm4v_ctx * c) {
    return c ? c->last_error.c_str() : t_global_error.c_str();
}

int32_t glm4v_ctx_seq_id(const glm4v_ctx * c) { return c ? c->seq : -1; }

void glm4v_begin_call(glm4v_ctx * c) {
    if (!c) return;
    c->cancel.store(false);
    c->timings = glm4v_timings{};
}

glm4v_status glm4v_get_timings(const glm4v_ctx * c, glm4v_timings * out) {
    if (!c || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    *out = c->timings;
    return GLM4V_OK;
}

void glm4v_set_interrupt_poll(glm4v_ctx * c, glm4v_poll_fn fn, void * user_data, int32_t interval_ms) {
    if (!c) return;
    c->poll_fn = fn;
    c->poll_user = user_data;
    c->poll_interval_ms = interval_ms > 0 ? interval_ms : 0.0;
    c->poll_last_ms = 0.0;
}

void glm4v_cancel(glm4v_ctx * c) {
    if (c) c->cancel.store(true);
}

// ---------------------------------------------------------------------------------------
// vocabulary
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_tokenize(const glm4v_model * m, const char * text, int32_t len, int32_t parse_special,
                            int32_t * out, int32_t cap, int32_t * n_out) {
    if (!m || !text || !n_out || len < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(nullptr);
    try {
        // GLM has no BOS: the prompt itself starts with [gMASK]<sop>, so add_special is false.
        int32_t n = llama_tokenize(m->vocab, text, len, out, cap, false, parse_special != 0);
        if (n == INT32_MIN) return fail(nullptr, GLM4V_ERR_INVALID_ARGUMENT, "text too long to tokenize");
        if (n < 0) {
            *n_out = -n;
            return GLM4V_ERR_BUFFER_TOO_SMALL;
        }
        *n_out = n;
        return GLM4V_OK;
    }
    GLM4V_GUARD(nullptr)
}

glm4v_status glm4v_detokenize(const glm4v_model * m, const int32_t * tokens, int32_t n, int32_t render_special,
                              char * buf, int32_t cap, int32_t * n_out) {
    if (!m || (!tokens && n > 0) || !n_out || n < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(nullptr);
    try {
        glm4v_status st = check_token_ids(m, nullptr, tokens, n);
        if (st != GLM4V_OK) return st;
        int32_t r = llama_detokenize(m->vocab, tokens, n, buf, cap, false, render_special != 0);
        if (r < 0) {
            *n_out = -r;
            return GLM4V_ERR_BUFFER_TOO_SMALL;
        }
        *n_out = r;
        return GLM4V_OK;
    }
    GLM4V_GUARD(nullptr)
}

glm4v_status glm4v_token_piece(const glm4v_model * m, int32_t token, int32_t render_special, char * buf, int32_t cap,
                               int32_t * n_out) {
    return glm4v_detokenize(m, &token, 1, render_special, buf, cap, n_out);
}

int32_t glm4v_token_is_eog(const glm4v_model * m, int32_t token) {
    if (!m || token < 0 || token >= m->n_vocab) return 0;
    return llama_vocab_is_eog(m->vocab, token) ? 1 : 0;
}

int32_t glm4v_token_id(const glm4v_model * m, const char * piece) {
    if (!m || !piece) return -1;
    int32_t tok[2];
    int32_t n = llama_tokenize(m->vocab, piece, (int32_t) strlen(piece), tok, 2, false, true);
    if (n != 1) return -1;
    // Only an exact special piece counts, not an ordinary token that happens to match.
    const char * text = llama_vocab_get_text(m->vocab, tok[0]);
    return (text && strcmp(text, piece) == 0) ? tok[0] : -1;
}

}  // extern "C"
