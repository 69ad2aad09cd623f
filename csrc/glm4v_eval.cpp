// glm4v-mtmd C API: image encoding, KV-cache bookkeeping and prompt evaluation with GLM4V's
// 3-D M-RoPE positions (transformers Glm4vModel.get_rope_index).

#include "glm4v_internal.h"

#include <algorithm>
#include <cstring>

using namespace glm4v_detail;

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

}  // extern "C"
