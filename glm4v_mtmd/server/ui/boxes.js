// Grounding boxes in GLM-4.xV answers: the same rules as glm4v_mtmd.boxes (parse_boxes, Box.to_pixels).
// A box span is <|begin_of_box|>[[x1,y1,x2,y2]]<|end_of_box|> in 0-1000 coordinates of the image.
"use strict";

(function (global) {
  const NORM = 1000;
  const BEGIN = "<|begin_of_box|>";
  const END = "<|end_of_box|>";
  const NUM = String.raw`\s*(-?\d+(?:\.\d+)?)\s*`;
  const GROUP = String.raw`\[` + NUM + "," + NUM + "(?:," + NUM + "," + NUM + String.raw`)?\]`;
  const GROUPS = new RegExp(String.raw`^\s*` + GROUP + String.raw`(?:\s*,?\s*` + GROUP + String.raw`)*\s*$`);
  const SPAN = /<\|begin_of_box\|>([\s\S]*?)<\|end_of_box\|>/g;

  // Python's str.strip() set, near enough for model output.
  function strip(s) {
    return s.replace(/^\s+|\s+$/g, "");
  }

  // The boxes of one span's body, or null when the body is not a list of points/boxes.
  function parseSpan(bodyText, span) {
    let body = strip(bodyText);
    if (body.startsWith("[") && body.slice(1).replace(/^\s+/, "").startsWith("[")) {
      if (!body.endsWith("]")) return null;
      body = body.slice(1, -1);
    }
    if (!GROUPS.test(body)) return null;
    const boxes = [];
    for (const m of body.matchAll(new RegExp(GROUP, "g"))) {
      const v = m.slice(1).filter((x) => x !== undefined).map(Number);
      if (v.length === 2) boxes.push({ x1: v[0], y1: v[1], x2: v[0], y2: v[1], point: true, span });
      else boxes.push({ x1: v[0], y1: v[1], x2: v[2], y2: v[3], point: false, span });
    }
    return boxes;
  }

  // Every box and point of a text, as glm4v_mtmd.parse_boxes gives them.
  function parseBoxes(text) {
    const out = [];
    let index = 0;
    for (const m of text.matchAll(SPAN)) {
      const boxes = parseSpan(m[1], index);
      if (boxes) out.push(...boxes);
      index += 1;
    }
    return out;
  }

  // [left, top, right, bottom] in pixels of a width x height image, as Box.to_pixels.
  function toPixels(box, width, height) {
    const px = (c, size) => Math.min(Math.max(Math.floor((c * size) / NORM + 0.5), 0), box.point ? size - 1 : size);
    const [left, right] = [px(box.x1, width), px(box.x2, width)].sort((a, b) => a - b);
    const [top, bottom] = [px(box.y1, height), px(box.y2, height)].sort((a, b) => a - b);
    return [left, top, right, bottom];
  }

  // The answer as pieces for display: {text} runs and {span, boxes, raw} box spans. A trailing
  // unfinished span (or the start of its marker, while streaming) is held back.
  function segments(text) {
    const out = [];
    let pos = 0;
    let index = 0;
    for (const m of text.matchAll(SPAN)) {
      if (m.index > pos) out.push({ text: text.slice(pos, m.index) });
      out.push({ span: index, boxes: parseSpan(m[1], index), raw: m[0] });
      index += 1;
      pos = m.index + m[0].length;
    }
    let rest = text.slice(pos);
    const open = rest.indexOf(BEGIN);
    if (open >= 0) rest = rest.slice(0, open);
    else {
      for (let n = Math.min(BEGIN.length - 1, rest.length); n > 0; n--) {
        if (BEGIN.startsWith(rest.slice(rest.length - n))) {
          rest = rest.slice(0, rest.length - n);
          break;
        }
      }
    }
    if (rest) out.push({ text: rest });
    return out;
  }

  const MARKUP = /[*_`#>|]+/g;
  const BOUNDARY = /[.!?;:\n]/;

  // What a span is about: the words just before it in its sentence (else just after it).
  function labelFor(pieces, i) {
    const clean = (s) => strip(s.replace(MARKUP, " ").replace(/\s+/g, " "));
    const words = (s) => s.split(" ").filter(Boolean);
    const prev = pieces[i - 1] && pieces[i - 1].text !== undefined ? pieces[i - 1].text : "";
    let before = prev;
    for (let k = before.length - 1; k >= 0; k--) {
      if (BOUNDARY.test(before[k]) && strip(before.slice(k + 1))) {
        before = before.slice(k + 1);
        break;
      }
    }
    before = words(clean(before).replace(/^[-\d.)(\s]+/, "").replace(/[,(\s]+$/, ""));
    if (before.length) return before.slice(-6).join(" ");
    const next = pieces[i + 1] && pieces[i + 1].text !== undefined ? pieces[i + 1].text : "";
    const cut = next.search(BOUNDARY);
    const after = words(clean(cut >= 0 ? next.slice(0, cut) : next).replace(/^[,)\s]+/, ""));
    return after.slice(0, 6).join(" ");
  }

  global.GlmBoxes = { NORM, BEGIN, END, parseBoxes, toPixels, segments, labelFor };
})(window);
