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

}  // namespace glm4v_detail

namespace {

// Every part of a prompt as one sequence of batch entries, in batches of up to n_batch that cross
// part boundaries: image rows as embeddings; text as token ids, or, in a prompt with an image, as
// embedding rows read from the model file (glm4v_token_rows), since a batch holds one kind of entry.
// Without a readable table (a split model), each part gets its own batches. Positions follow
// transformers Glm4vModel.get_rope_index; the logits are the last entry's.
glm4v_status eval_parts(glm4v_session * s, const glm4v_part * parts, int32_t n_parts, int32_t * pos_out) {
    bool has_image = false;
    for (int32_t i = 0; i < n_parts; ++i) has_image = has_image || parts[i].embd != nullptr;
    const bool text_as_embd = has_image && s->token_rows.ok();
    const bool batch_per_part = has_image && !text_as_embd;
    const int32_t n_embd = llama_model_n_embd_inp(s->model);
    std::vector<float> row(text_as_embd ? (size_t) n_embd : 0);
    struct cell { int32_t next, image_id; };
    std::vector<cell> pending;  // cells of the batch being filled
    pending.reserve((size_t) s->n_batch);
    const char * what = "prompt evaluation";
    auto flush = [&]() {
        glm4v_status st = run_batch(s, what);
        if (st != GLM4V_OK) return st;
        s->timings.n_eval_batches += 1;
        for (const cell & c : pending) record_cells(s, 1, c.next, c.image_id);
        pending.clear();
        llama_batch_ext_clear(s->batch);
        return GLM4V_OK;
    };
    // One entry: an embedding row (data) or a token id; p holds (t, h, w, 0) for M-RoPE.
    auto add = [&](const float * data, int32_t token, const llama_pos (&p)[4], cell c, bool last) {
        const int32_t idx = data ? llama_batch_ext_add_embd(s->batch, 0, llama_embd{data, 1, (size_t) n_embd})
                                 : llama_batch_ext_add_token(s->batch, 0, token);
        if (idx < 0) return fail(s, GLM4V_ERR_INTERNAL, "batch full");
        llama_batch_ext_set_pos(s->batch, idx, p);
        if (pos_out) {
            for (int k = 0; k < 3; ++k) pos_out[k] = p[k];
            pos_out += 3;
        }
        pending.push_back(c);
        if (last) llama_batch_ext_set_output_logits(s->batch, idx, true);
        if (last || (int32_t) pending.size() == s->n_batch) return flush();
        return GLM4V_OK;
    };
    int32_t pos = s->next_pos;  // position of the next text token, or the start of the next image
    bool batch_embd = false;    // kind of the entries in the batch being filled
    llama_batch_ext_clear(s->batch);
    for (int32_t i = 0; i < n_parts; ++i) {
        const glm4v_part & part = parts[i];
        const bool last_part = i == n_parts - 1;
        const bool embd = part.embd || text_as_embd;
        if (!pending.empty() && (batch_per_part || embd != batch_embd)) {
            glm4v_status st = flush();
            if (st != GLM4V_OK) return st;
        }
        batch_embd = embd;
        glm4v_status st = GLM4V_OK;
        if (part.embd) {
            what = "image evaluation";
            const int32_t n = part.rows * part.cols;
            const int32_t image_id = ++s->n_images_seen;
            // Merged-grid token (r, c) sits at (t, h, w) = (pos, pos + r, pos + c) and the image moves the
            // next position by max(rows, cols).
            const int32_t next = s->use_mrope ? pos + std::max(part.rows, part.cols) : pos + n;
            for (int32_t j = 0; j < n && st == GLM4V_OK; ++j) {
                llama_pos p[4] = {pos, pos + j / part.cols, pos + j % part.cols, 0};
                if (!s->use_mrope) p[0] = p[1] = p[2] = p[3] = pos + j;
                st = add(part.embd + (size_t) j * n_embd, 0, p, {next, image_id}, last_part && j == n - 1);
            }
            pos = next;
        } else {
            what = "prompt evaluation";
            for (int32_t j = 0; j < part.n_tokens && st == GLM4V_OK; ++j, ++pos) {
                const int32_t t = part.tokens[j];
                if (text_as_embd && !s->token_rows.read(t, row.data())) {
                    return fail(s, GLM4V_ERR_INTERNAL, fmt("could not read the embedding of token %d from the model file", t));
                }
                // Text advances one position per token: (p, p, p, 0), as the engine expands a token's position.
                const llama_pos p[4] = {pos, pos, pos, s->use_mrope ? 0 : pos};
                st = add(text_as_embd ? row.data() : nullptr, t, p, {pos + 1, 0}, last_part && j == part.n_tokens - 1);
            }
        }
        if (st != GLM4V_OK) return st;
    }
    return GLM4V_OK;
}

}  // namespace

namespace glm4v_detail {

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

}  // namespace glm4v_detail

extern "C" {

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
        const double t1 = now_ms();
        rc = mtmd_encode_chunk(s->mctx, chunk);
        const double t2 = now_ms();
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
        s->timings.t_preprocess_ms = t1 - t0;
        s->timings.t_encode_ms = t2 - t1;
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
                glm4v_status st = check_token_ids(s, p.tokens, p.n_tokens);
                if (st != GLM4V_OK) return st;
                total += p.n_tokens;
            }
        }
        if (total == 0) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "the prompt is empty");
        if (!parts[n_parts - 1].embd && parts[n_parts - 1].n_tokens == 0) {
            // The logits returned are the last part's.
            return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "the last prompt part is empty");
        }
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
        s->timings.n_eval_batches = 0;
        const int32_t start_cells = (int32_t) have;
        glm4v_status st = eval_parts(s, parts, n_parts, positions_out);
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

}  // extern "C"
