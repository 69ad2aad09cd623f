// The chat page of glm4v-mtmd serve: talks to this server's /v1/chat/completions (streamed), keeps the
// conversation in the tab, and draws the answer's grounding boxes on the picture they refer to.
// Model text only ever reaches the page as text nodes (never as HTML).
"use strict";

(function () {
  const B = window.GlmBoxes;
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "glm4v-mtmd.api-key";
  const ui = {
    model: $("model"), conversation: $("conversation"), empty: $("empty"), composer: $("composer"),
    prompt: $("prompt"), file: $("file"), addImage: $("add-image"), attachments: $("attachments"),
    thinkingSwitch: $("thinking-switch"), thinking: $("thinking"), thinkingAlways: $("thinking-always"),
    send: $("send"), stop: $("stop"), maxTokens: $("max-tokens"), temperature: $("temperature"), extra: $("extra"),
    forgetKey: $("forget-key"), status: $("status"), dropHint: $("drop-hint"), newChat: $("new-chat"),
    keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("api-key"), keyCancel: $("key-cancel"),
  };
  const state = {
    model: null, // the model id from /v1/models
    meta: {},
    messages: [], // the conversation as sent (OpenAI messages)
    images: [], // every image of the conversation, in order: {url, width, height, name}
    pending: [], // images attached to the next question
    controller: null, // the AbortController of the running request
  };

  // ------------------------------------------------------------------ small helpers

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const say = (text) => { ui.status.textContent = text; };

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // Asks for the API key (kept in this tab's sessionStorage); resolves false when cancelled.
  function askKey() {
    return new Promise((resolve) => {
      const done = (ok) => {
        ui.keyForm.removeEventListener("submit", onSubmit);
        ui.keyCancel.removeEventListener("click", onCancel);
        ui.keyDialog.removeEventListener("cancel", onCancel);
        if (ui.keyDialog.open) ui.keyDialog.close();
        resolve(ok);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const key = ui.keyInput.value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORE, key);
        ui.keyInput.value = "";
        done(true);
      };
      const onCancel = (e) => { e.preventDefault(); done(false); };
      ui.keyForm.addEventListener("submit", onSubmit);
      ui.keyCancel.addEventListener("click", onCancel);
      ui.keyDialog.addEventListener("cancel", onCancel);
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  // A request that asks for the key once when the server says 401.
  async function call(path, init) {
    let resp = await fetch(path, { ...init, headers: headers() });
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      if (!(await askKey())) throw new Error("this server needs an API key");
      resp = await fetch(path, { ...init, headers: headers() });
    }
    return resp;
  }

  // ------------------------------------------------------------------ the model

  async function connect() {
    for (;;) {
      let resp;
      try {
        resp = await call("v1/models", {});
      } catch (e) {
        if (e.name === "TypeError") { // network: the server is not up (yet)
          ui.model.textContent = "server unreachable, retrying…";
          await sleep(2000);
          continue;
        }
        ui.model.textContent = e.message;
        return false;
      }
      if (resp.status === 503) {
        ui.model.textContent = "loading the model…";
        await sleep(1000);
        continue;
      }
      if (!resp.ok) {
        ui.model.textContent = await errorText(resp);
        return false;
      }
      const entry = (await resp.json()).data[0];
      state.model = entry.id;
      state.meta = entry.meta || {};
      const family = state.meta.chat_family ? ` · ${state.meta.chat_family}` : "";
      ui.model.textContent = `${entry.id}${family}` + (state.meta.n_ctx ? ` · context ${state.meta.n_ctx}` : "");
      ui.thinkingSwitch.hidden = state.meta.thinking !== "switch";
      ui.thinkingAlways.hidden = state.meta.thinking !== "always";
      ui.thinking.checked = state.meta.thinking_default !== false;
      document.body.dataset.ready = "1";
      return true;
    }
  }

  // ------------------------------------------------------------------ images

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onerror = () => reject(new Error(`${file.name}: cannot be read`));
      reader.onload = () => {
        const img = new Image();
        img.onload = () => resolve({ url: reader.result, width: img.naturalWidth, height: img.naturalHeight,
          name: file.name || "pasted image" });
        img.onerror = () => reject(new Error(`${file.name}: not an image this browser can show`));
        img.src = reader.result;
      };
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) {
        say(`${file.name}: not an image`);
        continue;
      }
      try {
        state.pending.push(await readImage(file));
        say("");
      } catch (e) {
        say(e.message);
      }
    }
    renderAttachments();
  }

  function renderAttachments() {
    ui.attachments.replaceChildren(...state.pending.map((img, i) => el("li", {},
      el("img", { src: img.url, alt: `attached: ${img.name}` }),
      el("button", { type: "button", "aria-label": `remove ${img.name}`, title: "Remove",
        onclick: () => { state.pending.splice(i, 1); renderAttachments(); ui.prompt.focus(); } }, "×"))));
  }

  // ------------------------------------------------------------------ conversation view

  function renderUser(text, images) {
    ui.empty.hidden = true;
    const turn = el("article", { class: "turn user" }, el("h2", {}, "You"));
    if (images.length) {
      turn.append(el("div", { class: "images" }, ...images.map((img) => el("img", {
        src: img.url, alt: `image ${state.images.indexOf(img) + 1}: ${img.name}`,
        title: `${img.name} (${img.width}×${img.height})` }))));
    }
    if (text) turn.append(el("p", { class: "text" }, text));
    ui.conversation.append(turn);
    return turn;
  }

  // One answer: streamed reasoning and text, the boxes on its image, the numbers.
  class AnswerView {
    constructor(image, imageNumber) {
      this.image = image;
      this.imageNumber = imageNumber;
      this.reasoning = "";
      this.content = "";
      this.deltas = 0;
      this.reasoningText = el("p", { class: "text" });
      this.reasoningBox = el("details", { class: "reasoning", hidden: true },
        el("summary", {}, "Reasoning"), this.reasoningText);
      this.answer = el("p", { class: "text answer" });
      this.ending = el("p", { class: "stopped", hidden: true });
      this.stats = el("p", { class: "stats" });
      this.figure = null;
      this.root = el("article", { class: "turn assistant", dataset: { state: "streaming", deltas: "0" } },
        el("h2", {}, "Answer"), this.reasoningBox, this.answer, this.ending, this.stats);
      this._scheduled = false;
      ui.conversation.append(this.root);
    }

    add(reasoning, content) {
      this.reasoning += reasoning;
      this.content += content;
      this.deltas += 1;
      this.root.dataset.deltas = String(this.deltas);
      if (!this._scheduled) {
        this._scheduled = true;
        // A frame still pending when the answer finishes finds nothing to do: finish() rendered it whole.
        requestAnimationFrame(() => { if (this._scheduled) { this._scheduled = false; this.render(); } });
      }
    }

    render() {
      const follow = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 48;
      this._render();
      if (follow) window.scrollTo(0, document.documentElement.scrollHeight); // keep the stream in view
    }

    _render() {
      if (this.reasoning) {
        this.reasoningBox.hidden = false;
        this.reasoningText.textContent = this.reasoning.trim();
      }
      const pieces = B.segments(this.content.replace(/^\s+/, ""));
      const nodes = [];
      const spans = []; // {span, label, boxes}
      pieces.forEach((piece, i) => {
        if (piece.text !== undefined) {
          nodes.push(document.createTextNode(piece.text));
        } else if (!piece.boxes) { // a boxed answer that is not coordinates ("true", "B"): its text
          nodes.push(document.createTextNode(piece.raw.slice(B.BEGIN.length, -B.END.length)));
        } else {
          const number = spans.length + 1;
          const label = B.labelFor(pieces, i) || `box ${number}`;
          spans.push({ span: piece.span, number, label, boxes: piece.boxes });
          nodes.push(this._chip(piece.span, number, label, piece.boxes));
        }
      });
      this.answer.replaceChildren(...nodes);
      if (spans.length && this.image) this._drawBoxes(spans);
    }

    _chip(span, number, label, boxes) {
      const kind = boxes.length === 1 ? (boxes[0].point ? "point" : "box") : `${boxes.length} boxes`;
      const chip = el("button", { type: "button", class: "chip", dataset: { span: String(span) },
        "aria-label": `${kind} ${number}: ${label}`, title: `${label} (highlighted on the image)` }, String(number));
      for (const [ev, on] of [["mouseenter", true], ["focus", true], ["mouseleave", false], ["blur", false]]) {
        chip.addEventListener(ev, () => this.highlight(span, on));
      }
      return chip;
    }

    highlight(span, on) {
      for (const node of this.root.querySelectorAll(`[data-span="${span}"]`)) node.classList.toggle("hl", on);
    }

    _drawBoxes(spans) {
      const { width, height } = this.image;
      if (!this.figure) {
        this.img = el("img", { src: this.image.url, alt: `image ${this.imageNumber} with the answer's boxes` });
        this.layer = el("div", { class: "canvas" }, this.img);
        const save = el("button", { type: "button", class: "save", onclick: () => this.save() },
          "Save picture with boxes");
        this.figure = el("figure", { class: "boxed" }, this.layer, el("figcaption", {},
          el("span", {}, `image ${this.imageNumber} · ${width}×${height} px`), save));
        this.answer.after(this.figure);
      }
      this.spans = spans;
      const pct = (v, size) => `${(100 * v) / size}%`;
      const divs = [];
      for (const { span, number, label, boxes } of spans) {
        boxes.forEach((box, k) => {
          const [left, top, right, bottom] = B.toPixels(box, width, height);
          const div = el("div", { class: box.point ? "box point" : "box", dataset: {
            span: String(span), left: String(left), top: String(top), right: String(right), bottom: String(bottom),
            label } }, el("span", { class: "tag" }, boxes.length > 1 ? `${number}.${k + 1} ${label}` : `${number} ${label}`));
          div.style.left = pct(left, width);
          div.style.top = pct(top, height);
          if (!box.point) {
            div.style.width = pct(right - left, width);
            div.style.height = pct(bottom - top, height);
          }
          divs.push(div);
        });
      }
      this.layer.replaceChildren(this.img, ...divs);
    }

    // The picture at its own size with the boxes and labels drawn, as a PNG download.
    save() {
      const { width, height } = this.image;
      const canvas = el("canvas", { width, height });
      const g = canvas.getContext("2d");
      g.drawImage(this.img, 0, 0, width, height);
      const line = Math.max(2, Math.round(Math.min(width, height) / 200));
      const font = Math.max(12, Math.round(Math.min(width, height) / 40));
      g.lineWidth = line;
      g.font = `${font}px sans-serif`;
      g.textBaseline = "bottom";
      for (const { number, label, boxes } of this.spans) {
        for (const box of boxes) {
          const [left, top, right, bottom] = B.toPixels(box, width, height);
          g.strokeStyle = "#e8175d";
          g.beginPath();
          if (box.point) g.arc(left, top, 2 * line, 0, 2 * Math.PI);
          else g.rect(left, top, right - left, bottom - top);
          g.stroke();
          const text = `${number} ${label}`;
          const y = Math.max(top, font + 2);
          g.fillStyle = "#e8175d";
          g.fillRect(left, y - font - 2, g.measureText(text).width + 8, font + 2);
          g.fillStyle = "#fff";
          g.fillText(text, left + 4, y);
        }
      }
      canvas.toBlob((blob) => {
        const url = URL.createObjectURL(blob);
        const a = el("a", { href: url, download: `glm4v-boxes-${this.imageNumber}.png` });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 10000);
      }, "image/png");
    }

    finish(how, { usage, timings, finish, ttft, error }) {
      this._scheduled = false;
      this.render();
      this.root.dataset.state = how;
      if (how === "error") this.ending.after(el("p", { class: "error", role: "alert" }, error));
      const ending = how === "stopped" ? "Stopped." : finish === "length" ? "Token limit reached." : "";
      this.ending.textContent = ending;
      this.ending.hidden = !ending;
      const parts = [];
      const tokens = usage ? usage.completion_tokens : timings ? timings.predicted_n : null;
      if (tokens !== null && tokens !== undefined) parts.push(`${tokens} tokens`);
      if (ttft !== null) parts.push(`first token ${(ttft / 1000).toFixed(2)} s`);
      const tps = timings && timings.predicted_per_second;
      if (tps) parts.push(`${tps.toFixed(1)} tokens/s`);
      const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : null;
      if (usage && cached !== null && cached !== undefined) {
        parts.push(`${cached} of ${usage.prompt_tokens} prompt tokens cached`);
      }
      this.stats.textContent = parts.join(" · ");
      Object.assign(this.stats.dataset, {
        tokens: tokens ?? "", ttftMs: ttft === null ? "" : ttft.toFixed(1), tps: tps ? String(tps) : "",
        cached: cached ?? "", promptTokens: usage ? usage.prompt_tokens : "" });
    }
  }

  // ------------------------------------------------------------------ asking

  async function* events(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line.startsWith("data:")) yield line.slice(5).trimStart();
      }
    }
  }

  function requestBody() {
    const body = { model: state.model, messages: state.messages, stream: true, stream_options: { include_usage: true } };
    if (ui.maxTokens.value) body.max_tokens = Number(ui.maxTokens.value);
    if (ui.temperature.value) body.temperature = Number(ui.temperature.value);
    if (state.meta.thinking === "switch") body.chat_template_kwargs = { enable_thinking: ui.thinking.checked };
    const extra = ui.extra.value.trim();
    if (extra) {
      let fields;
      try {
        fields = JSON.parse(extra);
      } catch (e) {
        throw new Error(`Extra request fields: not valid JSON (${e.message})`);
      }
      if (!fields || typeof fields !== "object" || Array.isArray(fields)) {
        throw new Error("Extra request fields: must be a JSON object");
      }
      Object.assign(body, fields);
    }
    return body;
  }

  function setBusy(controller) {
    state.controller = controller;
    ui.send.hidden = !!controller;
    ui.stop.hidden = !controller;
    document.body.dataset.busy = controller ? "1" : "";
  }

  async function ask() {
    if (state.controller) return;
    const text = ui.prompt.value.trim();
    if (!text && !state.pending.length) {
      say("Type a question or add an image first.");
      return;
    }
    if (!state.model && !(await connect())) return;
    let body;
    const images = state.pending.splice(0);
    state.images.push(...images);
    const content = images.map((img) => ({ type: "image_url", image_url: { url: img.url } }));
    if (text) content.push({ type: "text", text });
    state.messages.push({ role: "user", content });
    try {
      body = requestBody();
    } catch (e) {
      state.messages.pop();
      state.images.splice(state.images.length - images.length);
      state.pending.unshift(...images);
      say(e.message);
      return;
    }
    say("");
    renderUser(text, images);
    ui.prompt.value = "";
    renderAttachments();
    const image = state.images[state.images.length - 1] || null;
    const view = new AnswerView(image, state.images.length);
    const controller = new AbortController();
    setBusy(controller);
    const started = performance.now();
    const got = { usage: null, timings: null, finish: null, ttft: null, error: null };
    let how = "done";
    try {
      const resp = await call("v1/chat/completions", { method: "POST", body: JSON.stringify(body),
        signal: controller.signal });
      if (!resp.ok) throw new Error(await errorText(resp));
      for await (const data of events(resp.body)) {
        if (data === "[DONE]") break;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        if (obj.usage) got.usage = obj.usage;
        if (obj.timings) got.timings = obj.timings;
        for (const choice of obj.choices || []) {
          const delta = choice.delta || {};
          const reasoning = delta.reasoning_content ?? delta.reasoning ?? "";
          const text = delta.content ?? "";
          if (reasoning || text) {
            if (got.ttft === null) got.ttft = performance.now() - started;
            view.add(reasoning, text);
          }
          if (choice.finish_reason) got.finish = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") how = "stopped";
      else {
        how = "error";
        got.error = e.message;
      }
    } finally {
      setBusy(null);
    }
    if (view.content || view.reasoning) {
      const reply = { role: "assistant", content: view.content.trim() };
      if (view.reasoning) reply.reasoning_content = view.reasoning.trim();
      state.messages.push(reply);
    } else { // nothing came back: this question is not part of the conversation
      state.messages.pop();
      state.images.splice(state.images.length - images.length);
    }
    view.finish(how, got);
    ui.prompt.focus();
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newConversation() {
    stop();
    state.messages = [];
    state.images = [];
    state.pending = [];
    renderAttachments();
    ui.conversation.replaceChildren(ui.empty);
    ui.empty.hidden = false;
    say("");
    ui.prompt.focus();
  }

  // ------------------------------------------------------------------ wiring

  // What scrolls into view (focus, find) stays clear of the composer stuck to the bottom.
  new ResizeObserver(() => {
    document.documentElement.style.scrollPaddingBottom = `${ui.composer.offsetHeight + 16}px`;
  }).observe(ui.composer);

  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ask();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newConversation);
  ui.addImage.addEventListener("click", () => ui.file.click());
  ui.file.addEventListener("change", () => { addFiles([...ui.file.files]); ui.file.value = ""; });
  ui.forgetKey.addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); say("API key forgotten."); });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    ui.dropHint.hidden = false;
  });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) ui.dropHint.hidden = true; });
  document.addEventListener("drop", (e) => {
    ui.dropHint.hidden = true;
    if (!hasFiles(e)) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });

  connect();
})();
