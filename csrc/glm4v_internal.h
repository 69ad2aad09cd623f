// Internal declarations shared by the C API's translation units (not part of the API).
#pragma once

#include "glm4v.h"

#include "llama.h"
#include "mtmd.h"

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---------------------------------------------------------------------------------------
// handles
// ---------------------------------------------------------------------------------------

struct glm4v_image {
    int32_t n_tokens = 0;
    int32_t n_embd = 0;
    int32_t rows = 0;
    int32_t cols = 0;
    double t_preprocess_ms = 0.0;
    double t_encode_ms = 0.0;
    std::vector<float> data;
};

// Rows of the text model's token embedding table, read from its GGUF file. A prompt with an
// image is evaluated as one embedding sequence (text rows from here, image rows from the
// projector) so the engine's batches span part boundaries: one image between two short
// texts is otherwise four ubatches, two of them small and slow. Unavailable (ok() false)
// when the table is not in the main file (split models) or its type has no row converter;
// evaluation then goes part by part (eval_parts in glm4v_eval.cpp). Read only by the thread
// that runs engine steps (the model's engine thread), so it needs no lock of its own.
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

// One entry of an engine batch: an embedding row (embd), a token id, or a token id whose
// embedding row the engine thread reads from the model file (as_row); pos is (t, h, w, 0).
struct glm4v_entry {
    const float * embd = nullptr;
    int32_t token = -1;
    bool as_row = false;
    llama_pos pos[4] = {0, 0, 0, 0};
};

// What one context hands the scheduler: entries of its sequence for the next engine step.
// The logits of the last entry are copied into the context's own buffer.
struct glm4v_gen_call;

struct glm4v_request {
    glm4v_ctx * ctx = nullptr;
    std::vector<glm4v_entry> entries;
    bool embd = false;        // kind of every entry: embedding rows (embd or as_row) or token ids
    bool taken = false;       // the engine thread has put it into a step
    bool done = false;
    int32_t rc = 0;           // llama_process's return value for the step
    std::string error;        // the engine's ERROR log lines of the step
    glm4v_gen_call * gen = nullptr;  // the generation call this is the decode of (engine-run calls)
};

// One glm4v_gen_step call: what it may still produce and what it has produced. With the engine
// thread running, the call is handed to it whole: each step decodes the last sampled token of
// every such call, and the engine samples the next one and checks the stop conditions itself, so
// contexts generating together advance in back-to-back steps (as llama-server's slots do in its
// one loop) and their callers wake only when their call is complete.
//
// A decode-ahead call (glm4v_gen_ahead, `detached`) outlives the glm4v_gen_step that started it:
// the engine hands each emitted token to `ready` (with the context's cells after its sampling)
// and goes on decoding while the caller streams, until `ahead` tokens wait there, the generation
// ends, or the caller abandons it. The caller takes tokens out of `ready` and hands the call
// back to the engine whenever it stopped short of the end.
struct glm4v_ahead_token {
    int32_t token = -1;
    std::string text;
    int32_t cells = 0;        // the context's cells and next position once it was sampled
    int32_t next_pos = 0;
};

struct glm4v_gen_call {
    glm4v_ctx * ctx = nullptr;
    int32_t max_steps = 0;    // tokens this call may sample
    int32_t tokens_cap = 0;
    int32_t text_cap = 0;
    int32_t * tokens_out = nullptr;
    int32_t n_tokens = 0;     // tokens emitted into tokens_out
    int32_t steps = 0;        // tokens sampled
    int32_t stop_token = -1;
    glm4v_request req;        // the decode of the pending token, for the next step
    bool done = false;        // not in the engine's list: finished, or (decode-ahead) not handed over (sched.mu)
    glm4v_status status = GLM4V_OK;  // a failure of its step (recorded on ctx)

    // Decode-ahead calls only. Under sched.mu: abandon, ready. The engine's own (while not done):
    // stage_token and stage_text, what gen_sample emits before it is handed to ready.
    bool detached = false;
    bool abandon = false;     // the caller closes the generation: end the call at the next step
    int32_t ahead = 0;        // tokens ready for the caller at most
    int32_t stage_token = -1;
    std::string stage_text;
    std::deque<glm4v_ahead_token> ready;
    double out_ms = 0.0;      // when the caller last took tokens (now_ms(); the caller's)
};

// A decode-ahead generation hands its tokens out at most this often (all that are ready each time):
// 25 chunks a second read as a smooth stream, and the caller's per-chunk work (Python, a server's
// event loop) no longer runs once per token on the cores the engine computes on.
constexpr double GLM4V_AHEAD_CHUNK_MS = 40.0;

// Shared engine steps (continuous batching, as llama-server's slots share llama_decode):
// every context queues its request; the model's engine thread runs the next step, which
// takes the oldest request and every other queued one of the same kind that fits in
// n_batch, so the weights are read once for all of them. Before a step, it waits briefly
// for contexts that are in a call but have not queued yet (they are sampling their next
// token), so generating contexts advance together instead of taking turns.
struct glm4v_scheduler {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<glm4v_request *> queue;
    bool stop = false;        // the engine thread should end
    int32_t n_working = 0;    // contexts inside a call that have no request queued
    int32_t n_generating = 0; // contexts with an open generation that are outside any call
    double step_ms = 1.0;     // running average of an engine step, for the waits above
    int64_t n_steps = 0;      // engine steps run, and the requests they served
    int64_t n_served = 0;
    std::vector<glm4v_request *> step;  // the requests of the running step (abort callback)
    // Other engine work to run on the engine thread, between steps (image encodes): one thread,
    // one OpenMP team, never two computations contending for the cores.
    std::deque<std::function<void()> *> tasks;
    std::vector<glm4v_gen_call *> gens;  // generation calls the engine thread runs
};

namespace glm4v_detail {
void stop_engine(glm4v_model * m);
}

// Where a model's layers and projector go (glm4v_rpc.cpp): the devices of its RPC servers,
// in the order given, then local GPUs; NULL-terminated for llama_model_params.devices.
struct glm4v_rpc_placement {
    std::vector<std::string> endpoints;
    std::vector<uint64_t> failures;           // of each endpoint before the load
    uint64_t (*failure_count)(const char * endpoint, char * msg, size_t cap) = nullptr;  // NULL without patch 0006
    std::vector<ggml_backend_dev_t> devices;  // empty: no RPC servers (the engine's default)
    std::vector<float> split;                 // llama_max_devices() entries (the engine copies that many); empty = none
    ggml_backend_dev_t mmproj_device = nullptr;
};

namespace glm4v_detail {
bool rpc_place(const glm4v_load_params * params, glm4v_rpc_placement & out, std::string & err);
// True when one of m's RPC servers failed since the load (sticky); rpc_message says which and how.
bool rpc_check(glm4v_model * m);
std::string rpc_message(glm4v_model * m);
// "<what> failed: <rpc_message>; the model's state on its servers is lost: ..." for a failed call.
std::string rpc_call_error(glm4v_model * m, const std::string & what);
}

struct glm4v_model {
    llama_model * model = nullptr;
    llama_context * lctx = nullptr;
    mtmd_context * mctx = nullptr;
    const llama_vocab * vocab = nullptr;
    llama_batch_ext * batch = nullptr;  // used by the engine thread only
    int32_t n_batch = 512;
    int32_t n_ctx_seq = 0;
    int32_t n_parallel = 1;
    int32_t n_vocab = 0;
    int32_t n_embd = 0;
    glm4v_token_rows token_rows;
    std::vector<float> row_buf;         // the engine thread's scratch for as_row entries
    bool use_mrope = false;
    double t_load_ms = 0.0;

    std::mutex encode_mu;               // the projector is not thread-safe
    // With encode_mu held: the running encode's cancel flag (glm4v_encode_image), nodes seen by
    // encode_check, and whether it stopped the graph part-way.
    const int32_t * encode_cancel = nullptr;
    uint32_t encode_nodes = 0;
    bool encode_stopped = false;
    std::mutex seq_mu;
    std::vector<bool> seq_used;
    glm4v_scheduler sched;
    std::thread engine;                 // runs every engine step (glm4v_sched.cpp); none when n_parallel = 1
    std::atomic<glm4v_ctx *> inline_ctx{nullptr};  // the caller running a step itself (n_parallel = 1)

    // RPC servers holding layers or the projector (glm4v_rpc.cpp): their failure counts at load,
    // and whether one has failed since (then every call fails: the engine's state is lost).
    std::vector<std::string> rpc_endpoints;
    std::vector<uint64_t> rpc_seen;
    uint64_t (*rpc_failures)(const char * endpoint, char * msg, size_t cap) = nullptr;  // patch 0006's proc
    std::atomic<bool> rpc_lost{false};
    std::mutex rpc_mu;
    std::string rpc_lost_msg;

    ~glm4v_model() {
        glm4v_detail::stop_engine(this);
        if (batch) llama_batch_ext_free(batch);
        if (mctx) mtmd_free(mctx);
        if (lctx) llama_free(lctx);
        if (model) llama_model_free(model);
    }
};

struct glm4v_ctx {
    glm4v_model * m = nullptr;
    int32_t seq = 0;

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
    std::vector<float> logits;        // of the last evaluated cell, copied out of the shared step

    // generation state
    llama_sampler * smpl = nullptr;
    std::vector<llama_token_data> candidates;
    std::vector<int32_t> stop_tokens;
    int32_t max_tokens = 0;
    int32_t n_generated = 0;
    int32_t pending_token = -1;  // sampled and emitted, not yet decoded
    std::string pending_text;    // bytes not yet returned (incomplete UTF-8 or no room)
    int32_t finish = GLM4V_FINISH_NONE;
    bool gen_active = false;     // counted in sched.n_generating while outside a call (not with `ahead`)
    int32_t ahead_n = 0;         // glm4v_gen_ahead's depth for the open generation (0: none)
    // The open generation's decode-ahead call (engine thread running), and the cells and next
    // position that go with the tokens handed out so far (what glm4v_n_cells reports meanwhile).
    std::unique_ptr<glm4v_gen_call> ahead;
    int32_t vis_cells = 0;
    int32_t vis_next_pos = 0;

    glm4v_timings timings{};

    ~glm4v_ctx() {
        if (smpl) llama_sampler_free(smpl);
    }
};

// Vision graph nodes between an encode's cancel checks: GLM-4.xV's tower has ~25 per layer; each
// check computes the graph up to it as one piece (a thread-pool start, microseconds).
constexpr uint32_t GLM4V_ENCODE_CHECK_NODES = 16;

namespace glm4v_detail {

// Record msg (with the engine's ERROR log lines of the current call appended) as the last
// error of c, or of this thread when c is NULL; returns st.
glm4v_status fail(glm4v_ctx * c, glm4v_status st, const std::string & msg);
// Start of every API call: forget engine errors of earlier calls.
void begin_api_call(glm4v_ctx * c);
// The engine's ERROR log lines seen by this thread since begin_api_call.
std::string engine_errors();
// " (engine: line; line)" for engine log lines, "" when there are none (what fail() appends).
std::string engine_detail_suffix(const std::string & errors);
// Initialise the backend and route engine logs through our callback (once per process).
void install_log_once();
std::string fmt(const char * f, ...);
double now_ms();
// GLM4V_ERR_INVALID_ARGUMENT (recorded on c, or the thread) if a token id is outside the vocabulary.
glm4v_status check_token_ids(const glm4v_model * m, glm4v_ctx * c, const int32_t * tokens, int32_t n);
// Length of the longest prefix of s that does not end inside a UTF-8 sequence.
size_t utf8_complete_prefix(const std::string & s);

// glm4v_sched.cpp: a call on c runs between enter_call and leave_call (the scheduler counts
// it as working); run_step queues req, takes part in steps until it is done, and turns its
// outcome into a status (recorded on c) with `what` naming the work.
void enter_call(glm4v_ctx * c);
void leave_call(glm4v_ctx * c);
glm4v_status run_step(glm4v_ctx * c, glm4v_request & req, const char * what);
// The status (recorded on c) of a request's step, which ended with req.rc.
glm4v_status step_status(glm4v_ctx * c, const glm4v_request & req, const char * what);
// Hand g to the engine thread and wait until it is complete (the engine must be running).
glm4v_status run_generation(glm4v_gen_call & g);
bool engine_running(const glm4v_model * m);
// Decode-ahead (c->ahead): hand the call to the engine if it stopped short of the end, wait until
// a token is ready or the call has ended, and take up to max tokens: their ids to ids_out (the
// first cap of them), their text onto c->pending_text. *ended: the call is over and every token
// was taken (c->finish is then the caller's to read). Returns the call's failure, if any.
glm4v_status ahead_step(glm4v_ctx * c, int32_t max, int32_t * ids_out, int32_t cap, int32_t * n_ids, bool * ended);
// End c's decode-ahead call (abandoned if the engine still runs it) and drop the cells decoded
// for tokens never handed out: the context is left as if it had generated no further.
void end_ahead(glm4v_ctx * c);

// glm4v_generate.cpp: the pieces of one generation call, shared by the caller's loop and the
// engine thread's. gen_wants_more: the call may sample another token. gen_prepare_decode: put
// the pending token into g.req (false when there is none, or the context is full: then finish
// is set). gen_decoded: account for its decode (step_ms). gen_sample: sample, emit, check stops.
bool gen_wants_more(const glm4v_gen_call & g);
bool gen_prepare_decode(glm4v_gen_call & g);
void gen_decoded(glm4v_gen_call & g, double step_ms);
glm4v_status gen_sample(glm4v_gen_call & g);
// Open or close c's generation in the scheduler's count of generating contexts.
void set_gen_active(glm4v_ctx * c, bool active);
void model_steps(glm4v_model * m, int64_t * steps, int64_t * requests);
// The model's engine thread (started once its context exists; stopped before it is freed).
void start_engine(glm4v_model * m);
// Run fn on the model's engine thread between steps and wait for it (inline when there is none).
void run_on_engine(glm4v_model * m, const std::function<void()> & fn);
void stop_engine(glm4v_model * m);
// The engine's abort callback: stop a step only when every context in it is cancelled.
bool step_abort(void * model);

// glm4v_eval.cpp
// The projector's eval callback (ggml_backend_sched_eval_callback, user data the model): a check
// point every GLM4V_ENCODE_CHECK_NODES graph nodes where a cancelled encode stops.
bool encode_check(ggml_tensor * t, bool ask, void * user_data);
void record_cells(glm4v_ctx * c, int32_t n, int32_t next, int32_t image_id);
void reset_generation(glm4v_ctx * c);
glm4v_status truncate_cells(glm4v_ctx * c, int32_t n);
// Remove from the engine's memory every cell of c's sequence past the recorded ones (what a
// failed or aborted step may have left).
void drop_unrecorded(glm4v_ctx * c);

}  // namespace glm4v_detail

// Calls on a context: RAII for enter_call / leave_call.
struct glm4v_call_scope {
    glm4v_ctx * c;
    explicit glm4v_call_scope(glm4v_ctx * ctx) : c(ctx) { glm4v_detail::enter_call(c); }
    ~glm4v_call_scope() { glm4v_detail::leave_call(c); }
};

// Closes a try block of an exported function: exceptions never cross the C boundary.
#define GLM4V_GUARD(c)                                                                      \
    catch (const std::bad_alloc &) {                                                        \
        return glm4v_detail::fail((c), GLM4V_ERR_INTERNAL, "out of memory");                              \
    }                                                                                       \
    catch (const std::exception & e) {                                                      \
        return glm4v_detail::fail((c), GLM4V_ERR_INTERNAL, std::string("internal error: ") + e.what());    \
    }                                                                                       \
    catch (...) {                                                                           \
        return glm4v_detail::fail((c), GLM4V_ERR_INTERNAL, "internal error");                             \
    }
