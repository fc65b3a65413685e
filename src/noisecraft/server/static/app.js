// The noisecraft web page: a form over the AUTOMATIC1111-style /sdapi/v1 endpoints.
// No framework, no build step: one file, a handful of functions.
"use strict";

const API = "sdapi/v1/"; // relative, so the page also works below a path prefix
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ talking to the server

// The server's own message for a refused request: A1111's {"detail": "..."} or
// {"error", "errors"}, or FastAPI's validation list [{"loc": [...], "msg": "..."}].
function errorMessage(status, body) {
  const detail = body && (body.detail ?? body.errors ?? body.error);
  let text;
  if (Array.isArray(detail)) {
    text = detail
      .map((d) => (d.loc ? d.loc.filter((p) => p !== "body").join(".") + ": " : "") + (d.msg ?? JSON.stringify(d)))
      .join("; ");
  } else if (typeof detail === "string") {
    text = detail;
  } else {
    text = detail ? JSON.stringify(detail) : "";
  }
  return `the server refused the request (${status}): ${text || "no detail given"}`;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(API + path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!response.ok) throw new Error(errorMessage(response.status, data));
  return data;
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? String(err.message ?? err) : "";
  box.hidden = !err;
}

// ------------------------------------------------------------------ pickers

function fillSelect(select, values, keep) {
  for (const [value, label] of values) select.add(new Option(label, value));
  if (keep !== undefined) select.value = keep;
}

async function loadPickers() {
  const [samplers, models, options, loras, embeddings] = await Promise.all([
    api("samplers"), api("sd-models"), api("options"), api("loras"), api("embeddings"),
  ]);
  // "" = the server's default sampler (the engine's, with its own schedule)
  fillSelect($("sampler"), [["", "(default)"], ...samplers.map((s) => [s.name, s.name])]);
  fillSelect($("model"), models.map((m) => [m.title, m.model_name || m.title]),
    options.sd_model_checkpoint);
  fillSelect($("lora"), loras.map((l) => [l.name, l.alias || l.name]));
  fillEmbeddings(embeddings);
  try { // A1111 >= 1.9 lists schedule types separately; older servers have none
    const schedulers = await api("schedulers");
    fillSelect($("scheduler"), schedulers.map((s) => [s.label ?? s.name, s.label ?? s.name]));
    $("scheduler-label").hidden = false;
  } catch { /* no such endpoint: the schedule is part of the sampler name */ }
}

// The embeddings are the loaded model's: listed again after a model switch.
function fillEmbeddings(embeddings) {
  const select = $("embedding");
  select.length = 1; // keep the placeholder
  fillSelect(select, Object.keys(embeddings.loaded || {}).map((n) => [n, n]));
}

function insertIntoPrompt(text) {
  const prompt = $("prompt");
  const sep = prompt.value && !prompt.value.endsWith(" ") ? " " : "";
  prompt.value += sep + text;
}

// ------------------------------------------------------------------ source image and mask

let source = null; // {image, base64} of the img2img source, or null
let maskDrawn = false;

function setSource(dataUrl) {
  const image = new Image();
  image.onload = () => {
    source = { image, base64: dataUrl.split(",")[1] };
    for (const id of ["image-canvas", "mask-canvas"]) {
      const c = $(id);
      c.width = image.naturalWidth;
      c.height = image.naturalHeight;
    }
    $("image-canvas").getContext("2d").drawImage(image, 0, 0);
    $("brush").value = Math.max(1, Math.round(Math.min(image.naturalWidth, image.naturalHeight) / 8));
    clearMask();
    $("canvas-box").hidden = $("mask-tools").hidden = false;
    $("width").value = image.naturalWidth;
    $("height").value = image.naturalHeight;
  };
  image.src = dataUrl;
}

function clearSource() {
  source = null;
  $("init-file").value = "";
  $("canvas-box").hidden = $("mask-tools").hidden = true;
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  maskDrawn = false;
}

let lastPoint = null; // where the brush was at the previous pointer event of a stroke

function paint(event) {
  const c = $("mask-canvas");
  const box = c.getBoundingClientRect();
  const point = [
    ((event.clientX - box.left) / box.width) * c.width,
    ((event.clientY - box.top) / box.height) * c.height,
  ];
  const ctx = c.getContext("2d");
  ctx.strokeStyle = "#e0407a";
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...(lastPoint || point));
  ctx.lineTo(...point);
  ctx.stroke();
  lastPoint = point;
  maskDrawn = true;
}

// The mask as A1111 takes it: a PNG of the image's size, white where to repaint.
function maskBase64() {
  const drawn = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = drawn.width;
  out.height = drawn.height;
  const ctx = out.getContext("2d");
  ctx.drawImage(drawn, 0, 0); // the strokes, in their display colour
  ctx.globalCompositeOperation = "source-in"; // -> white, keeping their coverage
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over"; // black behind them
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  return out.toDataURL("image/png").split(",")[1];
}

// ------------------------------------------------------------------ generating

function payload() {
  const num = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: num("steps"),
    cfg_scale: num("cfg_scale"),
    seed: num("seed"),
    width: num("width"),
    height: num("height"),
    batch_size: num("batch_size"),
    n_iter: 1,
  };
  if ($("sampler").value) {
    body.sampler_name = $("sampler").value;
    if (!$("scheduler-label").hidden) body.scheduler = $("scheduler").value;
  }
  if (source) {
    body.init_images = [source.base64];
    body.denoising_strength = num("strength");
    if (maskDrawn) {
      body.mask = maskBase64();
      body.mask_blur = num("mask_blur");
      body.inpainting_fill = 1; // start from the original picture under the mask
      body.inpaint_full_res = false; // the whole picture, not only the masked part
    }
  }
  return body;
}

let polling = null; // the interval timer while a request runs

async function pollProgress() {
  try {
    const p = await api("progress?skip_current_image=false");
    if (!polling) return; // the request ended while this poll was under way
    $("progress").value = p.progress || 0;
    const s = p.state || {};
    $("progress-text").textContent = s.sampling_steps
      ? `step ${s.sampling_step} of ${s.sampling_steps}` + (s.job_count > 1 ? ` (job ${s.job_no + 1} of ${s.job_count})` : "")
      : p.textinfo || "";
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } catch { /* a missed poll is not worth an error message */ }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  clearInterval(polling);
  polling = busy ? setInterval(pollProgress, 250) : null;
  if (busy) {
    $("progress").value = 0;
    $("progress-text").textContent = "waiting for the server…";
    $("preview").hidden = true; // until the server has a preview of this run
  }
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  setBusy(true);
  const body = payload();
  try {
    const result = await api(source ? "img2img" : "txt2img", body);
    let info = {};
    try { info = JSON.parse(result.info || "{}"); } catch { /* keep {} */ }
    const infotexts = info.infotexts || [];
    for (const [i, image] of (result.images || []).entries()) {
      addResult(image, infotexts[i] ?? (await pngInfo(image)));
      $("preview").src = "data:image/png;base64," + image; // the newest result, large
      $("preview").hidden = false;
    }
    $("progress").value = 1;
    const count = (result.images || []).length;
    $("progress-text").textContent = info.interrupted
      ? `interrupted: ${count} finished image(s)`
      : `done: ${count} image(s)`;
  } catch (err) {
    showError(err);
    $("progress-text").textContent = "";
  } finally {
    setBusy(false);
  }
}

async function pngInfo(base64) {
  try { return (await api("png-info", { image: base64 })).info || ""; } catch { return ""; }
}

function addResult(base64, infotext) {
  const figure = $("result-template").content.firstElementChild.cloneNode(true);
  const url = "data:image/png;base64," + base64;
  figure.querySelector("img").src = url;
  figure.querySelector(".infotext").textContent = infotext;
  figure.querySelector(".reuse").onclick = () => reuse(infotext);
  figure.querySelector(".to-source").onclick = () => setSource(url);
  $("gallery").prepend(figure);
}

// ------------------------------------------------------------------ reusing an infotext

// A1111's infotext: the prompt lines, "Negative prompt: ..." lines, then one line of
// "Key: value" pairs (a value holding a comma is a JSON string).
function parseInfotext(text) {
  const lines = text.trim().split("\n");
  const params = {};
  const re = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
  const last = lines[lines.length - 1] || "";
  const pairs = [...last.matchAll(re)];
  if (pairs.length >= 3) {
    lines.pop();
    for (const [, key, value] of pairs) {
      params[key.trim()] = value.startsWith('"') ? JSON.parse(value) : value.trim();
    }
  }
  const neg = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  const promptLines = neg < 0 ? lines : lines.slice(0, neg);
  params.prompt = promptLines.join("\n");
  params.negative = neg < 0 ? "" : lines.slice(neg).join("\n").slice("Negative prompt:".length).trim();
  return params;
}

function selectIfPresent(select, value) {
  if ([...select.options].some((o) => o.value === value)) {
    select.value = value;
    return true;
  }
  return false;
}

function reuse(infotext) {
  const p = parseInfotext(infotext);
  $("prompt").value = p.prompt;
  $("negative_prompt").value = p.negative;
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("steps", "Steps");
  set("cfg_scale", "CFG scale");
  set("seed", "Seed");
  set("strength", "Denoising strength");
  if (p.Size) [$("width").value, $("height").value] = p.Size.split("x");
  if (p.Sampler) {
    const schedule = p["Schedule type"];
    // an older A1111 names "DPM++ 2M Karras"; a newer one has a schedule picker
    if (!(schedule && selectIfPresent($("sampler"), `${p.Sampler} ${schedule}`))) {
      selectIfPresent($("sampler"), p.Sampler);
      if (!$("scheduler-label").hidden) selectIfPresent($("scheduler"), schedule || "Automatic");
    }
  }
  window.scrollTo(0, 0);
}

// ------------------------------------------------------------------ wiring

function init() {
  $("form").addEventListener("submit", generate);
  $("interrupt").onclick = () => api("interrupt", {}).catch(showError);
  $("model").onchange = () => {
    showError(null);
    api("options", { sd_model_checkpoint: $("model").value })
      .then(() => api("embeddings"))
      .then(fillEmbeddings)
      .catch(showError);
  };
  for (const id of ["lora", "embedding"]) {
    $(id).onchange = () => {
      const name = $(id).value;
      if (name) insertIntoPrompt(id === "lora" ? `<lora:${name}:1>` : name);
      $(id).value = "";
    };
  }
  $("init-file").onchange = () => {
    const file = $("init-file").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => setSource(reader.result);
    reader.readAsDataURL(file);
  };
  $("clear-source").onclick = clearSource;
  $("clear-mask").onclick = clearMask;
  const canvas = $("mask-canvas");
  canvas.onpointerdown = (e) => { canvas.setPointerCapture(e.pointerId); lastPoint = null; paint(e); };
  canvas.onpointermove = (e) => { if (e.buttons & 1) paint(e); };
  canvas.onpointerup = () => { lastPoint = null; };
  loadPickers().catch(showError);
}

init();
