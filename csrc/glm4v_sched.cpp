// glm4v-mtmd C API: shared engine steps for the contexts (sequences) of one model.
//
// One llama_context holds a KV sequence per glm4v_ctx (n_seq_max = n_parallel, a stream of
// its own for each: kv_unified off). Every llama_process call goes through run_step: the
// calling thread queues its request and waits; the model's one engine thread runs the steps.
// A step takes the oldest request and every other queued one of the same kind that fits in
// n_batch, so contexts that generate at the same time are decoded in one pass over the
// weights (llama.cpp's server does the same with its slots, in its one main loop).
//
// Image encodes run on that thread too, between steps (run_on_engine), for the same reason: an
// encode on the caller's thread while the engine thread decodes puts two computations on the
// cores at once (measured through the server, 4 contexts on 2 cores: 0.72x llama-server's
// aggregate with 8 clients, where llama-server encodes in its one loop).
//
// One thread for every step, not whichever caller finds the engine idle: ggml's CPU backend
// computes with an OpenMP team per calling thread, and the idle teams of other callers keep
// spinning on the cores (measured: a single context decoding from a second Python thread ran
// 15 % slower than from the main thread; several callers leading in turn lost 20-30 %).

#include "glm4v_internal.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>

using namespace glm4v_detail;

namespace {

using steady = std::chrono::steady_clock;

// The requests of the next step (sched.mu held): queued requests, removed from the queue, and the
// decodes of the engine-run generation calls. Calls that end here (cancelled, context full) go to
// `ended`. One kind per batch (the engine takes either token ids or embedding rows); when both
// kinds wait, they take turns (`last_embd`: the kind of the previous step).
std::vector<glm4v_request *> take_step(glm4v_model * m, bool last_embd, std::vector<glm4v_gen_call *> & ended) {
    auto & q = m->sched.queue;
    std::vector<glm4v_request *> out;
    size_t n = 0;
    std::vector<glm4v_request *> gens;
    for (glm4v_gen_call * g : m->sched.gens) {
        if (g->abandon) {
            ended.push_back(g);
        } else if (g->ctx->cancel.load()) {
            g->ctx->finish = GLM4V_FINISH_CANCELLED;
            ended.push_back(g);
        } else if (gen_prepare_decode(*g)) {
            g->req.ctx = g->ctx;
            g->req.gen = g;
            g->req.rc = 0;
            gens.push_back(&g->req);
        } else {
            ended.push_back(g);  // the context is full (finish set), or nothing is pending
        }
    }
    bool embd = !q.empty() && q.front()->embd;
    if (embd && last_embd && !gens.empty()) embd = false;
    if (!embd) {
        for (glm4v_request * r : gens) {
            if (n + 1 > (size_t) m->n_batch) break;
            r->taken = true;
            n += 1;
            out.push_back(r);
        }
    }
    for (auto it = q.begin(); it != q.end();) {
        glm4v_request * r = *it;
        if (r->embd == embd && n + r->entries.size() <= (size_t) m->n_batch) {
            r->taken = true;
            n += r->entries.size();
            out.push_back(r);
            it = q.erase(it);
        } else {
            ++it;
        }
    }
    // With one KV stream per sequence the engine puts consecutive sequence ids, in batch
    // order, into one ubatch (llama_batch_allocr::split_equal): sort by id.
    std::sort(out.begin(), out.end(), [](const glm4v_request * a, const glm4v_request * b) {
        return a->ctx->seq < b->ctx->seq;
    });
    return out;
}

// Build and run one engine batch of `step` (sched.mu not held). Codes below -99 are ours.
constexpr int32_t RC_ROW = -100;    // a token's embedding row could not be read
constexpr int32_t RC_BATCH = -101;  // the batch refused an entry
constexpr int32_t RC_LOGITS = -102; // the engine returned no logits
constexpr int32_t RC_RPC = -103;    // an RPC server of the model failed (now or before)

void run_engine_step(glm4v_model * m, const std::vector<glm4v_request *> & step) {
    llama_batch_ext_clear(m->batch);
    std::vector<int32_t> out_idx(step.size(), -1);
    int32_t rc = rpc_check(m) ? RC_RPC : 0;
    for (size_t i = 0; i < step.size() && rc == 0; ++i) {
        glm4v_request * r = step[i];
        const int32_t seq = r->ctx->seq;
        for (size_t j = 0; j < r->entries.size(); ++j) {
            const glm4v_entry & e = r->entries[j];
            int32_t idx;
            if (e.embd) {
                idx = llama_batch_ext_add_embd(m->batch, seq, llama_embd{e.embd, 1, (size_t) m->n_embd});
            } else if (e.as_row) {
                if (!m->token_rows.read(e.token, m->row_buf.data())) {
                    rc = RC_ROW;
                    break;
                }
                // The batch copies the row, so one scratch row serves every entry.
                idx = llama_batch_ext_add_embd(m->batch, seq, llama_embd{m->row_buf.data(), 1, (size_t) m->n_embd});
            } else {
                idx = llama_batch_ext_add_token(m->batch, seq, e.token);
            }
            if (idx < 0 || !llama_batch_ext_set_pos(m->batch, idx, e.pos)) {
                rc = RC_BATCH;
                break;
            }
            if (j + 1 == r->entries.size()) {
                llama_batch_ext_set_output_logits(m->batch, idx, true);
                out_idx[i] = idx;
            }
        }
    }
    if (rc == 0) rc = llama_process(m->lctx, LLAMA_PROCESS_TYPE_DECODE, m->batch);
    if (rc != RC_RPC && rpc_check(m)) rc = RC_RPC;  // its replies were zeros: nothing of this step holds
    const std::string errors = rc != 0 ? engine_errors() : std::string();
    for (size_t i = 0; i < step.size(); ++i) {
        glm4v_request * r = step[i];
        r->rc = rc;
        r->error = errors;
        if (rc != 0) continue;
        const float * l = llama_get_logits_ith(m->lctx, out_idx[i]);
        if (!l) {
            r->rc = RC_LOGITS;
            continue;
        }
        r->ctx->logits.assign(l, l + m->n_vocab);
    }
}

// Finish the engine-run generation calls in `ended` (sched.mu held): their callers wake.
void end_gens(glm4v_scheduler & sc, const std::vector<glm4v_gen_call *> & ended) {
    for (glm4v_gen_call * g : ended) {
        sc.gens.erase(std::remove(sc.gens.begin(), sc.gens.end(), g), sc.gens.end());
        g->done = true;
        if (!g->detached) sc.n_working += 1;  // back in its caller's call (counted out in run_generation)
    }
}

// A decode-ahead call's emitted token goes to its caller (sched.mu held).
void publish(glm4v_gen_call & g) {
    if (g.n_tokens == 0) return;
    const glm4v_ctx * c = g.ctx;
    g.ready.push_back({g.stage_token, std::move(g.stage_text), (int32_t) c->cell_next.size(), c->next_pos});
    g.stage_text.clear();
    g.n_tokens = 0;
}

// The engine thread: wait for work, wait briefly for contexts about to queue, take, run, publish.
void engine_loop(glm4v_model * m) {
    glm4v_scheduler & sc = m->sched;
    std::unique_lock<std::mutex> lk(sc.mu);
    bool stepped = true;  // tasks and steps alternate when both wait
    bool last_embd = false;
    std::vector<glm4v_gen_call *> ended;
    while (true) {
        sc.cv.wait(lk, [&] { return sc.stop || !sc.queue.empty() || !sc.tasks.empty() || !sc.gens.empty(); });
        if (!stepped && sc.queue.empty() && sc.gens.empty() && !sc.stop) {
            // After an encode, its caller is about to queue the prompt that holds the image: give it
            // the next turn rather than the next encode (which would delay that prompt's first token
            // by a whole encode).
            sc.cv.wait_for(lk, std::chrono::milliseconds(20), [&] { return sc.stop || !sc.queue.empty(); });
        }
        // Tasks before the stop check: a caller waits for each one.
        if (!sc.tasks.empty() && (stepped || (sc.queue.empty() && sc.gens.empty()) || sc.stop)) {
            stepped = false;
            std::function<void()> * task = sc.tasks.front();
            sc.tasks.pop_front();
            lk.unlock();
            (*task)();  // sets its own done flag, under sc.mu
            lk.lock();
            continue;
        }
        if (sc.stop) break;
        // Contexts inside a call are sampling their next token (well under a step); contexts with an
        // open generation outside any call are back in Python (a stream's consumer) and may be slow:
        // wait less for them. Engine-run generation calls need no wait: their next token is ready.
        const double working_ms = std::min(50.0, std::max(0.5, 2.0 * sc.step_ms));
        const double outside_ms = std::min(2.0, 0.1 * sc.step_ms);
        const auto t0 = steady::now();
        auto waited_ms = [&] { return std::chrono::duration<double, std::milli>(steady::now() - t0).count(); };
        while (!sc.stop && ((sc.n_working > 0 && waited_ms() < working_ms) ||
                            (sc.n_working == 0 && sc.n_generating > 0 && waited_ms() < outside_ms))) {
            sc.cv.wait_for(lk, std::chrono::microseconds(200));
        }
        ended.clear();
        sc.step = take_step(m, last_embd, ended);
        stepped = true;
        if (!ended.empty()) {
            end_gens(sc, ended);
            sc.cv.notify_all();
        }
        if (sc.step.empty()) continue;  // every request was withdrawn (cancelled) meanwhile
        last_embd = sc.step.front()->embd;
        lk.unlock();
        begin_api_call(nullptr);  // this thread's engine log lines: this step's only
        const double t1 = now_ms();
        run_engine_step(m, sc.step);
        const double dt = now_ms() - t1;
        begin_api_call(nullptr);  // each request carries them (req.error)
        // The engine-run calls: account for the decode, sample the next token, check the stops
        // (their callers are waiting, so their contexts are this thread's until they are done).
        for (glm4v_request * r : sc.step) {
            glm4v_gen_call * g = r->gen;
            if (!g) continue;
            if (r->rc != 0) {
                g->status = step_status(g->ctx, *r, "decoding");
            } else {
                gen_decoded(*g, dt);
                g->status = gen_sample(*g);
            }
        }
        lk.lock();
        ended.clear();
        for (glm4v_request * r : sc.step) {
            glm4v_gen_call * g = r->gen;
            if (!g) continue;
            if (g->detached) publish(*g);
            if (g->status != GLM4V_OK || !gen_wants_more(*g)) ended.push_back(g);
        }
        sc.step_ms = 0.8 * sc.step_ms + 0.2 * dt;
        sc.n_steps += 1;
        sc.n_served += (int64_t) sc.step.size();
        // Their contexts count as working from now on (they will sample and queue again), not from
        // when their threads wake up: the next step must wait for them, not start without them.
        for (glm4v_request * r : sc.step) {
            if (r->gen) continue;
            r->done = true;
            sc.n_working += 1;
        }
        end_gens(sc, ended);
        sc.step.clear();
        sc.cv.notify_all();
    }
    // Stopping: calls still handed over end with an error rather than wait forever.
    for (glm4v_gen_call * g : sc.gens) {
        g->status = fail(g->ctx, GLM4V_ERR_INTERNAL, "the model is closing");
    }
    end_gens(sc, std::vector<glm4v_gen_call *>(sc.gens));
    sc.cv.notify_all();
}

// Wait (sched.mu held through lk) until done() holds, asking c's interrupt poll every 20 ms
// meanwhile (it sets c->cancel on Ctrl-C); done() and due() run under the lock. due() (now_ms()
// clock, 0: none): a time at which done() turns true without a notification.
template <typename Done, typename Due>
void wait_polling(std::unique_lock<std::mutex> & lk, glm4v_ctx * c, Done done, Due due) {
    while (!done()) {
        const double due_ms = due();
        const double slice_ms = due_ms > 0.0 ? std::min(20.0, std::max(0.1, due_ms - now_ms())) : 20.0;
        c->m->sched.cv.wait_for(lk, std::chrono::microseconds((int64_t) (slice_ms * 1000.0)));
        if (!done() && c->poll_fn) {
            lk.unlock();  // the poll runs Python code: never hold the scheduler's lock there
            c->poll_interrupt(true);
            lk.lock();
        }
    }
}

template <typename Done>
void wait_polling(std::unique_lock<std::mutex> & lk, glm4v_ctx * c, Done done) {
    wait_polling(lk, c, done, [] { return 0.0; });
}

}  // namespace

namespace glm4v_detail {

// A context with a decode-ahead call is not waited for: the engine itself decodes its next token.
void enter_call(glm4v_ctx * c) {
    glm4v_scheduler & sc = c->m->sched;
    std::lock_guard<std::mutex> lk(sc.mu);
    sc.n_working += 1;
    if (c->gen_active && !c->ahead) sc.n_generating -= 1;
}

void leave_call(glm4v_ctx * c) {
    glm4v_scheduler & sc = c->m->sched;
    std::lock_guard<std::mutex> lk(sc.mu);
    sc.n_working -= 1;
    if (c->gen_active && !c->ahead) sc.n_generating += 1;
    sc.cv.notify_all();
}

void set_gen_active(glm4v_ctx * c, bool active) {
    // Called inside a call (between enter_call and leave_call), so only the flag changes here:
    // leave_call counts it.
    glm4v_scheduler & sc = c->m->sched;
    std::lock_guard<std::mutex> lk(sc.mu);
    c->gen_active = active;
}

glm4v_status run_step(glm4v_ctx * c, glm4v_request & req, const char * what) {
    glm4v_model * m = c->m;
    glm4v_scheduler & sc = m->sched;
    req.ctx = c;
    req.taken = req.done = false;
    req.rc = 0;
    if (!m->engine.joinable()) {
        // One sequence (n_parallel = 1): nothing to share, so the caller runs its step itself and
        // pays no hand-over to another thread per token (measured: 0.76x llama-mtmd-cli's decode
        // rate on the quick model through the engine thread, against ~1.0 inline).
        if (c->cancel.load()) return fail(c, GLM4V_ERR_CANCELLED, fmt("%s cancelled", what));
        std::lock_guard<std::mutex> lk(sc.mu);  // no other caller can exist; keeps sc.step consistent
        sc.step.assign(1, &req);
        m->inline_ctx.store(c);
        run_engine_step(m, sc.step);
        m->inline_ctx.store(nullptr);
        sc.step.clear();
        sc.n_steps += 1;
        sc.n_served += 1;
    } else {
        std::unique_lock<std::mutex> lk(sc.mu);
        sc.queue.push_back(&req);
        sc.n_working -= 1;
        sc.cv.notify_all();
        bool withdrawn = false;
        wait_polling(lk, c, [&] {
            if (!req.done && !req.taken && c->cancel.load()) {
                // Not in a step yet: leave the queue rather than wait for one.
                sc.queue.erase(std::find(sc.queue.begin(), sc.queue.end(), &req));
                withdrawn = true;
            }
            return req.done || withdrawn;
        });
        if (withdrawn) {
            sc.n_working += 1;  // the engine thread does this for the requests it served
            return fail(c, GLM4V_ERR_CANCELLED, fmt("%s cancelled", what));
        }
    }
    return step_status(c, req, what);
}

glm4v_status step_status(glm4v_ctx * c, const glm4v_request & req, const char * what) {
    glm4v_model * m = c->m;
    const int32_t rc = req.rc;
    if (rc == 0) return GLM4V_OK;
    // fail() appends this thread's engine log lines; those of a step run on the engine thread come
    // with the request.
    const std::string suffix = m->engine.joinable() ? engine_detail_suffix(req.error) : std::string();
    if (rc == RC_RPC) {
        return fail(c, GLM4V_ERR_RPC, rpc_call_error(m, what));
    }
    if (rc == 2 || c->cancel.load()) return fail(c, GLM4V_ERR_CANCELLED, fmt("%s cancelled", what));
    if (rc == 1) {
        return fail(c, GLM4V_ERR_CONTEXT_FULL,
                    fmt("%s: no KV cache slot available (n_ctx %d is full)", what, m->n_ctx_seq) + suffix);
    }
    if (rc == RC_ROW) return fail(c, GLM4V_ERR_INTERNAL, fmt("%s: could not read a token's embedding from the model file", what));
    if (rc == RC_BATCH) return fail(c, GLM4V_ERR_INTERNAL, fmt("%s: the engine batch refused an entry", what) + suffix);
    if (rc == RC_LOGITS) return fail(c, GLM4V_ERR_INTERNAL, fmt("%s: the engine returned no logits", what) + suffix);
    return fail(c, GLM4V_ERR_DECODE, fmt("%s failed (llama_process returned %d)", what, rc) + suffix);
}

bool engine_running(const glm4v_model * m) {
    return m->engine.joinable();
}

glm4v_status run_generation(glm4v_gen_call & g) {
    glm4v_ctx * c = g.ctx;
    glm4v_scheduler & sc = c->m->sched;
    std::unique_lock<std::mutex> lk(sc.mu);
    sc.gens.push_back(&g);
    sc.n_working -= 1;  // handed over: the engine need not wait for this context
    sc.cv.notify_all();
    wait_polling(lk, c, [&] { return g.done; });  // a Ctrl-C sets cancel: the engine ends the call
    return g.status;
}

glm4v_status ahead_step(glm4v_ctx * c, int32_t max, int32_t * ids_out, int32_t cap, int32_t * n_ids, bool * ended) {
    glm4v_gen_call & g = *c->ahead;
    glm4v_scheduler & sc = c->m->sched;
    std::unique_lock<std::mutex> lk(sc.mu);
    // Done (not in the engine's list): the engine leaves the call alone, so this thread may sample and end it.
    auto hand_over = [&] {
        if (!g.done || g.status != GLM4V_OK || c->finish != GLM4V_FINISH_NONE || (int32_t) g.ready.size() >= g.ahead) {
            return;
        }
        if (c->cancel.load()) {
            c->finish = GLM4V_FINISH_CANCELLED;
        } else if (sc.stop) {
            g.status = fail(c, GLM4V_ERR_INTERNAL, "the model is closing");
        } else {
            g.done = false;
            sc.gens.push_back(&g);
            sc.cv.notify_all();
        }
    };
    if (g.done && c->pending_token < 0 && c->finish == GLM4V_FINISH_NONE && g.status == GLM4V_OK) {
        lk.unlock();
        g.status = gen_sample(g);  // the prompt's logits: the first token needs no decode
        lk.lock();
        publish(g);
    }
    hand_over();
    // Every hand-out wakes the caller's Python (and a server's event loop), which takes the cores from
    // the engine: tokens go out together, at most every GLM4V_AHEAD_CHUNK_MS (the first at once).
    const double due_ms = g.out_ms + GLM4V_AHEAD_CHUNK_MS;
    auto ready = [&] {
        return g.done || (int32_t) g.ready.size() >= g.ahead || (!g.ready.empty() && now_ms() >= due_ms);
    };
    if (!ready()) {
        sc.n_working -= 1;  // waiting on the engine, as in run_generation
        sc.cv.notify_all();
        // Woken by the engine's steps; a timed wake only for tokens that wait for due_ms.
        wait_polling(lk, c, ready, [&] { return g.ready.empty() ? 0.0 : due_ms; });
        sc.n_working += 1;
    }
    g.out_ms = now_ms();
    int32_t n = 0;
    while (n < max && !g.ready.empty()) {
        glm4v_ahead_token & t = g.ready.front();
        if (n < cap) ids_out[n] = t.token;
        c->pending_text += t.text;
        c->vis_cells = t.cells;
        c->vis_next_pos = t.next_pos;
        g.ready.pop_front();
        ++n;
    }
    *n_ids = std::min(n, cap);
    if (g.done && g.ready.empty()) {
        // Over (or stopped short, handed back below): the context's own state is the caller's again.
        c->vis_cells = (int32_t) c->cell_next.size();
        c->vis_next_pos = c->next_pos;
    }
    hand_over();  // the engine goes on while the caller hands these out
    *ended = g.done && g.ready.empty();
    return g.done ? g.status : GLM4V_OK;
}

void end_ahead(glm4v_ctx * c) {
    if (!c->ahead) return;
    glm4v_gen_call & g = *c->ahead;
    glm4v_scheduler & sc = c->m->sched;
    {
        std::unique_lock<std::mutex> lk(sc.mu);
        if (!g.done && std::find(sc.step.begin(), sc.step.end(), &g.req) == sc.step.end()) {
            // Not in the running step (the engine may be busy with an encode for seconds): the
            // engine touches the call again only in its next take_step, under this lock.
            sc.gens.erase(std::find(sc.gens.begin(), sc.gens.end(), &g));
            g.done = true;
        }
        if (!g.done) {
            g.abandon = true;
            sc.n_working -= 1;
            sc.cv.notify_all();
            sc.cv.wait(lk, [&] { return g.done; });  // the engine's next step ends it
            sc.n_working += 1;
        }
    }
    const int32_t keep = c->vis_cells;
    c->ahead.reset();
    if (keep < (int32_t) c->cell_next.size()) truncate_cells(c, keep);
}

void run_on_engine(glm4v_model * m, const std::function<void()> & fn) {
    if (!m->engine.joinable()) {
        fn();
        return;
    }
    glm4v_scheduler & sc = m->sched;
    bool done = false;
    std::exception_ptr error;
    std::function<void()> task = [&] {
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
        std::lock_guard<std::mutex> lk(sc.mu);
        done = true;
        sc.cv.notify_all();
    };
    std::unique_lock<std::mutex> lk(sc.mu);
    sc.tasks.push_back(&task);
    sc.cv.notify_all();
    sc.cv.wait(lk, [&] { return done; });
    lk.unlock();
    if (error) std::rethrow_exception(error);
}

void start_engine(glm4v_model * m) {
    m->engine = std::thread(engine_loop, m);
}

void stop_engine(glm4v_model * m) {
    if (!m->engine.joinable()) return;
    {
        std::lock_guard<std::mutex> lk(m->sched.mu);
        m->sched.stop = true;
    }
    m->sched.cv.notify_all();
    m->engine.join();
}

void model_steps(glm4v_model * m, int64_t * steps, int64_t * requests) {
    std::lock_guard<std::mutex> lk(m->sched.mu);
    if (steps) *steps = m->sched.n_steps;
    if (requests) *requests = m->sched.n_served;
}

bool step_abort(void * data) {
    auto * m = static_cast<glm4v_model *>(data);
    // Called on the engine thread while it computes a step (sc.step is stable then). The waiting
    // callers poll their own interrupts (Ctrl-C reaches Python only on the main thread) and set
    // their cancel flags; stop the step only if nobody in it still wants it. A step run inline (one
    // sequence) is on the caller's thread, which polls its own interrupt here.
    glm4v_ctx * inline_ctx = m->inline_ctx.load();
    if (inline_ctx) inline_ctx->poll_interrupt(true);
    const auto & step = m->sched.step;
    if (step.empty()) return false;
    for (const glm4v_request * r : step) {
        if (!r->ctx->cancel.load()) return false;
    }
    return true;
}

}  // namespace glm4v_detail
