// Step1X-Edit playground: plain JS, no build step, no outside resources. It calls the same API as any client:
// POST /v1/images/edits (multipart) with stream=true, reading the server-sent events from fetch's body stream
// (EventSource cannot POST). The API key lives in localStorage and goes out only as the Authorization header.
"use strict";

const MODEL = "stepfun-ai/step1x-edit";
const KEY_STORE = "step1x-edit.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  file: null,         // the picked image (a File)
  originalUrl: null,  // object URL of it
  results: [],        // {url, seed, size, index, format}
  selected: 0,
  controller: null,   // AbortController of the running request
  events: [],         // every event received (without image data), for the log (and the browser test)
};
window.step1x = state;

// --- API key --------------------------------------------------------------------------------------------------------
function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function authHeaders() { const k = apiKey(); return k ? { Authorization: "Bearer " + k } : {}; }
function showKeyState() {
  $("key").value = "";
  $("key").placeholder = apiKey() ? "•••••••• saved" : "sk-… (kept in this browser)";
  $("key-state").textContent = apiKey() ? "saved" : "none";
}
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("key").value.trim();
  if (value) localStorage.setItem(KEY_STORE, value);
  showKeyState();
  loadModel();
});
$("key-forget").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); showKeyState(); loadModel(); });

// --- the server's model card ----------------------------------------------------------------------------------------
let modelTimer = null;
async function loadModel() {
  clearTimeout(modelTimer);
  const box = $("model");
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders() });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      // in words: the API's own 401 sentence ("send it as 'Authorization: Bearer <key>'") is for programmers
      const msg = (body && body.error && body.error.message) || resp.statusText;
      const [label, text] = resp.status === 401
        ? (apiKey() ? ["API key refused", "The saved key is not one of this server's: enter the right one."]
                    : ["API key needed", "This server needs an API key: enter it on the right."])
        : [`Server error ${resp.status}`, msg];
      box.innerHTML = "";
      const pill = document.createElement("span");
      pill.className = "pill bad"; pill.textContent = label;
      const hint = document.createElement("span");
      hint.className = "hint"; hint.textContent = text;
      box.append(pill, hint);
      return;
    }
    const card = body.data[0];
    box.innerHTML = "";
    const pill = (text, cls) => { const s = document.createElement("span"); s.className = "pill " + (cls || ""); s.textContent = text; box.append(s); };
    pill(card.id);
    if (card.version) pill(card.version);
    pill(card.dev_preset ? "DEV PRESET: outputs are noise" : (card.preset || "") + " weights", card.dev_preset ? "dev" : "");
    if (card.device) pill(card.device + (card.dtype ? " · " + card.dtype : ""));
    if (!card.ready) { pill("loading…", "bad"); modelTimer = setTimeout(loadModel, 2000); }
    $("dev-banner").hidden = !card.dev_preset;
  } catch (err) {
    box.textContent = "The server does not answer: " + err.message;
    modelTimer = setTimeout(loadModel, 5000);
  }
}

// --- picking / dropping the image -----------------------------------------------------------------------------------
function setFile(file) {
  if (!file) return;
  if (!/^image\//.test(file.type)) { showError(`"${file.name}" is not an image`); return; }
  state.file = file;
  if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
  state.originalUrl = URL.createObjectURL(file);
  const img = $("drop-preview");
  img.onload = () => { $("file-info").textContent = `${file.name} · ${img.naturalWidth}×${img.naturalHeight}`; };
  img.src = state.originalUrl;
  img.hidden = false;
  $("drop-text").hidden = true;
  hideError();
}
$("file").addEventListener("change", (e) => setFile(e.target.files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => { e.preventDefault(); setFile(e.dataTransfer.files[0]); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });

// --- errors and status ----------------------------------------------------------------------------------------------
function showError(message) { const box = $("error"); box.textContent = message; box.hidden = false; }
function hideError() { $("error").hidden = true; }
function setStatus(text) { $("status").textContent = text; }
// The timeline: what happened when, in words (the raw events stay in window.step1x.events).
function logEvent(ev, seconds, previews, seed) {
  const slim = {};
  for (const [k, v] of Object.entries(ev)) slim[k] = k === "b64_json" ? `(${v.length} chars)` : v;
  state.events.push(slim);
  const image = (i) => (state.imageCount > 1 ? ` (image ${i + 1})` : "");
  let text = "", cls = "";
  if (ev.type.endsWith(".progress")) {
    text = ev.step === 0 ? `Started: ${ev.total_steps} steps` : `Step ${ev.step} of ${ev.total_steps}`;
  } else if (ev.type.endsWith(".partial_image")) {
    text = `Preview ${ev.partial_image_index + 1} of ${previews}, at step ${ev.step}${image(ev.image_index)}`;
  } else if (ev.type.endsWith(".completed")) {
    text = `Done${image(ev.image_index)}: ${ev.size}, seed ${seed}`; cls = "done";
  } else {
    text = "Failed: " + (ev.error ? ev.error.message : "the stream broke off"); cls = "failed";
  }
  const li = document.createElement("li");
  if (cls) li.className = cls;
  const at = document.createElement("span");
  at.className = "at"; at.textContent = `${seconds.toFixed(1)} s`;
  const what = document.createElement("span");
  what.textContent = text;
  li.append(at, what);
  $("log").append(li);
  $("log-count").textContent = `(${state.events.length})`;
}

// --- before/after slider and outputs --------------------------------------------------------------------------------
function showCompare(afterUrl, label) {
  $("empty").hidden = true;
  $("compare").hidden = false;
  $("cmp-before").src = state.originalUrl;
  $("cmp-after").src = afterUrl;
  $("cmp-tag").textContent = label;
}
$("cmp-range").addEventListener("input", (e) => {
  const x = e.target.value;
  $("cmp-after-wrap").style.clipPath = `inset(0 0 0 ${x}%)`;
  $("cmp-line").style.left = x + "%";
});

const EXTENSIONS = { png: "png", jpeg: "jpg", webp: "webp" };  // output_format -> file extension

function b64ToBlobUrl(b64, format) {
  const raw = atob(b64.replace(/^data:[^,]*,/, ""));
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return URL.createObjectURL(new Blob([bytes], { type: `image/${format || "png"}` }));
}

function renderOutputs() {
  const box = $("outputs");
  box.innerHTML = "";
  state.results.forEach((r, i) => {
    const card = document.createElement("div");
    card.className = "card" + (i === state.selected ? " selected" : "");
    card.dataset.seed = r.seed;
    const img = document.createElement("img");
    img.src = r.url; img.alt = `result ${i + 1}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const seed = document.createElement("span");
    seed.className = "seed"; seed.textContent = `seed ${r.seed}`; seed.title = "click to reuse this seed";
    seed.addEventListener("click", (e) => { e.stopPropagation(); $("seed").value = r.seed; });
    const link = document.createElement("a");
    link.href = r.url; link.download = `step1x-edit-${r.seed}.${EXTENSIONS[r.format] || "png"}`; link.textContent = "Download";
    link.addEventListener("click", (e) => e.stopPropagation());
    meta.append(seed, link);
    card.append(img, meta);
    card.addEventListener("click", () => { state.selected = i; renderOutputs(); showCompare(r.url, `after · seed ${r.seed}`); });
    box.append(card);
  });
}

// --- one edit, streamed ---------------------------------------------------------------------------------------------
function readForm() {
  const fields = {
    model: MODEL, prompt: $("prompt").value, steps: $("steps").value, guidance_scale: $("guidance").value,
    strength: $("strength").value, seed: $("seed").value, n: $("n").value, partial_images: $("partial").value,
    negative_prompt: $("negative").value, size: $("size").value, output_format: $("format").value,
    response_format: "b64_json", stream: "true", stream_progress: "true",
  };
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  for (const [k, v] of Object.entries(fields)) if (v !== "" || k === "prompt") form.append(k, v);
  return form;
}

// Seeds go up to 2^63 - 1: JSON.parse would round them to a double, so they are read from the text.
function exactSeed(raw, parsed) {
  const m = /"seed"\s*:\s*(-?\d+)/.exec(raw);
  return m ? m[1] : String(parsed);
}

async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      let event = "message"; const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const val = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "event") event = val; else if (field === "data") data.push(val);
      }
      if (data.length) yield { event, raw: data.join("\n"), data: JSON.parse(data.join("\n")) };
    }
  }
}

async function runEdit(e) {
  e.preventDefault();
  hideError();
  if (!state.file) { showError("Pick or drop an image first."); return; }
  if (!$("prompt").value.trim()) { showError("Write an instruction first."); return; }
  state.results.forEach((r) => URL.revokeObjectURL(r.url));
  state.results = []; state.selected = 0; state.events = [];
  $("log").innerHTML = ""; $("log-count").textContent = "(0)";
  renderOutputs();
  const bar = $("progress");
  bar.max = 1; bar.value = 0;
  setStatus("Sending…");
  $("run").disabled = true; $("cancel").hidden = false;
  const controller = state.controller = new AbortController();
  const started = performance.now();
  let previewUrl = null;
  try {
    const resp = await fetch("/v1/images/edits", { method: "POST", body: readForm(), headers: authHeaders(),
                                                   signal: controller.signal });
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      const msg = (body && body.error && body.error.message) || `${resp.status} ${resp.statusText}`;
      showError(resp.status !== 401 ? msg : apiKey()
        ? "The API key was refused: check the one at the top right."
        : "This server needs an API key: enter it at the top right.");
      setStatus(`Failed (${resp.status}).`);
      return;
    }
    setStatus("Queued…");
    let finished = 0;
    const previews = +$("partial").value || 0;
    state.imageCount = +$("n").value || 1;
    for await (const { event, raw, data } of sseEvents(resp.body)) {
      logEvent(data, (performance.now() - started) / 1000, previews,
               data.type && data.type.endsWith(".completed") ? exactSeed(raw, data.seed) : null);
      if (event === "error" || data.type === "error") {
        showError(data.error ? data.error.message : "The stream failed");
        setStatus("Failed.");
        return;
      }
      if (data.type.endsWith(".progress")) {
        bar.max = Math.max(1, data.total_steps); bar.value = data.step;
        setStatus(data.step === 0 ? "Started…" : `Denoising: step ${data.step} of ${data.total_steps}`);
      } else if (data.type.endsWith(".partial_image")) {
        if (data.image_index === 0) {
          if (previewUrl) URL.revokeObjectURL(previewUrl);
          previewUrl = b64ToBlobUrl(data.b64_json, data.output_format);
          showCompare(previewUrl, `preview · step ${data.step}`);
        }
      } else if (data.type.endsWith(".completed")) {
        const url = b64ToBlobUrl(data.b64_json, data.output_format);
        const seed = exactSeed(raw, data.seed);
        state.results.push({ url, seed, size: data.size, index: data.image_index, format: data.output_format });
        if (state.results.length === 1) showCompare(url, `after · seed ${seed}`);
        renderOutputs();
        finished += 1;
        bar.value = bar.max;
        const secs = ((performance.now() - started) / 1000).toFixed(1);
        const seeds = state.results.map((r) => r.seed).join(", ");
        setStatus(`Done in ${secs} s · ${data.size} · seed ${seeds}`);
      }
    }
    if (!finished) { showError("The stream ended without a result."); setStatus("Failed."); }
  } catch (err) {
    if (err.name === "AbortError") setStatus("Cancelled.");
    else { showError("Request failed: " + err.message); setStatus("Failed."); }
  } finally {
    if (previewUrl && state.results.length) URL.revokeObjectURL(previewUrl);  // (kept on screen otherwise)
    state.controller = null;
    $("run").disabled = false; $("cancel").hidden = true;
  }
}
$("edit-form").addEventListener("submit", runEdit);
$("cancel").addEventListener("click", () => state.controller && state.controller.abort());

showKeyState();
loadModel();
