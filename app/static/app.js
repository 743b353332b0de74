// The demo page: every action is one or two calls of the public API (docs/api.md), answered at the upload's size.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SLOTS = ["content", "guide", "guide_b"];
const state = {
  models: [],           // GET /models' "models"
  slots: {},            // slot name -> {blob, name, url}
  active: "content",    // the slot a clicked sample goes into
  pairs: [],            // [{name, samples: [{url, label, name}]}]
  outputUrls: [],       // object URLs of the last result, revoked by the next
};

// --- talking to the API ---------------------------------------------------------------------------------------

class Problem extends Error {
  constructor(status, body) {
    const title = (body && body.title) || `HTTP ${status}`;
    const detail = (body && body.detail) || "";
    super(detail ? `${title}: ${detail}` : title);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.errors = (body && Array.isArray(body.errors)) ? body.errors : [];
  }
}

function headers() {
  const key = $("#api-key").value.trim();
  return key ? {"X-API-Key": key} : {};
}

// fetch() of an API path (relative, so the page also works under a proxy's prefix); a problem body becomes a Problem.
async function api(path, options = {}) {
  const response = await fetch(path, {...options, headers: {...headers(), ...(options.headers || {})}});
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = {title: `HTTP ${response.status}`, detail: response.statusText};
    }
    throw new Problem(response.status, body);
  }
  return response;
}

function xHeaders(response) {
  const out = {};
  response.headers.forEach((value, key) => {
    if (key.toLowerCase().startsWith("x-")) out[key.toLowerCase()] = value;
  });
  return out;
}

function currentModel() {
  return state.models.find((m) => m.name === $("#model").value) || null;
}

// --- models -----------------------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("#model");
  const previous = select.value;
  try {
    const data = await (await api("models")).json();
    state.models = Array.isArray(data.models) ? data.models : [];
    select.replaceChildren(...state.models.map((m) => {
      const option = new Option(`${m.name} (${m.domains.a} / ${m.domains.b}, ${m.variant})`, m.name);
      return option;
    }));
    const chosen = state.models.find((m) => m.name === previous) || state.models.find((m) => m.default)
      || state.models.find((m) => m.name === data.default) || state.models[0];
    if (chosen) select.value = chosen.name;
    clearError();
    onModelChange();
  } catch (e) {
    showError(e.status === 401 ? new Problem(401, {title: e.title, detail: `${e.detail.replace(/\.?$/, ".")} Enter it in the API key field above.`}) : e);
  }
}

function onModelChange() {
  const m = currentModel();
  if (!m) return;
  for (const select of document.querySelectorAll(".domain-select")) {
    for (const option of select.options) {
      if (option.value === "a" || option.value === "b") option.textContent = `${option.value}: ${m.domains[option.value]}`;
    }
  }
  for (const option of $("#space").options) {
    if (option.value === "a" || option.value === "b") option.textContent = `${option.value}: ${m.domains[option.value]}`;
  }
  const pair = state.pairs.find((p) => p.name === m.name.replace(/_mask$/, ""))
    || state.pairs.find((p) => p.name.includes(m.domains.a) && p.name.includes(m.domains.b));
  if (pair && $("#pair").value !== pair.name) {
    $("#pair").value = pair.name;
    renderGallery();
  }
}

// --- samples: examples/index.json names the pairs, examples/{pair}/index.json their samples ---------------------

function pairEntries(index) {
  let list = index;
  if (list && !Array.isArray(list) && typeof list === "object") list = list.pairs || list.examples || list;
  if (list && !Array.isArray(list) && typeof list === "object") {
    return Object.entries(list).map(([name, v]) => (v && typeof v === "object" && !Array.isArray(v)) ? {name, ...v} : {name});
  }
  if (!Array.isArray(list)) return [];
  return list.map((p) => (typeof p === "string" ? {name: p} : (p && typeof p === "object" ? p : null)))
    .filter((p) => p && typeof (p.name || p.pair || p.id || p.dir) === "string")
    .map((p) => ({...p, name: p.name || p.pair || p.id || p.dir}));
}

function sampleEntries(pair, listing) {
  const list = Array.isArray(listing) ? listing : (listing && (listing.samples || listing.images || listing.files)) || [];
  if (!Array.isArray(list)) return [];
  const dir = `examples/${encodeURIComponent(pair)}/`;
  return list.map((s) => (typeof s === "string" ? {file: s} : s))
    .filter((s) => s && typeof (s.file || s.path || s.image) === "string")
    .map((s) => {
      const file = s.file || s.path || s.image;
      const url = file.startsWith(`${pair}/`) ? `examples/${file}` : dir + file;
      const name = file.split("/").pop();
      const label = typeof s.label === "string" ? s.label : name.replace(/-\d+\.\w+$/, "");
      return {url, label, name};
    });
}

async function loadSamples() {
  let index;
  try {
    const response = await fetch("examples/index.json");
    if (!response.ok) throw new Error(`examples/index.json: HTTP ${response.status}`);
    index = await response.json();
  } catch (e) {
    $("#samples-empty").hidden = false;
    return;
  }
  const pairs = [];
  for (const entry of pairEntries(index)) {
    let listing = entry.samples ? entry : null;
    if (!listing) {
      try {
        const response = await fetch(`examples/${encodeURIComponent(entry.name)}/index.json`);
        listing = response.ok ? await response.json() : null;
      } catch (e) {
        listing = null;
      }
    }
    const samples = sampleEntries(entry.name, listing);
    if (samples.length) pairs.push({name: entry.name, samples});
  }
  state.pairs = pairs;
  if (!pairs.length) {
    $("#samples-empty").hidden = false;
    return;
  }
  $("#pair").replaceChildren(...pairs.map((p) => new Option(p.name, p.name)));
  $("#samples-controls").hidden = false;
  renderGallery();
  onModelChange();
}

function currentPair() {
  return state.pairs.find((p) => p.name === $("#pair").value) || state.pairs[0] || null;
}

function renderGallery() {
  const pair = currentPair();
  const gallery = $("#gallery");
  if (!pair) {
    gallery.replaceChildren();
    return;
  }
  gallery.replaceChildren(...pair.samples.map((s) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "sample";
    button.title = `${s.label} (${s.name}): put into the selected slot`;
    button.dataset.label = s.label;
    button.draggable = true;
    const img = document.createElement("img");
    img.src = s.url;
    img.alt = s.label;
    const caption = document.createElement("span");
    caption.textContent = s.label;
    button.append(img, caption);
    button.addEventListener("click", () => useSample(state.active, s).then(() => activate(nextSlot(state.active))));
    button.addEventListener("dragstart", (e) => e.dataTransfer.setData("application/x-did-sample", s.url));
    return button;
  }));
}

async function sampleBlob(sample) {
  const response = await fetch(sample.url);
  if (!response.ok) throw new Problem(response.status, {title: "Sample not found", detail: sample.url});
  return response.blob();
}

async function useSample(slot, sample) {
  try {
    setSlot(slot, await sampleBlob(sample), sample.name);
  } catch (e) {
    showError(e);
  }
}

// One click: content without either attribute, guide with domain a's, guide b with domain b's.
async function usePair() {
  const pair = currentPair();
  if (!pair) return;
  const m = currentModel();
  const parts = pair.name.split("_");
  const [a, b] = m && pair.samples.some((s) => s.label === m.domains.a) ? [m.domains.a, m.domains.b] : parts;
  const first = (label) => pair.samples.find((s) => s.label === label);
  const others = pair.samples.filter((s) => s.label !== "neither");
  const picks = {
    content: first("neither") || pair.samples[0],
    guide: first(a) || others[0] || pair.samples[0],
    guide_b: first(b) || others[1] || pair.samples[0],
  };
  await Promise.all(SLOTS.map((slot) => useSample(slot, picks[slot])));
  activate("content");
}

// --- slots ------------------------------------------------------------------------------------------------------

function slotElement(slot) {
  return document.querySelector(`.slot[data-slot="${slot}"]`);
}

function nextSlot(slot) {
  return SLOTS[(SLOTS.indexOf(slot) + 1) % SLOTS.length];
}

function activate(slot) {
  state.active = slot;
  for (const s of SLOTS) slotElement(s).classList.toggle("active", s === slot);
}

function setSlot(slot, blob, name) {
  const old = state.slots[slot];
  if (old) URL.revokeObjectURL(old.url);
  const url = URL.createObjectURL(blob);
  state.slots[slot] = {blob, name, url};
  const el = slotElement(slot);
  const img = el.querySelector("img");
  img.src = url;
  img.hidden = false;
  el.querySelector(".slot-name").textContent = name;
}

function setupSlots() {
  for (const slot of SLOTS) {
    const el = slotElement(slot);
    el.querySelector(".slot-title").addEventListener("click", () => activate(slot));
    el.querySelector("input[type=file]").addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) setSlot(slot, file, file.name);
    });
    el.addEventListener("dragover", (e) => {
      e.preventDefault();
      el.classList.add("dragging");
    });
    el.addEventListener("dragleave", () => el.classList.remove("dragging"));
    el.addEventListener("drop", (e) => {
      e.preventDefault();
      el.classList.remove("dragging");
      const file = e.dataTransfer.files[0];
      const sampleUrl = e.dataTransfer.getData("application/x-did-sample");
      if (file) {
        setSlot(slot, file, file.name);
      } else if (sampleUrl) {
        const sample = currentPair() && currentPair().samples.find((s) => s.url === sampleUrl);
        if (sample) useSample(slot, sample);
      }
    });
  }
  activate("content");
}

function need(...slots) {
  const missing = slots.filter((s) => !state.slots[s]);
  if (missing.length) {
    throw new Problem(0, {title: "Missing image", detail: `choose an image for: ${missing.join(", ")}`});
  }
  return slots.map((s) => state.slots[s]);
}

// --- results ----------------------------------------------------------------------------------------------------

function clearError() {
  const box = $("#error");
  box.hidden = true;
  box.replaceChildren();
}

function showError(e) {
  const box = $("#error");
  const title = document.createElement("strong");
  title.className = "problem-title";
  title.textContent = e instanceof Problem ? (e.status ? `${e.status} ${e.title}` : e.title) : "Error";
  const detail = document.createElement("p");
  detail.className = "problem-detail";
  detail.textContent = e instanceof Problem ? e.detail : String(e && e.message ? e.message : e);
  box.replaceChildren(title, detail);
  if (e instanceof Problem && e.errors.length) {
    const list = document.createElement("ul");
    for (const err of e.errors) {
      const item = document.createElement("li");
      item.textContent = `${(err.loc || []).join(".")}: ${err.msg || ""}`;
      list.append(item);
    }
    box.append(list);
  }
  box.hidden = false;
  $("#status").textContent = "";
}

function resetResult() {
  clearError();
  for (const url of state.outputUrls) URL.revokeObjectURL(url);
  state.outputUrls = [];
  for (const id of ["#input-figure", "#output-figure", "#overlay-figure", "#frames-figure"]) $(id).hidden = true;
  $("#output-image").removeAttribute("src");
  $("#meta").replaceChildren();
  $("#detected").textContent = "";
}

function showInputs(inputs) {
  $("#input-images").replaceChildren(...inputs.map(([label, slot]) => {
    const wrap = document.createElement("div");
    wrap.className = "input-image";
    const img = document.createElement("img");
    img.src = slot.url;
    img.alt = label;
    const caption = document.createElement("span");
    caption.textContent = label;
    wrap.append(img, caption);
    return wrap;
  }));
  $("#input-figure").hidden = false;
}

function showMeta(meta) {
  const dl = $("#meta");
  dl.replaceChildren();
  for (const [key, value] of Object.entries(meta)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.key = key;
    dl.append(dt, dd);
  }
  const detected = meta["x-detected-domain"];
  const score = meta["x-domain-score"];
  const ood = meta["x-out-of-domain"];
  const parts = [];
  if (detected) parts.push(`detected domain: ${detected}`);
  if (score) parts.push(`domain score ${score} (1 = the 99th percentile of training images)`);
  if (ood) parts.push(ood === "true" ? "OUT OF DOMAIN: the edit may be poor" : "in domain");
  $("#detected").textContent = parts.join("; ");
  $("#detected").classList.toggle("warning", ood === "true");
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Problem(0, {title: "Undecodable answer", detail: "the browser could not decode the image"}));
    img.src = url;
  });
}

async function showOutput(response, caption) {
  const url = URL.createObjectURL(await response.blob());
  state.outputUrls.push(url);
  $("#output-image").classList.toggle("strip", caption.startsWith("interpolation: "));
  await loadImage($("#output-image"), url);
  $("#output-caption").textContent = caption;
  $("#output-figure").hidden = false;
  return $("#output-image");
}

// The mask tints the image red where it is high: both at the upload's size (output=full).
async function drawOverlay(imageUrl, maskImg) {
  const image = await loadImage(new Image(), imageUrl);
  const canvas = $("#overlay");
  const [w, h] = [image.naturalWidth, image.naturalHeight];
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, w, h);
  const pixels = ctx.getImageData(0, 0, w, h);
  const scratch = document.createElement("canvas");
  scratch.width = w;
  scratch.height = h;
  const sctx = scratch.getContext("2d");
  sctx.drawImage(maskImg, 0, 0, w, h);
  const mask = sctx.getImageData(0, 0, w, h).data;
  const p = pixels.data;
  for (let i = 0; i < p.length; i += 4) {
    const m = 0.65 * mask[i] / 255;
    p[i] = p[i] * (1 - m) + 255 * m;
    p[i + 1] = p[i + 1] * (1 - m);
    p[i + 2] = p[i + 2] * (1 - m);
  }
  ctx.putImageData(pixels, 0, 0);
  canvas.dataset.drawn = "true";
  $("#overlay-figure").hidden = false;
}

// A strip of square frames side by side: the slider picks one.
function setupFrames(strip) {
  const size = strip.naturalHeight;
  const count = Math.max(1, Math.round(strip.naturalWidth / size));
  const canvas = $("#frame");
  canvas.width = canvas.height = size;
  const slider = $("#frame-slider");
  slider.max = String(count - 1);
  slider.value = "0";
  const draw = () => {
    const i = Number(slider.value);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, size, size);
    ctx.drawImage(strip, i * size, 0, size, size, 0, 0, size, size);
    $("#frame-index").textContent = `${i + 1} / ${count}`;
  };
  slider.oninput = draw;
  draw();
  $("#frames-figure").hidden = false;
}

// --- actions ----------------------------------------------------------------------------------------------------

function form(fields) {
  const body = new FormData();
  const m = currentModel();
  if (m) body.append("model", m.name);
  for (const [key, value] of Object.entries(fields)) {
    if (value === undefined || value === null || value === "") continue;
    if (value && value.blob) body.append(key, value.blob, value.name);
    else body.append(key, String(value));
  }
  return body;
}

const actions = {
  async transfer() {
    const [content, guide] = need("content", "guide");
    showInputs([["content", content], ["guide", guide]]);
    const response = await api("transfer", {method: "POST", body: form({
      content, guide, target: $("#target").value, strength: $("#strength").value, keep: $("#keep").checked ? "true" : "",
    })});
    showMeta(xHeaders(response));
    await showOutput(response, "transfer");
  },
  async intersection() {
    const [content, guideA, guideB] = need("content", "guide", "guide_b");
    showInputs([["content", content], ["guide a", guideA], ["guide b", guideB]]);
    const response = await api("transfer", {method: "POST", body: form({content, guide_a: guideA, guide_b: guideB})});
    showMeta(xHeaders(response));
    await showOutput(response, "intersection");
  },
  async remove() {
    const [image] = need("content");
    showInputs([["image", image]]);
    const response = await api("remove-attribute", {method: "POST", body: form({image, attribute: $("#remove-attribute").value})});
    showMeta(xHeaders(response));
    await showOutput(response, "removal");
  },
  async segment() {
    const [image] = need("content");
    showInputs([["image", image]]);
    const response = await api("segment", {method: "POST", body: form({image, attribute: $("#segment-attribute").value})});
    showMeta(xHeaders(response));
    const mask = await showOutput(response, "mask (white: the attribute)");
    await drawOverlay(image.url, mask);
  },
  async interpolate() {
    const [start, end] = need("content", "guide");
    showInputs([["start", start], ["end", end]]);
    const encode = async (slot) => (await api("encode", {method: "POST", body: form({image: slot})})).json();
    const [a, b] = await Promise.all([encode(start), encode(end)]);
    const gif = $("#as-gif").checked;
    const query = new URLSearchParams({start: a.id, end: b.id, space: $("#space").value, steps: $("#steps").value,
                                       format: gif ? "gif" : "png"});
    const response = await api(`interpolate?${query}`);
    const meta = xHeaders(response);
    meta["start detected_domain"] = a.detected_domain;
    meta["end detected_domain"] = b.detected_domain;
    for (const [what, e] of [["start", a], ["end", b]]) {
      if (e.domain_score !== null && e.domain_score !== undefined) meta[`${what} domain_score`] = e.domain_score.toFixed(2);
      if (e.out_of_domain !== null && e.out_of_domain !== undefined) meta[`${what} out_of_domain`] = String(e.out_of_domain);
    }
    showMeta(meta);
    const strip = await showOutput(response, gif ? "interpolation (animated)" : "interpolation: every frame");
    if (!gif) setupFrames(strip);
  },
};

async function run(name) {
  resetResult();
  $("#status").textContent = `${name}...`;
  document.body.classList.add("busy");
  try {
    await actions[name]();
    $("#status").textContent = `${name}: done`;
  } catch (e) {
    showError(e);
  } finally {
    document.body.classList.remove("busy");
  }
}

// --- start ------------------------------------------------------------------------------------------------------

function setup() {
  setupSlots();
  $("#model").addEventListener("change", onModelChange);
  $("#api-key").addEventListener("change", loadModels);
  $("#pair").addEventListener("change", renderGallery);
  $("#use-pair").addEventListener("click", usePair);
  $("#strength").addEventListener("input", () => { $("#strength-value").textContent = $("#strength").value; });
  for (const name of Object.keys(actions)) {
    $(`#do-${name}`).addEventListener("click", () => run(name));
  }
  Promise.all([loadModels(), loadSamples()]).then(() => { document.body.dataset.ready = "true"; });
}

setup();
