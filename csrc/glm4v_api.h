/* glm4v-mtmd C API: declarations only.
 *
 * This file is both part of the C header (included by glm4v.h) and the cffi cdef
 * (read by build_ffi.py), so it must stay plain C declarations: no preprocessor
 * directives, no macros, no includes. The build compiles the cffi module in API mode
 * against glm4v.h, so any drift between the two is a compile error.
 *
 * Conventions: every function that can fail returns a glm4v_status; on failure the
 * message is available from glm4v_last_error(ctx) for calls on a glm4v_ctx, and from
 * glm4v_last_global_error() (thread-local) for calls on a glm4v_model or none.
 *
 * Threads: a glm4v_model may be used from several threads at once (its vocabulary calls
 * are read-only, image encodes are serialised on the projector). A glm4v_ctx is used by
 * one thread at a time. Contexts that evaluate or generate at the same time from
 * different threads share the engine: their pending work (one token per generating
 * context, prompt chunks) is combined into one engine batch per step.
 */

typedef enum glm4v_status {
    GLM4V_OK = 0,
    GLM4V_ERR_INVALID_ARGUMENT = 1,
    GLM4V_ERR_LOAD = 2,
    GLM4V_ERR_IMAGE = 3,
    GLM4V_ERR_CONTEXT_FULL = 4,
    GLM4V_ERR_DECODE = 5,
    GLM4V_ERR_CANCELLED = 6,
    GLM4V_ERR_BUFFER_TOO_SMALL = 7,
    GLM4V_ERR_INTERNAL = 8,
    GLM4V_ERR_BUSY = 9,        /* every sequence of the model is in use */
    GLM4V_ERR_RPC = 10         /* an RPC server of the model was lost or stopped answering */
} glm4v_status;

typedef enum glm4v_finish {
    GLM4V_FINISH_NONE = 0,     /* still generating */
    GLM4V_FINISH_STOP = 1,     /* a stop token was sampled */
    GLM4V_FINISH_LENGTH = 2,   /* max_tokens reached */
    GLM4V_FINISH_CONTEXT = 3,  /* the context (n_ctx) is full */
    GLM4V_FINISH_CANCELLED = 4 /* glm4v_cancel() was called */
} glm4v_finish;

/* A loaded model pair (text model, projector, one engine context holding n_parallel KV
 * sequences); shared by threads. A glm4v_ctx is one conversation: one sequence of it. */
typedef struct glm4v_model glm4v_model;
typedef struct glm4v_ctx glm4v_ctx;
typedef struct glm4v_image glm4v_image;

/* Log callback: level is ggml's (1 debug, 2 info, 3 warn, 4 error, 5 continuation). */
typedef void (*glm4v_log_fn)(int level, const char *text, void *user_data);

typedef struct glm4v_load_params {
    int32_t n_ctx;            /* KV cells of each sequence (the engine context holds n_ctx * n_parallel) */
    int32_t n_parallel;       /* sequences (conversations) that can be open at once, 1..256 */
    int32_t n_batch;          /* logical batch size for prompt evaluation */
    int32_t n_ubatch;         /* physical batch size */
    int32_t n_threads;        /* threads for decoding one token */
    int32_t n_threads_batch;  /* threads for prompt and image work */
    int32_t n_gpu_layers;     /* layers offloaded to the GPU; -1 = all */
    int32_t flash_attn;       /* -1 auto, 0 off, 1 on */
    int32_t type_k;           /* ggml_type of the K cache (0 f32, 1 f16, 8 q8_0, 30 bf16 ...) */
    int32_t type_v;           /* ggml_type of the V cache */
    int32_t use_mmap;         /* 0/1 */
    int32_t mmproj_use_gpu;   /* 0/1 */
    int32_t image_min_tokens; /* engine-side limits; <= 0 keeps the engine default */
    int32_t image_max_tokens;
    int32_t warmup;           /* 0/1: run the engine's warm-up passes */
    /* ggml RPC: comma-separated "host:port" servers (NULL or "" = none). Their devices, in
     * this order and then any local GPUs, hold the offloaded layers (n_gpu_layers; -1 = all). */
    const char *rpc_servers;
    /* Share of the offloaded layers per device, in the order above (copied; NULL = by each
     * device's free memory); n_tensor_split entries, at most 16. */
    const float *tensor_split;
    int32_t n_tensor_split;
    /* Where the projector runs: -1 locally (mmproj_use_gpu picks a local GPU or the CPU),
     * k >= 0 on the first device of rpc server k. */
    int32_t mmproj_rpc_server;
    /* 0/1: let the CPU backend keep weights in its repacked / AMX layouts (faster; 1 by default).
     * RPC servers never do, so 0 makes a local run compute what they compute. */
    int32_t cpu_repack;
    /* RPC connections: a server that does not answer a command within this many milliseconds
     * counts as lost (0 = wait forever). The model is then unusable: every call fails with
     * GLM4V_ERR_RPC until it is freed. */
    int32_t rpc_timeout_ms;
} glm4v_load_params;

/* A device the engine can use (see glm4v_device_get). */
typedef struct glm4v_device_info {
    char name[64];
    char description[256];
    int32_t type;             /* 0 CPU, 1 GPU, 2 integrated GPU, 3 accelerator */
    uint64_t memory_free;
    uint64_t memory_total;
} glm4v_device_info;

typedef struct glm4v_model_info {
    int32_t n_vocab;
    int32_t n_embd;           /* text embedding width */
    int32_t n_ctx;            /* KV cells of each sequence, as allocated */
    int32_t n_parallel;       /* sequences of the engine context */
    int32_t n_ctx_train;
    int32_t n_layer;
    int32_t mmproj_n_embd;    /* projector output width */
    int32_t use_mrope;        /* 1 when the text model uses M-RoPE positions */
    int32_t image_token;      /* <|image|> id, -1 when the vocab has none */
    int32_t begin_image_token;
    int32_t end_image_token;
    int64_t n_params;
    uint64_t model_size;      /* bytes of text-model weights */
} glm4v_model_info;

typedef struct glm4v_sampling {
    float temperature;        /* <= 0: greedy */
    int32_t top_k;            /* <= 0: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repeat_penalty;     /* 1: off */
    int32_t repeat_last_n;    /* window of the repetition penalty; -1 = whole context */
    float presence_penalty;
    float frequency_penalty;
    uint32_t seed;
    /* Added to the logits before any other step (OpenAI's logit_bias); -INFINITY bans a token.
     * n_bias pairs; ids must be in the vocabulary. The arrays are copied by glm4v_gen_begin. */
    const int32_t *bias_tokens;
    const float *bias_values;
    int32_t n_bias;
} glm4v_sampling;

/* One prompt piece: text tokens, or the embedding of one image (its begin/end tokens are
 * text parts). An image part has embd = rows*cols rows of n_embd floats, row-major over
 * the merged grid; tokens must then be NULL. */
typedef struct glm4v_part {
    const int32_t *tokens;
    int32_t n_tokens;
    const float *embd;
    int32_t rows;
    int32_t cols;
    int32_t n_embd;
} glm4v_part;

/* What one glm4v_ctx did since its last glm4v_begin_call (the timings of one call). */
typedef struct glm4v_timings {
    double t_eval_ms;         /* glm4v_eval since glm4v_begin_call */
    double t_sample_ms;       /* sampling since glm4v_begin_call */
    double t_decode_ms;       /* decoding since glm4v_begin_call (waits for shared engine steps included) */
    int32_t n_eval;           /* KV cells filled by glm4v_eval since glm4v_begin_call */
    int32_t n_eval_batches;   /* engine batches those cells went in */
    int32_t n_decode;         /* tokens decoded since glm4v_begin_call */
} glm4v_timings;

/* ---- library ---- */
const char *glm4v_engine_version(void);
const char *glm4v_system_info(void);
const char *glm4v_last_global_error(void);
void glm4v_set_log_callback(glm4v_log_fn fn, void *user_data);
glm4v_load_params glm4v_load_params_default(void);
glm4v_sampling glm4v_sampling_default(void);
/* Quantize a GGUF text model with the engine's quantizer; ftype is a name like "q4_k_m". */
glm4v_status glm4v_quantize(const char *src_path, const char *dst_path, const char *ftype, int32_t n_threads);

/* ---- devices and ggml RPC ---- */
/* Devices of this process's engine (RPC servers are never registered here: they are named
 * per model in glm4v_load_params.rpc_servers). */
int32_t glm4v_device_count(void);
glm4v_status glm4v_device_get(int32_t index, glm4v_device_info *out);
/* 1 when the engine was built with the RPC backend (GGML_RPC). */
int32_t glm4v_rpc_available(void);
/* The RPC protocol version of this build; a server must report exactly this one. */
void glm4v_rpc_version(int32_t *major, int32_t *minor, int32_t *patch);
/* Serve this process's devices to RPC clients on endpoint "host:port" (devices_csv: names
 * such as "CPU" or "CUDA0,CPU"; NULL or "" = every GPU, else the CPU). cache_dir (NULL = off)
 * keeps large tensors on disk between loads. Blocks, serving one client at a time, until the
 * server fails (the socket cannot be bound, ...): then GLM4V_ERR_LOAD with the reason. */
glm4v_status glm4v_rpc_serve(const char *endpoint, const char *cache_dir, int32_t n_threads,
                             const char *devices_csv);

/* ---- model (text model + projector + the engine context) ---- */
glm4v_status glm4v_model_load(const char *model_path, const char *mmproj_path,
                              const glm4v_load_params *params, glm4v_model **out);
/* Every glm4v_ctx of m must be freed first. */
void glm4v_model_free(glm4v_model *m);
glm4v_status glm4v_model_get_info(const glm4v_model *m, glm4v_model_info *out);
double glm4v_model_load_ms(const glm4v_model *m);
/* Engine steps run so far and the requests (a context's prompt chunk or token) they served:
 * requests > steps when contexts shared steps. */
void glm4v_model_steps(glm4v_model *m, int64_t *steps, int64_t *requests);
/* Metadata string of the text model; *n_out is the full length (without NUL). */
glm4v_status glm4v_meta_str(const glm4v_model *m, const char *key, char *buf, int32_t cap, int32_t *n_out);

/* ---- vocabulary (thread-safe) ---- */
/* On GLM4V_ERR_BUFFER_TOO_SMALL, *n_out holds the required size. */
glm4v_status glm4v_tokenize(const glm4v_model *m, const char *text, int32_t len, int32_t parse_special,
                            int32_t *out, int32_t cap, int32_t *n_out);
glm4v_status glm4v_detokenize(const glm4v_model *m, const int32_t *tokens, int32_t n, int32_t render_special,
                              char *buf, int32_t cap, int32_t *n_out);
glm4v_status glm4v_token_piece(const glm4v_model *m, int32_t token, int32_t render_special,
                               char *buf, int32_t cap, int32_t *n_out);
int32_t glm4v_token_is_eog(const glm4v_model *m, int32_t token);
/* Token id of a special piece such as "<|image|>", or -1. */
int32_t glm4v_token_id(const glm4v_model *m, const char *piece);

/* ---- images (serialised on the model's projector) ---- */
/* rgb: height*width*3 bytes, row-major. Sides should already be multiples of
 * 2*patch_size (the Python preprocessing does this), so the engine does not resize.
 * cancel: NULL, or a flag another thread may set non-zero: the encode then stops at its next
 * check point (every GLM4V_ENCODE_CHECK_NODES nodes of the vision graph, a layer or less) and
 * returns GLM4V_ERR_CANCELLED. */
glm4v_status glm4v_encode_image(glm4v_model *m, const uint8_t *rgb, int32_t width, int32_t height,
                                const int32_t *cancel, glm4v_image **out);
/* A video frame pair (rgb0 the earlier frame), both width x height, sides multiples of 28:
 * frame 0 through the Conv3d's first temporal kernel, frame 1 through the second (engine patch
 * 0005), as one image's worth of tokens. GLM4V_ERR_IMAGE when the pair is outside the
 * projector's token window (the engine would resize it). */
glm4v_status glm4v_encode_frame_pair(glm4v_model *m, const uint8_t *rgb0, const uint8_t *rgb1, int32_t width,
                                     int32_t height, const int32_t *cancel, glm4v_image **out);
void glm4v_image_free(glm4v_image *img);
int32_t glm4v_image_n_tokens(const glm4v_image *img);
int32_t glm4v_image_n_embd(const glm4v_image *img);
int32_t glm4v_image_rows(const glm4v_image *img);
int32_t glm4v_image_cols(const glm4v_image *img);
const float *glm4v_image_data(const glm4v_image *img);
/* The engine's pixel preprocessing (normalise, patch) and the vision encoder + projector
 * (mtmd_encode_chunk) of this image, in milliseconds. */
double glm4v_image_preprocess_ms(const glm4v_image *img);
double glm4v_image_encode_ms(const glm4v_image *img);

/* ---- contexts: one KV sequence each ---- */
/* Take a free sequence of m; GLM4V_ERR_BUSY when all n_parallel are open. */
glm4v_status glm4v_ctx_open(glm4v_model *m, glm4v_ctx **out);
/* Empty the sequence and give it back to the model. */
void glm4v_ctx_free(glm4v_ctx *c);
const char *glm4v_last_error(const glm4v_ctx *c);
int32_t glm4v_ctx_seq_id(const glm4v_ctx *c);
/* Start of one call (evaluate, generate, ...): clears the cancel flag and the timings. A
 * cancel is only ever cleared here, so one that lands between the calls into C of one call
 * (evaluation, then generation) is kept. */
void glm4v_begin_call(glm4v_ctx *c);
glm4v_status glm4v_get_timings(const glm4v_ctx *c, glm4v_timings *out);
/* Ask the running call on c to stop at its next safe point (thread-safe). */
void glm4v_cancel(glm4v_ctx *c);
/* Interrupt polling (for Ctrl-C): fn(user_data) is called by the thread running a call on c,
 * before every generated token and, at most every interval_ms, while it waits for or computes
 * an engine step; a non-zero return cancels the call as glm4v_cancel() does. fn = NULL turns
 * polling off. Not thread-safe with a running call on c. */
typedef int32_t (*glm4v_poll_fn)(void *user_data);
void glm4v_set_interrupt_poll(glm4v_ctx *c, glm4v_poll_fn fn, void *user_data, int32_t interval_ms);

/* ---- KV cache and prompt evaluation ---- */
/* Cells of c's sequence and its next free position. */
int32_t glm4v_n_cells(const glm4v_ctx *c);
int32_t glm4v_next_pos(const glm4v_ctx *c);
/* Keep the first n_cells cells; n_cells must not split an image. */
glm4v_status glm4v_kv_truncate(glm4v_ctx *c, int32_t n_cells);
/* Append parts to c's sequence. positions_out (may be NULL) receives [n, 3] (t, h, w)
 * for every cell filled, n = sum of part lengths; logits of the last cell are kept.
 * The parts fill shared batches of n_batch cells (less n_parallel - 1, room for the other
 * contexts' tokens) (a prompt with images as embedding rows, text rows read from the model
 * file) unless the model file lacks its token-embedding table (a split model whose first
 * file does not hold it): then every part has its own batches. */
glm4v_status glm4v_eval(glm4v_ctx *c, const glm4v_part *parts, int32_t n_parts,
                        int32_t *positions_out, int32_t positions_cap);
/* Copy the logits of the last evaluated cell (n_vocab floats). */
glm4v_status glm4v_get_logits(glm4v_ctx *c, float *out, int32_t cap);

/* ---- generation: the sample -> decode loop runs in C ---- */
glm4v_status glm4v_gen_begin(glm4v_ctx *c, const glm4v_sampling *sampling,
                             const int32_t *stop_tokens, int32_t n_stop, int32_t max_tokens);
/* Generate up to max_steps tokens. Complete UTF-8 text goes to text_out (render special
 * pieces), sampled ids to tokens_out. *finish says why it stopped (GLM4V_FINISH_NONE:
 * more may follow). A sampled stop token is reported in *stop_token (else -1) and is
 * neither emitted nor decoded. */
glm4v_status glm4v_gen_step(glm4v_ctx *c, int32_t max_steps,
                            char *text_out, int32_t text_cap, int32_t *text_len,
                            int32_t *tokens_out, int32_t tokens_cap, int32_t *n_tokens,
                            int32_t *finish, int32_t *stop_token);
/* Decode ahead while the caller streams: call after glm4v_gen_begin, before the first
 * glm4v_gen_step. With several sequences (the engine thread runs the steps), the engine keeps
 * decoding this generation between glm4v_gen_step calls, up to `ahead` tokens (1..GLM4V_MAX_AHEAD)
 * beyond those handed out, and glm4v_gen_step returns what is ready (up to max_steps): the first
 * token at once, later ones at most every 40 ms unless `ahead` are waiting. No step waits for the caller. With one sequence nothing runs between calls, and
 * glm4v_gen_step returns after each emitted token. Meanwhile glm4v_n_cells and glm4v_next_pos
 * describe the tokens handed out, and a generation closed early (glm4v_gen_end, or any call that
 * starts another) drops the cells decoded for tokens never handed out. */
#define GLM4V_MAX_AHEAD 256
glm4v_status glm4v_gen_ahead(glm4v_ctx *c, int32_t ahead);
/* End a generation early (a stream closed before its last chunk); a no-op when none is open. */
void glm4v_gen_end(glm4v_ctx *c);
