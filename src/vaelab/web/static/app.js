// The latent explorer page: plain browser JavaScript, no build step, no network beyond this server.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
  "#c7c7c7", "#dbdb8d", "#9edae5"];
const N_SAMPLES = 16;

const state = {
  run: null,       // run name, from ?run= or the server's default
  summary: null,
  map: null,       // points, labels, projection {mean, components}
  base: null,      // the sliders' centre (Array of D numbers)
  z: null,         // the vector shown in #decoded
  view: null,      // canvas transform: data -> pixels
  dots: null,      // offscreen canvas holding the scatter
};

const $ = (id) => document.getElementById(id);

function setStatus(text) { $("status").textContent = text; }

// The decoder panel's errors show beside it (the status line at the top is out of view below the map), and the
// picture they leave standing is dimmed: it no longer shows what the sliders say
function decoderMessage(text) {
  $("decoder-msg").textContent = text;
  $("decoded").classList.toggle("stale", text !== "");
  $("decoded-text").classList.toggle("stale", text !== "");
}

// A number box's value: NaN when it is empty (the browser empties one holding "abc"), where +"" read as 0
function numberIn(id) {
  const text = $(id).value.trim();
  return text === "" ? NaN : Number(text);
}

function apiUrl(path, params = {}) {
  const query = new URLSearchParams(params);
  if (state.run !== null) query.set("run", state.run);
  const qs = query.toString();
  return qs ? `${path}?${qs}` : path;
}

async function fetchOk(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {  // the browser's TypeError, "Failed to fetch": no answer at all
    throw new Error(`cannot reach the vaelab server at ${location.host} (stopped?): start \`vaelab serve\` ` +
      "again and reload this page");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON: keep the status */ }
    throw new Error(detail);
  }
  return response;
}

async function getJson(path, params) { return (await fetchOk(apiUrl(path, params))).json(); }

const isText = () => state.summary.kind === "text";
const item = () => (isText() ? "sentence" : "image");  // what one test example is called on the page

// Show what the API decodes in the place of an <img>: for image models a PNG, loaded via a blob so errors
// arrive as JSON messages, not broken images; for text models the sentences, in the list beside it.
async function show(img, path, params, attrs = {}) {
  const response = await fetchOk(apiUrl(path, params));
  let target = img;
  if (isText()) {
    target = $(`${img.id}-text`);
    const items = (await response.json()).sentences.map((sentence) => {
      const li = document.createElement("li");
      if (sentence) {
        li.textContent = sentence;  // text, never markup
      } else {  // an empty decode (an empty list item read as a blank bullet)
        const empty = document.createElement("em");
        empty.textContent = "(empty)";
        li.append(empty);
      }
      return li;
    });
    target.replaceChildren(...items);
  } else {
    const old = img.src;
    img.src = URL.createObjectURL(await response.blob());
    await img.decode();
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  }
  for (const [key, value] of Object.entries(attrs)) target.dataset[key] = value;
}

// ---- decoding, latest request wins: at most one request in flight, and only the newest waiting one
let pendingZ = null;
let decoding = false;

function requestDecode(z) {
  pendingZ = z.slice();
  if (!decoding) pumpDecode();
}

async function pumpDecode() {
  decoding = true;
  while (pendingZ !== null) {
    const z = pendingZ;
    pendingZ = null;
    const text = z.map((v) => +v.toPrecision(6)).join(",");
    try {
      await show($("decoded"), "api/decode", { z: text }, { z: text });
      $("z-text").textContent = `z = (${z.map((v) => v.toFixed(2)).join(", ")})`;
      drawMap(z);
      decoderMessage("");  // an earlier error no longer stands
    } catch (e) {
      decoderMessage(`decode: ${e.message}`);
    }
  }
  decoding = false;
}

// ---- the map: z = mean + p0 * c0 + p1 * c1 (the server's projection), and back by projecting
function toLatent(p) {
  const { mean, components } = state.map.projection;
  return mean.map((m, j) => m + p[0] * components[0][j] + p[1] * components[1][j]);
}

function toPlane(z) {
  const { mean, components } = state.map.projection;
  return [0, 1].map((k) => z.reduce((s, v, j) => s + (v - mean[j]) * components[k][j], 0));
}

function setUpMap() {
  const canvas = $("map");
  const ratio = window.devicePixelRatio || 1;
  const size = canvas.clientWidth || canvas.width;
  canvas.width = canvas.height = Math.round(size * ratio);
  const pts = state.map.points;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  // equal scale on both axes, so distances on the map are distances in the plane; a 1-D latent's strip has
  // rows of labels for its height, which is no distance, so each axis fills the canvas
  const strip = state.map.projection.dims === 1;
  const span = Math.max(x1 - x0, strip ? 0 : y1 - y0, 1e-6) * 1.15;
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const sx = canvas.width / span;
  const sy = strip ? canvas.height / (Math.max(y1 - y0, 1e-6) * 1.15) : sx;
  state.view = {
    strip,
    step: span / 50,  // one arrow key press on the map, in the plane's units

    toPx: (p) => [canvas.width / 2 + (p[0] - cx) * sx, canvas.height / 2 - (p[1] - cy) * sy],
    fromPx: (px, py) => [cx + (px - canvas.width / 2) / sx, cy - (py - canvas.height / 2) / sy],
  };
  const dots = document.createElement("canvas");
  dots.width = canvas.width; dots.height = canvas.height;
  const ctx = dots.getContext("2d");
  const r = Math.max(1.5, 2 * ratio);
  pts.forEach((p, i) => {
    const label = state.map.labels ? state.map.labels[i] : 0;
    ctx.fillStyle = colourOf(label);
    ctx.globalAlpha = 0.75;
    const [px, py] = state.view.toPx(p);
    ctx.beginPath();
    const shape = shapeOf(label);
    if (shape === 0) {
      ctx.arc(px, py, r, 0, 2 * Math.PI);
    } else if (shape === 1) {
      ctx.rect(px - r, py - r, 2 * r, 2 * r);
    } else {
      ctx.moveTo(px, py - 1.3 * r); ctx.lineTo(px + 1.2 * r, py + r); ctx.lineTo(px - 1.2 * r, py + r);
    }
    ctx.fill();
  });
  state.dots = dots;
  drawLegend();
}

// a label's colour, and past the palette's 20 colours its shape (circle, square, triangle): label 20 was label 0
const colourOf = (label) => PALETTE[((label % PALETTE.length) + PALETTE.length) % PALETTE.length];
const shapeOf = (label) => Math.floor(Math.abs(label) / PALETTE.length) % 3;

function drawLegend() {
  const legend = $("legend");
  legend.replaceChildren();
  const { labels, classes } = state.map;
  if (!labels) return;
  for (const label of [...new Set(labels)].sort((a, b) => a - b)) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = colourOf(label);
    swatch.className = `shape-${shapeOf(label)}`;
    item.append(swatch, classes && classes[label] !== undefined ? classes[label] : String(label));
    legend.append(item);
  }
}

function drawMap(hoverZ) {
  const canvas = $("map");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(state.dots, 0, 0);
  const mark = (z, colour, size) => {
    const [px, py] = state.view.toPx(toPlane(z));
    ctx.strokeStyle = colour; ctx.lineWidth = 2;
    ctx.beginPath();
    if (state.view.strip) {  // a code of a 1-D latent is a column of the strip, whatever the row
      ctx.moveTo(px, 0); ctx.lineTo(px, canvas.height);
    } else {
      ctx.moveTo(px - size, py); ctx.lineTo(px + size, py);
      ctx.moveTo(px, py - size); ctx.lineTo(px, py + size);
    }
    ctx.stroke();
  };
  if (state.base) mark(state.base, "#000", 9);
  if (hoverZ) mark(hoverZ, "#e00", 6);
}

function eventToLatent(event) {
  const canvas = $("map");
  const rect = canvas.getBoundingClientRect();
  const px = (event.clientX - rect.left) * (canvas.width / rect.width);
  const py = (event.clientY - rect.top) * (canvas.height / rect.height);
  return toLatent(state.view.fromPx(px, py));
}

// ---- sliders around the base vector
function setBase(z, description) {
  state.base = z.slice();
  state.z = z.slice();
  $("base-text").textContent = description;
  buildSliders();
  requestDecode(state.z);
}

function buildSliders() {
  const { dims, span, kl } = state.summary.sliders;
  const box = $("sliders");
  box.replaceChildren();
  dims.forEach((d, i) => {
    const row = document.createElement("label");
    const name = document.createElement("span");
    name.textContent = kl ? `z${d} · KL ${kl[i].toFixed(2)}` : `z${d}`;
    const input = document.createElement("input");
    input.type = "range";
    input.dataset.dim = d;
    input.min = state.base[d] - span[i];
    input.max = state.base[d] + span[i];
    input.step = span[i] / 50;
    input.value = state.base[d];
    const value = document.createElement("span");
    value.className = "value";
    value.setAttribute("aria-hidden", "true");  // the slider says it (aria-valuetext), not 15 digits of it
    const say = (v) => { value.textContent = v.toFixed(2); input.setAttribute("aria-valuetext", v.toFixed(2)); };
    say(+input.value);
    input.addEventListener("input", () => {
      state.z[d] = +input.value;
      say(state.z[d]);
      requestDecode(state.z);
    });
    row.append(name, input, value);
    box.append(row);
  });
}

async function chooseTestImage(index) {
  const n = state.summary.n_test;
  if (!(Number.isInteger(index) && index >= 0 && index < n)) {
    decoderMessage(`test ${item()} index must be 0..${n - 1}`);
    return;
  }
  try {
    const enc = await getJson(`api/encoding/${index}`);
    const label = enc.label === null ? "" : ` (${className(enc.label)})`;
    setBase(enc.z, `the encoding of test ${item()} ${index}${label}`);
    await show($("recon"), `api/reconstruct/${index}`, {}, { index: String(index) });
    decoderMessage("");
  } catch (e) {
    decoderMessage(`test ${item()}: ${e.message}`);
  }
}

function className(label) {
  const classes = state.summary.classes;
  return classes && classes[label] !== undefined ? classes[label] : String(label);
}

// ---- interpolation and samples
async function interpolate() {
  const a = numberIn("interp-a"), b = numberIn("interp-b"), n = numberIn("interp-n");
  const last = state.summary.n_test - 1;
  const msg = $("interp-msg");
  if (![a, b].every((i) => Number.isInteger(i) && i >= 0 && i <= last)) {
    msg.textContent = `indices must be whole numbers 0..${last}`;
    return;
  }
  if (!(Number.isInteger(n) && n >= 2 && n <= 32)) { msg.textContent = "frames must be 2..32"; return; }
  try {
    await show($("interp-strip"), "api/interpolate", { a, b, n }, { frames: String(n) });
    msg.textContent = `${n} ${isText() ? "greedy decodes" : "frames decoded"} between the ` +
      `encodings of test ${item()}s ${a} and ${b}`;
  } catch (e) {
    msg.textContent = e.message;
  }
}

async function resample() {
  const msg = $("samples-msg");
  if (!state.summary.has_prior) {
    msg.textContent = `This ${state.summary.model} model is not sampled from; only a VAE generates ` +
      `new ${item()}s. The map and the decoder still work.`;
    $("resample").disabled = true;
    $("samples").hidden = true;
    return;
  }
  const seed = crypto.getRandomValues(new Uint32Array(1))[0];
  const params = { n: N_SAMPLES, seed };
  if (state.summary.temperature) params.t = $("temperature").value;
  try {
    await show($("samples"), "api/samples", params, { seed: String(seed) });
    msg.textContent = isText() ? `seed ${seed}; z ~ p(z), decoded greedily` : `seed ${seed}`;
  } catch (e) {
    msg.textContent = e.message;
  }
}

// ---- metrics
function fmt(v, digits = 2) {
  if (v === undefined || v === null) return null;
  return Number.isInteger(v) ? String(v) : v.toFixed(digits);
}

function showMetrics() {
  const s = state.summary, m = s.metrics, last = s.last_epoch || {};
  const rows = [
    [s.nll_exact ? "test −log p(x), nats (exact; a density: PCA's Gaussian)"
      : s.nll_density ? "test −log p(x), nats (a density: Gaussian likelihood)" : "test NLL (nats)", m.nll !== undefined ? fmt(m.nll) + (m.nll_stderr !== undefined ? ` ± ${fmt(m.nll_stderr)}` : "") : null],
    ["NLL, bits/dim", fmt(m.nll_bits_per_dim, 4)],
    ["test ELBO", fmt(m.test_elbo)],
    ["reconstruction", fmt(m.test_recon)],
    ["KL(q(z|x) ‖ p(z))", s.has_prior ? fmt(m.test_kl !== undefined ? m.test_kl : last.val_kl) : null],
    ["active units", m.active_units !== undefined ? `${m.active_units} of ${s.latent_dim}` : null],
    ["I(x; z), nats", m.mutual_information === undefined ? null : m.mutual_information_upper === undefined
      ? `≥ ${fmt(m.mutual_information)}` : `${fmt(m.mutual_information)} to ${fmt(m.mutual_information_upper)}`],
    ["probe accuracy", fmt(m.probe_accuracy_latent, 3)],
    ["sq. error / image", fmt(m.sse_per_image)],
    ["validation loss", fmt(last.val_loss)],
    ["epochs", s.epoch !== null ? String(s.epoch) : null],
  ];
  const dl = $("metrics");
  dl.replaceChildren();
  for (const [name, value] of rows) {
    if (value === null) continue;
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name; dd.textContent = value;
    dl.append(dt, dd);
  }
  $("metrics-note").textContent = m.nll === undefined && s.has_nll  // (autoencoders have no NLL)
    ? `No NLL yet: run \`${s.nll_command}\` and reload.` : "";
}

// ---- start
async function chooseRun() {
  const listing = await getJson("api/runs");
  const asked = new URLSearchParams(location.search).get("run");
  const names = listing.runs.map((r) => r.name);
  state.run = names.includes(asked) ? asked : listing.default;
  if (names.length > 1) {
    const select = $("run");
    for (const name of names) select.append(new Option(name, name, false, name === state.run));
    // loaded on "show" or Enter, not on change: arrow keys on the list changed it, loading every run they passed
    const go = () => { location.search = new URLSearchParams({ run: select.value }); };
    $("run-go").addEventListener("click", go);
    select.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    $("run-choice").hidden = false;
  }
}

function pin(z) {
  const p = toPlane(z).slice(0, state.view.strip ? 1 : 2).map((v) => v.toFixed(2)).join(", ");
  setBase(z, `the map point (${p})`);
}

// the map from the keyboard: arrows move a cursor in the plane (Shift: ten times as far) and decode it, Enter or
// Space pins it as the sliders' centre, Escape goes back to the vector of the sliders (as leaving it with the mouse)
function mapKey(e) {
  const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] };
  if (moves[e.key]) {
    const step = state.view.step * (e.shiftKey ? 10 : 1);
    const [dx, dy] = moves[e.key];
    state.cursor = state.cursor || toPlane(state.z);
    state.cursor = [state.cursor[0] + dx * step, state.view.strip ? state.cursor[1] : state.cursor[1] + dy * step];
    requestDecode(toLatent(state.cursor));
  } else if ((e.key === "Enter" || e.key === " ") && state.cursor) {
    pin(toLatent(state.cursor));
  } else if (e.key === "Escape") {
    state.cursor = null;
    requestDecode(state.z);
  } else {
    return;
  }
  e.preventDefault();  // (arrows and Space would scroll the page)
}

function wire() {
  const canvas = $("map");
  canvas.addEventListener("mousemove", (e) => requestDecode(eventToLatent(e)));
  canvas.addEventListener("mouseleave", () => requestDecode(state.z));
  canvas.addEventListener("click", (e) => pin(eventToLatent(e)));
  canvas.addEventListener("keydown", mapKey);
  canvas.addEventListener("blur", () => { state.cursor = null; });
  $("base-index").addEventListener("change", () => chooseTestImage(numberIn("base-index")));
  $("base-reset").addEventListener("click", () => setBase(state.base, $("base-text").textContent));
  // forms: Enter in a number box does what the button does
  $("interp-form").addEventListener("submit", (e) => { e.preventDefault(); interpolate(); });
  $("samples-form").addEventListener("submit", (e) => { e.preventDefault(); resample(); });
}

async function main() {
  try {
    await chooseRun();
    [state.summary, state.map] = await Promise.all([getJson("api/summary"), getJson("api/map")]);
  } catch (e) {  // nothing works without them: say so, rather than leave controls that do nothing
    setStatus(e.message);
    $("summary").textContent = "not loaded";
    for (const control of document.querySelectorAll("main button, main input")) control.disabled = true;
    $("map").tabIndex = -1;
    return;
  }
  const s = state.summary;
  $("summary").textContent = `${s.run}: ${s.model} on ${s.data}, ${s.latent_dim}-d latent, ` +
    `${s.n_test} test ${item()}s`;
  if (isText()) {  // sentences in the pictures' places
    for (const id of ["decoded", "recon", "interp-strip", "samples"]) {
      $(id).hidden = true;
      $(`${id}-text`).hidden = false;
    }
    for (const span of document.querySelectorAll(".item")) span.textContent = "sentence";
    $("base-index").setAttribute("aria-label", "test sentence number");
  }
  document.title = `vaelab explorer: ${s.run}`;
  const last = s.n_test - 1;
  for (const id of ["base-index", "interp-a", "interp-b"]) $(id).max = last;
  $("interp-b").value = Math.min(1, last);
  $("map-note").textContent = (state.map.projection.kind === "pca"
    ? `The ${s.latent_dim}-d test encodings projected on their first two principal components; a point ` +
      "decodes as the mean code plus that offset in the plane. "
    : state.map.projection.dims === 1
      ? "The 1-d test encodings across, one row per label (the height is only the label). "
      : "The test encodings as they are. ") + "Hover to decode any point; click to centre the sliders there " +
    "(from the keyboard: the arrow keys move a cursor, Enter centres the sliders on it).";
  $("temperature-choice").hidden = !s.temperature;
  showMetrics();
  setUpMap();
  drawMap(null);
  wire();
  await Promise.all([chooseTestImage(0), interpolate(), resample()]);
  document.body.dataset.ready = "true";
}

main();
