// glm4v-mtmd C API: the sample -> decode loop, run in C so Python only asks for text. With one
// sequence the caller's thread runs it; with several, the engine thread runs each call whole
// (glm4v_sched.cpp), so contexts generating at once share engine steps back to back; sampling
// reads the context's own copy of its logits.

#include "glm4v_internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

using namespace glm4v_detail;

namespace glm4v_detail {

bool gen_wants_more(const glm4v_gen_call & g) {
    const glm4v_ctx * s = g.ctx;
    if (s->finish != GLM4V_FINISH_NONE) return false;
    if (g.detached) return !g.abandon && (int32_t) g.ready.size() < g.ahead;  // sched.mu held
    return g.steps < g.max_steps && g.n_tokens < g.tokens_cap && (int32_t) s->pending_text.size() < g.text_cap / 2;
}

bool gen_prepare_decode(glm4v_gen_call & g) {
    glm4v_ctx * s = g.ctx;
    if (s->pending_token < 0) return false;
    if ((int32_t) s->cell_next.size() >= s->m->n_ctx_seq) {
        s->finish = GLM4V_FINISH_CONTEXT;
        return false;
    }
    glm4v_entry & e = g.req.entries[0];
    e.token = s->pending_token;
    e.pos[0] = e.pos[1] = e.pos[2] = s->next_pos;
    e.pos[3] = s->m->use_mrope ? 0 : s->next_pos;
    return true;
}

void gen_decoded(glm4v_gen_call & g, double step_ms) {
    glm4v_ctx * s = g.ctx;
    record_cells(s, 1, s->next_pos + 1, 0);
    s->pending_token = -1;
    s->timings.t_decode_ms += step_ms;
    s->timings.n_decode += 1;
}

glm4v_status gen_sample(glm4v_gen_call & g) {
    glm4v_ctx * s = g.ctx;
    glm4v_model * m = s->m;
    const double t1 = now_ms();
    // llama_sampler_sample's CPU path, on this context's copy of its logits.
    const int32_t n_vocab = m->n_vocab;
    s->candidates.resize((size_t) n_vocab);
    for (llama_token id = 0; id < n_vocab; ++id) {
        s->candidates[(size_t) id] = llama_token_data{id, s->logits[(size_t) id], 0.0f};
    }
    llama_token_data_array cur = {s->candidates.data(), s->candidates.size(), -1, false};
    llama_sampler_apply(s->smpl, &cur);
    if (cur.selected < 0 || cur.selected >= (int64_t) cur.size) {
        return fail(s, GLM4V_ERR_INTERNAL, "the sampler selected no token");
    }
    const llama_token tok = cur.data[cur.selected].id;
    llama_sampler_accept(s->smpl, tok);
    s->timings.t_sample_ms += now_ms() - t1;
    ++g.steps;
    if (std::find(s->stop_tokens.begin(), s->stop_tokens.end(), tok) != s->stop_tokens.end()) {
        s->finish = GLM4V_FINISH_STOP;
        g.stop_token = tok;
        return GLM4V_OK;
    }
    // Render special pieces: grounding markers (<|begin_of_box|>) are special tokens.
    char piece[256];
    const int32_t n = llama_token_to_piece(m->vocab, tok, piece, sizeof(piece), 0, true);
    if (n > 0) (g.detached ? g.stage_text : s->pending_text).append(piece, (size_t) n);
    g.tokens_out[g.n_tokens++] = tok;
    s->pending_token = tok;
    s->n_generated += 1;
    s->have_logits = false;
    if (s->n_generated >= s->max_tokens) s->finish = GLM4V_FINISH_LENGTH;
    return GLM4V_OK;
}

}  // namespace glm4v_detail

extern "C" {

// ---------------------------------------------------------------------------------------
// generation
// ---------------------------------------------------------------------------------------

glm4v_status glm4v_gen_begin(glm4v_ctx * s, const glm4v_sampling * sp, const int32_t * stop_tokens,
                             int32_t n_stop, int32_t max_tokens) {
    if (!s || !sp || n_stop < 0 || (n_stop > 0 && !stop_tokens)) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(s);
    try {
        glm4v_call_scope scope(s);
        if (!s->have_logits) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "evaluate a prompt before generating");
        if (max_tokens < 0) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "max_tokens must be >= 0");
        const int32_t n_vocab = s->m->n_vocab;
        if (sp->n_bias < 0 || (sp->n_bias > 0 && (!sp->bias_tokens || !sp->bias_values))) {
            return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "logit bias: n_bias pairs of tokens and values are needed");
        }
        std::vector<llama_logit_bias> bias((size_t) sp->n_bias);
        for (int32_t i = 0; i < sp->n_bias; ++i) {
            const int32_t tok = sp->bias_tokens[i];
            const float value = sp->bias_values[i];
            if (tok < 0 || tok >= n_vocab) {
                return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "logit bias: token id outside the vocabulary");
            }
            if (std::isnan(value) || value == INFINITY) {
                return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "logit bias: values must be finite or -inf");
            }
            bias[(size_t) i] = {tok, value};
        }
        reset_generation(s);
        llama_sampler_chain_params cparams = llama_sampler_chain_default_params();
        cparams.no_perf = true;
        llama_sampler * chain = llama_sampler_chain_init(cparams);
        if (!bias.empty()) {
            llama_sampler_chain_add(chain, llama_sampler_init_logit_bias(n_vocab, (int32_t) bias.size(), bias.data()));
        }
        if (sp->repeat_penalty != 1.0f || sp->presence_penalty != 0.0f || sp->frequency_penalty != 0.0f) {
            const int32_t last_n = sp->repeat_last_n < 0 ? s->m->n_ctx_seq : sp->repeat_last_n;
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
        set_gen_active(s, true);
        if (max_tokens == 0) s->finish = GLM4V_FINISH_LENGTH;
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_gen_step(glm4v_ctx * s, int32_t max_steps, char * text_out, int32_t text_cap,
                            int32_t * text_len, int32_t * tokens_out, int32_t tokens_cap, int32_t * n_tokens,
                            int32_t * finish, int32_t * stop_token) {
    if (!s || !text_out || !text_len || !n_tokens || !finish || !stop_token || text_cap < 8 ||
        (tokens_cap > 0 && !tokens_out) || max_steps <= 0) {
        return GLM4V_ERR_INVALID_ARGUMENT;
    }
    begin_api_call(s);
    *text_len = 0;
    *n_tokens = 0;
    *finish = GLM4V_FINISH_NONE;
    *stop_token = -1;
    if (!s->gen_active) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no generation in progress: call gen_begin first");
    try {
        glm4v_call_scope scope(s);
        glm4v_model * m = s->m;
        glm4v_gen_call g;
        g.ctx = s;
        g.max_steps = max_steps;
        g.tokens_cap = tokens_cap;
        g.text_cap = text_cap;
        g.tokens_out = tokens_out;
        g.req.entries.resize(1);
        glm4v_status st = GLM4V_OK;
        bool finished = false;  // s->finish is this thread's to read
        if (s->ahead) {
            // Decode-ahead: the engine runs the call between calls too; take what it has ready.
            bool ended = false;
            st = ahead_step(s, max_steps, tokens_out, tokens_cap, &g.n_tokens, &ended);
            finished = ended && s->finish != GLM4V_FINISH_NONE;
            if (finished) g.stop_token = s->ahead->stop_token;
        } else {
            while (st == GLM4V_OK && gen_wants_more(g)) {
                if (s->ahead_n > 0 && g.n_tokens > 0) break;  // streamed one sequence: each token as it comes
                if (s->cancel.load() || s->poll_interrupt(false)) {
                    s->finish = GLM4V_FINISH_CANCELLED;
                    break;
                }
                if (s->pending_token < 0) {
                    st = gen_sample(g);  // the prompt's logits: no decode first
                    continue;
                }
                if (engine_running(m)) {
                    // Shared steps: the engine thread runs the rest of this call.
                    st = run_generation(g);
                    break;
                }
                // One sequence: decode the token emitted by the previous step (the cache holds
                // everything but the last emitted token), then sample, on this thread.
                if (!gen_prepare_decode(g)) break;
                const double t0 = now_ms();
                st = run_step(s, g.req, "decoding");
                if (st == GLM4V_OK) {
                    gen_decoded(g, now_ms() - t0);
                    st = gen_sample(g);
                }
            }
            finished = s->finish != GLM4V_FINISH_NONE;
        }
        *n_tokens = g.n_tokens;
        *stop_token = g.stop_token;
        if (st == GLM4V_ERR_CANCELLED) {
            drop_unrecorded(s);
            s->finish = GLM4V_FINISH_CANCELLED;
            s->last_error.clear();
            finished = true;
        } else if (st != GLM4V_OK) {
            end_ahead(s);
            drop_unrecorded(s);
            set_gen_active(s, false);
            return st;
        }
        // Hand out complete UTF-8 text; at the end, everything.
        size_t n_out = finished ? s->pending_text.size() : utf8_complete_prefix(s->pending_text);
        if (n_out > (size_t) text_cap) {
            n_out = utf8_complete_prefix(s->pending_text.substr(0, (size_t) text_cap));
        }
        memcpy(text_out, s->pending_text.data(), n_out);
        s->pending_text.erase(0, n_out);
        *text_len = (int32_t) n_out;
        if (finished && s->pending_text.empty()) {
            *finish = s->finish;
            end_ahead(s);  // over and drained: nothing to drop
            set_gen_active(s, false);
            if (s->smpl) {
                llama_sampler_free(s->smpl);
                s->smpl = nullptr;
            }
        }
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

glm4v_status glm4v_gen_ahead(glm4v_ctx * s, int32_t ahead) {
    if (!s) return GLM4V_ERR_INVALID_ARGUMENT;
    begin_api_call(s);
    try {
        glm4v_call_scope scope(s);
        if (!s->gen_active) return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "no generation in progress: call gen_begin first");
        if (ahead < 1 || ahead > GLM4V_MAX_AHEAD) {
            return fail(s, GLM4V_ERR_INVALID_ARGUMENT, fmt("ahead must be in 1..%d", GLM4V_MAX_AHEAD));
        }
        if (s->ahead_n > 0 || s->n_generated > 0 || s->pending_token >= 0) {
            return fail(s, GLM4V_ERR_INVALID_ARGUMENT, "gen_ahead comes before the generation's first gen_step");
        }
        s->ahead_n = ahead;
        if (!engine_running(s->m)) return GLM4V_OK;  // one sequence: gen_step streams token by token
        auto g = std::make_unique<glm4v_gen_call>();
        g->ctx = s;
        g->detached = true;
        g->done = true;  // not handed to the engine yet
        g->ahead = ahead;
        g->max_steps = INT32_MAX;
        g->tokens_cap = 1;
        g->tokens_out = &g->stage_token;
        g->text_cap = INT32_MAX;
        g->req.entries.resize(1);
        s->vis_cells = (int32_t) s->cell_next.size();
        s->vis_next_pos = s->next_pos;
        s->ahead = std::move(g);  // inside the call: leave_call no longer counts s as generating outside
        return GLM4V_OK;
    }
    GLM4V_GUARD(s)
}

void glm4v_gen_end(glm4v_ctx * s) {
    if (!s) return;
    try {
        glm4v_call_scope scope(s);
        if (s->gen_active) reset_generation(s);
    } catch (...) {
    }
}

}  // extern "C"
