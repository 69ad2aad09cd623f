// glm4v-mtmd C API: image encoding, KV-cache bookkeeping and prompt evaluation with GLM4V's
// 3-D M-RoPE positions (transformers Glm4vModel.get_rope_index).

#include "glm4v_internal.h"

#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cstring>

using namespace glm4v_detail;

namespace {

bool file_seek(std::FILE * f, int64_t off) {
#if defined(_WIN32)
    return _fseeki64(f, off, SEEK_SET) == 0;
#else
    return fseeko(f, (off_t) off, SEEK_SET) == 0;
#endif
}

}  // namespace

void glm4v_token_rows::open(const char * model_path, int32_t n_embd_model, int32_t n_vocab) {
    gguf_init_params gp = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    gguf_context * g = gguf_init_from_file(model_path, gp);
    if (!g) return;
    const int64_t id = gguf_find_tensor(g, "token_embd.weight");
    if (id >= 0) {
        const ggml_type t = gguf_get_tensor_type(g, id);
        const size_t row = ggml_row_size(t, n_embd_model);
        const size_t size = gguf_get_tensor_size(g, id);
        const bool convertible = t == GGML_TYPE_F32 || ggml_get_type_traits(t)->to_float != nullptr;
        if (convertible && n_embd_model % ggml_blck_size(t) == 0 && row > 0 && size % row == 0 &&
            (int64_t) (size / row) >= n_vocab) {
            type = (int32_t) t;
            row_bytes = row;
            n_rows = (int64_t) (size / row);
            offset = (int64_t) (gguf_get_data_offset(g) + gguf_get_tensor_offset(g, id));
            n_embd = n_embd_model;
            file = std::fopen(model_path, "rb");
        }
    }
    gguf_free(g);
}

bool glm4v_token_rows::read(int32_t token, float * out) {
    if (!file || token < 0 || token >= n_rows) return false;
    scratch.resize(row_bytes);
    if (!file_seek(file, offset + (int64_t) token * (int64_t) row_bytes) ||
        std::fread(scratch.data(), 1, row_bytes, file) != row_bytes) {
        return false;
    }
    if (type == GGML_TYPE_F32) {
        memcpy(out, scratch.data(), row_bytes);
    } else {
        ggml_get_type_traits((ggml_type) type)->to_float(scratch.data(), out, n_embd);
    }
    return true;
}

namespace glm4v_detail {

void record_cells(glm4v_ctx * c, int32_t n, int32_t next, int32_t image_id) {
    c->cell_next.insert(c->cell_next.end(), (size_t) n, next);
    c->cell_image.insert(c->cell_image.end(), (size_t) n, image_id);
    c->next_pos = next;
}

void drop_unrecorded(glm4v_ctx * c) {
    // Every cell past the recorded ones has a temporal position >= next_pos.
    llama_memory_seq_rm(llama_get_memory(c->m->lctx), c->seq, c->next_pos, -1);
}

}  // namespace glm4v_detail

namespace {

// Every part of a prompt as one sequence of batch entries, in batches of up to `chunk` that cross
// part boundaries: image rows as embeddings; text as token ids, or, in a prompt with an image, as
// embedding rows read from the model file (glm4v_token_rows), since a batch holds one kind of entry.
// Without a readable table (a split model), each part gets its own batches. Positions follow
// transformers Glm4vModel.get_rope_index; the logits are the last entry's. Each batch is one
// request to the scheduler (glm4v_sched.cpp), which may run it together with other contexts' work.
glm4v_status eval_parts(glm4v_ctx * c, const glm4v_part * parts, int32_t n_parts, int32_t * pos_out) {
    glm4v_model * m = c->m;
    bool has_image = false;
    for (int32_t i = 0; i < n_parts; ++i) has_image = has_image || parts[i].embd != nullptr;
    const bool text_as_embd = has_image && m->token_rows.ok();
    const bool batch_per_part = has_image && !text_as_embd;
    const int32_t n_embd = m->n_embd;
    // Leave room in the engine batch for one token of every other context.
    const int32_t chunk = std::max(1, m->n_batch - (m->n_parallel - 1));
    struct cell { int32_t next, image_id; };
    std::vector<cell> pending;  // cells of the batch being filled
    pending.reserve((size_t) chunk);
    glm4v_request req;
    req.entries.reserve((size_t) chunk);
    const char * what = "prompt evaluation";
    auto flush = [&]() {
        glm4v_status st = run_step(c, req, what);
        if (st != GLM4V_OK) return st;
        c->timings.n_eval_batches += 1;
        for (const cell & x : pending) record_cells(c, 1, x.next, x.image_id);
        pending.clear();
        req.entries.clear();
        return GLM4V_OK;
    };
    // One entry; p holds (t, h, w, 0) for M-RoPE.
    auto add = [&](const glm4v_entry & e, cell x, bool last) {
        if (pos_out) {
            for (int k = 0; k < 3; ++k) pos_out[k] = e.pos[k];
            pos_out += 3;
        }
        req.entries.push_back(e);
        pending.push_back(x);
        if (last || (int32_t) pending.size() == chunk) return flush();
        return GLM4V_OK;
    };
    int32_t pos = c->next_pos;  // position of the next text token, or the start of the next image
    for (int32_t i = 0; i < n_parts; ++i) {
        const glm4v_part & part = parts[i];
        const bool last_part = i == n_parts - 1;
        const bool embd = part.embd || text_as_embd;
        if (!pending.empty() && (batch_per_part || embd != req.embd)) {
            glm4v_status st = flush();
            if (st != GLM4V_OK) return st;
        }
        req.embd = embd;
        glm4v_status st = GLM4V_OK;
        if (part.embd) {
            what = "image evaluation";
            const int32_t n = part.rows * part.cols;
            const int32_t image_id = ++c->n_images_seen;
            // Merged-grid token (r, c) sits at (t, h, w) = (pos, pos + r, pos + c) and the image moves the
            // next position by max(rows, cols).
            const int32_t next = m->use_mrope ? pos + std::max(part.rows, part.cols) : pos + n;
            for (int32_t j = 0; j < n && st == GLM4V_OK; ++j) {
                glm4v_entry e;
                e.embd = part.embd + (size_t) j * n_embd;
                e.pos[0] = pos;
                e.pos[1] = pos + j / part.cols;
                e.pos[2] = pos + j % part.cols;
                if (!m->use_mrope) e.pos[0] = e.pos[1] = e.pos[2] = e.pos[3] = pos + j;
                st = add(e, {next, image_id}, last_part && j == n - 1);
            }
            pos = next;
        } else {
            what = "prompt evaluation";
            for (int32_t j = 0; j < part.n_tokens && st == GLM4V_OK; ++j, ++pos) {
                glm4v_entry e;
                e.token = part.tokens[j];
                e.as_row = text_as_embd;
                // Text advances one position per token: (p, p, p, 0), as the engine expands a token's position.
                e.pos[0] = e.pos[1] = e.pos[2] = pos;
                e.pos[3] = m->use_mrope ? 0 : pos;
                st = add(e, {pos + 1, 0}, last_part && j == part.n_tokens - 1);
            }
        }
        if (st != GLM4V_OK) return st;
    }
    return GLM4V_OK;
}

}  // namespace

namespace glm4v_detail {

void reset_generation(glm4v_ctx * c) {
    end_ahead(c);
    c->ahead_n = 0;
    if (c->smpl) {
        llama_sampler_free(c->smpl);
        c->smpl = nullptr;
    }
    set_gen_active(c, false);
    c->pending_token = -1;
    c->pending_text.clear();
    c->finish = GLM4V_FINISH_NONE;
    c->n_generated = 0;
}

// Keep exactly the first n cells of c's sequence.
glm4v_status truncate_cells(glm4v_ctx * c, int32_t n) {
    const int32_t have = (int32_t) c->cell_next.size();
    if (n < 0 || n > have) {
        return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("cannot keep %d cells: the cache holds %d", n, have));
    }
    if (n == have) return GLM4V_OK;
    // Cells of one image share their temporal position, so a cut inside one is refused.
    if (n > 0 && c->cell_image[(size_t) n] != 0 && c->cell_image[(size_t) n] == c->cell_image[(size_t) n - 1]) {
        return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("cannot keep %d cells: that cuts through an image", n));
    }
    // Every later cell has a temporal position >= the position that followed cell n-1.
    const int32_t p0 = n == 0 ? 0 : c->cell_next[(size_t) n - 1];
    if (!llama_memory_seq_rm(llama_get_memory(c->m->lctx), c->seq, p0, -1)) {
        return fail(c, GLM4V_ERR_INTERNAL, fmt("could not remove KV cells from position %d", p0));
    }
    c->cell_next.resize((size_t) n);
    c->cell_image.resize((size_t) n);
    c->next_pos = p0;
    c->have_logits = false;
    return GLM4V_OK;
}

// The projector's eval callback: a check point every GLM4V_ENCODE_CHECK_NODES nodes of the vision
// graph (ggml's scheduler computes up to each asked-for node, then calls back), where the encode
// stops if its caller's cancel flag is set. Runs on the thread that encodes, under encode_mu.
bool encode_check(ggml_tensor * /*t*/, bool ask, void * user_data) {
    glm4v_model * m = static_cast<glm4v_model *>(user_data);
    if (ask) return ++m->encode_nodes % GLM4V_ENCODE_CHECK_NODES == 0;
    if (m->encode_cancel && __atomic_load_n(m->encode_cancel, __ATOMIC_ACQUIRE)) {
        m->encode_stopped = true;
        return false;
    }
    return true;
}

}  // namespace glm4v_detail

extern "C" {

// ---------------------------------------------------------------------------------------
// images
// ---------------------------------------------------------------------------------------

// One image (rgb1 == nullptr) or one video frame pair (rgb0 the earlier frame): the engine's
// preprocessing, then the vision tower + projector on the model's engine thread. A pair is two
// mergeable bitmaps behind adjacent markers, which mtmd turns into one 2-entry batch (patch 0005).
static glm4v_status encode_frames(glm4v_model * m, const uint8_t * rgb0, const uint8_t * rgb1, int32_t width,
                                  int32_t height, const int32_t * cancel, glm4v_image ** out) {
    if (!m || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(nullptr);
    glm4v_ctx * const s = nullptr;  // errors of model calls are the thread's
    *out = nullptr;
    const bool pair = rgb1 != nullptr;
    const char * what = pair ? "frame pair" : "image";
    if (!m->mctx) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no projector (mmproj) is loaded: images are unavailable");
    if (!rgb0 || width <= 0 || height <= 0) {
        return fail(s, GLM4V_ERR_IMAGE, fmt("invalid %s size %dx%d", what, width, height));
    }
    if (pair && (width % 28 != 0 || height % 28 != 0)) {
        return fail(s, GLM4V_ERR_IMAGE, fmt("a frame pair must be resized to multiples of 28, not %dx%d", width, height));
    }
    // The projector's context holds one image's state at a time.
    std::lock_guard<std::mutex> encode_lock(m->encode_mu);
    mtmd_bitmap * bmps[2] = {nullptr, nullptr};
    mtmd_input_chunks * chunks = nullptr;
    glm4v_image * img = nullptr;
    auto cleanup = [&] {
        for (auto * b : bmps) if (b) mtmd_bitmap_free(b);
        if (chunks) mtmd_input_chunks_free(chunks);
    };
    try {
        const double t0 = now_ms();
        const size_t n_bmps = pair ? 2 : 1;
        bmps[0] = mtmd_bitmap_init((uint32_t) width, (uint32_t) height, rgb0);
        if (pair) {
            bmps[1] = mtmd_bitmap_init((uint32_t) width, (uint32_t) height, rgb1);
            mtmd_bitmap_set_mergeable(bmps[0], true);
            mtmd_bitmap_set_mergeable(bmps[1], true);
        }
        chunks = mtmd_input_chunks_init();
        std::string text = mtmd_default_marker();
        if (pair) text += mtmd_default_marker();  // adjacent markers: the two bitmaps merge
        mtmd_input_text txt = {text.c_str(), text.size(), false, true};
        int32_t rc = mtmd_tokenize(m->mctx, chunks, &txt, const_cast<const mtmd_bitmap **>(bmps), n_bmps);
        if (rc != 0) {
            cleanup();
            return fail(s, GLM4V_ERR_IMAGE, fmt("the engine could not preprocess a %dx%d %s (code %d)", width, height,
                                                what, rc));
        }
        const mtmd_input_chunk * chunk = nullptr;
        int n_image_chunks = 0;
        for (size_t i = 0; i < mtmd_input_chunks_size(chunks); ++i) {
            const mtmd_input_chunk * c = mtmd_input_chunks_get(chunks, i);
            if (mtmd_input_chunk_get_type(c) == MTMD_INPUT_CHUNK_TYPE_IMAGE) {
                chunk = c;
                ++n_image_chunks;
            }
        }
        if (!chunk || n_image_chunks != 1) {
            cleanup();
            return fail(s, GLM4V_ERR_INTERNAL, pair ? "the engine did not pair the two frames (is patch 0005 applied?)"
                                                    : "the engine produced no image chunk");
        }
        const mtmd_image_tokens * it = mtmd_input_chunk_get_tokens_image(chunk);
        const int32_t n_tokens = (int32_t) mtmd_image_tokens_get_n_tokens(it);
        if (pair && n_tokens != (width / 28) * (height / 28)) {
            // The engine resized the frames to its per-image token window: not what the processor does.
            cleanup();
            return fail(s, GLM4V_ERR_IMAGE, fmt("a %dx%d frame pair is %d tokens, outside the projector's window "
                                                "(image_max_tokens): the engine would resize it (got %d tokens)",
                                                width, height, (width / 28) * (height / 28), n_tokens));
        }
        const mtmd_decoder_pos last = mtmd_image_tokens_get_decoder_pos(it, 0, (size_t) n_tokens - 1);
        // On the engine thread, between decode steps of the model's other contexts.
        const double t_pre = now_ms();
        double t1 = 0.0, t2 = 0.0;
        run_on_engine(m, [&] {
            t1 = now_ms();
            m->encode_cancel = cancel;  // read by encode_check (the projector's eval callback) on this thread
            m->encode_stopped = false;
            rc = mtmd_encode_chunk(m->mctx, chunk);
            m->encode_cancel = nullptr;
            t2 = now_ms();
        });
        if (rpc_check(m)) {
            cleanup();
            return fail(s, GLM4V_ERR_RPC, rpc_call_error(m, fmt("%s encoding", what)));
        }
        if (m->encode_stopped) {  // the graph stopped part-way: the output is incomplete
            cleanup();
            return fail(s, GLM4V_ERR_CANCELLED, fmt("the %s encoding was cancelled", what));
        }
        if (rc != 0) {
            cleanup();
            return fail(s, GLM4V_ERR_IMAGE, fmt("%s encoding failed (code %d)", what, rc));
        }
        const float * embd = mtmd_get_output_embd(m->mctx);
        img = new glm4v_image();
        img->n_tokens = n_tokens;
        img->n_embd = m->n_embd;
        img->cols = (int32_t) last.x + 1;
        img->rows = (int32_t) last.y + 1;
        if (img->rows * img->cols != n_tokens) {
            // Non-grid layouts cannot occur for GLM4V; keep positions well defined anyway.
            img->rows = 1;
            img->cols = n_tokens;
        }
        img->data.assign(embd, embd + (size_t) n_tokens * (size_t) img->n_embd);
        cleanup();
        img->t_preprocess_ms = t_pre - t0;
        img->t_encode_ms = t2 - t1;
        *out = img;
        return GLM4V_OK;
    }
    catch (const std::exception & e) {
        cleanup();
        delete img;
        return fail(s, GLM4V_ERR_INTERNAL, std::string(what) + " encoding failed: " + e.what());
    }
}

glm4v_status glm4v_encode_image(glm4v_model * m, const uint8_t * rgb, int32_t width, int32_t height,
                                const int32_t * cancel, glm4v_image ** out) {
    return encode_frames(m, rgb, nullptr, width, height, cancel, out);
}

glm4v_status glm4v_encode_frame_pair(glm4v_model * m, const uint8_t * rgb0, const uint8_t * rgb1, int32_t width,
                                     int32_t height, const int32_t * cancel, glm4v_image ** out) {
    if (!rgb1) return GLM4V_ERR_INVALID_ARGUMENT;
    return encode_frames(m, rgb0, rgb1, width, height, cancel, out);
}

void glm4v_image_free(glm4v_image * img) { delete img; }
int32_t glm4v_image_n_tokens(const glm4v_image * img) { return img ? img->n_tokens : 0; }
int32_t glm4v_image_n_embd(const glm4v_image * img) { return img ? img->n_embd : 0; }
int32_t glm4v_image_rows(const glm4v_image * img) { return img ? img->rows : 0; }
int32_t glm4v_image_cols(const glm4v_image * img) { return img ? img->cols : 0; }
const float * glm4v_image_data(const glm4v_image * img) { return img ? img->data.data() : nullptr; }
double glm4v_image_preprocess_ms(const glm4v_image * img) { return img ? img->t_preprocess_ms : 0.0; }
double glm4v_image_encode_ms(const glm4v_image * img) { return img ? img->t_encode_ms : 0.0; }

// ---------------------------------------------------------------------------------------
// KV cache and prompt evaluation
// ---------------------------------------------------------------------------------------

// While a decode-ahead generation is open: the cells of the tokens handed out (the engine may hold more).
int32_t glm4v_n_cells(const glm4v_ctx * c) { return !c ? 0 : c->ahead ? c->vis_cells : (int32_t) c->cell_next.size(); }
int32_t glm4v_next_pos(const glm4v_ctx * c) { return !c ? 0 : c->ahead ? c->vis_next_pos : c->next_pos; }

glm4v_status glm4v_kv_truncate(glm4v_ctx * c, int32_t n_cells) {
    if (!c) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(c);
    try {
        glm4v_call_scope scope(c);
        reset_generation(c);
        return truncate_cells(c, n_cells);
    }
    GLM4V_GUARD(c)
}

glm4v_status glm4v_eval(glm4v_ctx * c, const glm4v_part * parts, int32_t n_parts, int32_t * positions_out,
                        int32_t positions_cap) {
    if (!c || (!parts && n_parts > 0) || n_parts < 0) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(c);
    try {
        glm4v_call_scope scope(c);
        glm4v_model * m = c->m;
        reset_generation(c);
        int64_t total = 0;
        for (int32_t i = 0; i < n_parts; ++i) {
            const glm4v_part & p = parts[i];
            if (p.embd && p.tokens) {
                return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d has both tokens and an image", i));
            }
            if (p.embd) {
                if (p.rows <= 0 || p.cols <= 0 || p.rows > 65536 || p.cols > 65536) {
                    return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d: invalid image grid %dx%d", i, p.rows, p.cols));
                }
                if (p.n_embd != m->n_embd) {
                    return fail(c, GLM4V_ERR_INVALID_ARGUMENT,
                                fmt("part %d: image embedding width %d does not match the model's %d", i, p.n_embd, m->n_embd));
                }
                total += (int64_t) p.rows * p.cols;
            } else {
                if (p.n_tokens < 0 || (p.n_tokens > 0 && !p.tokens)) {
                    return fail(c, GLM4V_ERR_INVALID_ARGUMENT, fmt("part %d has an invalid token array", i));
                }
                glm4v_status st = check_token_ids(m, c, p.tokens, p.n_tokens);
                if (st != GLM4V_OK) return st;
                total += p.n_tokens;
            }
        }
        if (total == 0) return fail(c, GLM4V_ERR_INVALID_ARGUMENT, "the prompt is empty");
        if (!parts[n_parts - 1].embd && parts[n_parts - 1].n_tokens == 0) {
            // The logits returned are the last part's.
            return fail(c, GLM4V_ERR_INVALID_ARGUMENT, "the last prompt part is empty");
        }
        const int64_t n_ctx = (int64_t) m->n_ctx_seq;
        const int64_t have = (int64_t) c->cell_next.size();
        if (have + total > n_ctx) {
            return fail(c, GLM4V_ERR_CONTEXT_FULL,
                        fmt("the prompt needs %lld KV cells but only %lld of n_ctx=%lld are free",
                            (long long) total, (long long) (n_ctx - have), (long long) n_ctx));
        }
        if (positions_out && positions_cap < total) {
            return fail(c, GLM4V_ERR_BUFFER_TOO_SMALL, "positions buffer too small");
        }
        if (c->cancel.load()) return fail(c, GLM4V_ERR_CANCELLED, "prompt evaluation cancelled");
        const double t0 = now_ms();
        const int32_t start_cells = (int32_t) have;
        glm4v_status st = eval_parts(c, parts, n_parts, positions_out);
        if (st != GLM4V_OK) {
            // Leave the cache as it was before the call: the failed call changes nothing.
            std::string msg = c->last_error;
            drop_unrecorded(c);
            truncate_cells(c, start_cells);
            c->last_error = msg;
            return st;
        }
        c->have_logits = true;
        c->timings.t_eval_ms += now_ms() - t0;
        c->timings.n_eval += (int32_t) total;
        return GLM4V_OK;
    }
    GLM4V_GUARD(c)
}

glm4v_status glm4v_get_logits(glm4v_ctx * c, float * out, int32_t cap) {
    if (!c || !out) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(c);
    const int32_t n_vocab = c->m->n_vocab;
    if (cap < n_vocab) return fail(c, GLM4V_ERR_BUFFER_TOO_SMALL, "logits buffer too small");
    if (!c->have_logits || (int32_t) c->logits.size() != n_vocab) {
        return fail(c, GLM4V_ERR_INVALID_ARGUMENT, "no logits: evaluate a prompt first");
    }
    memcpy(out, c->logits.data(), sizeof(float) * (size_t) n_vocab);
    return GLM4V_OK;
}

}  // extern "C"
