// DiffPano tour viewer: perspective views of equirectangular panoramas (docs/geometry.md conventions), no dependencies.
"use strict";

// Wide enough at the start to recognise the room; zoom stops where a panorama texel would cover more than
// MAX_PIXELS_PER_TEXEL canvas pixels at the centre (small panoramas then stay wide).
const FOV_START = 110, FOV_MAX = 120, FOV_FLOOR = 30, MAX_PIXELS_PER_TEXEL = 4;
const state = { views: [], index: 0, yaw: 0, pitch: 0, fov: FOV_START, pixels: [], sizes: [] };
const canvas = document.getElementById("view");
const ctx = canvas.getContext("2d");
const $ = (id) => document.getElementById(id);

function setStatus(text) { $("status").textContent = text; }

function headers() {
  const key = $("key").value || sessionStorage.getItem("diffpano-key") || "";
  if ($("key").value) sessionStorage.setItem("diffpano-key", $("key").value);
  const h = { "Content-Type": "application/json" };
  if (key) h["X-API-Key"] = key;
  return h;
}

// Decode each view's PNG into an ImageData we can sample from.
async function decodeViews(views) {
  const out = [];
  for (const v of views) {
    const img = new Image();
    img.src = "data:image/png;base64," + v.image_png_base64;
    await img.decode();
    const c = document.createElement("canvas");
    c.width = img.width; c.height = img.height;
    const cx = c.getContext("2d");
    cx.drawImage(img, 0, 0);
    out.push(cx.getImageData(0, 0, img.width, img.height));
  }
  return out;
}

// The narrowest field of view (degrees) the current panorama's resolution supports on this canvas.
function minFov() {
  const src = state.pixels[state.index];
  if (!src) return FOV_FLOOR;
  const fMax = MAX_PIXELS_PER_TEXEL * src.width / (2 * Math.PI);  // canvas pixels per radian at the limit
  const fov = (2 * Math.atan((canvas.width / 2) / fMax) * 180) / Math.PI;
  return Math.max(FOV_FLOOR, Math.min(FOV_MAX, fov));
}

function zoomTo(fov) { state.fov = Math.max(minFov(), Math.min(FOV_MAX, fov)); }

async function showTour(tour) {
  state.views = tour.views;
  state.pixels = await decodeViews(tour.views);
  state.index = 0;
  $("tourid").value = tour.tour_id;
  zoomTo(FOV_START);
  setStatus(`${tour.tour_id}: ${tour.views.length} views (${tour.model})`);
  draw();
}

// Render the current view: per canvas pixel, a camera ray (x right, y down, z forward) rotated by yaw and
// pitch, then longitude atan2(x, z) and latitude asin(-y) index the panorama.
function draw() {
  const w = canvas.width, h = canvas.height;
  const out = ctx.createImageData(w, h);
  const src = state.pixels[state.index];
  if (!src) { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h); return; }
  const f = (w / 2) / Math.tan((state.fov * Math.PI) / 360);
  const cy = Math.cos(state.yaw), sy = Math.sin(state.yaw), cp = Math.cos(state.pitch), sp = Math.sin(state.pitch);
  const W = src.width, H = src.height, data = src.data, o = out.data;
  for (let j = 0; j < h; j++) {
    for (let i = 0; i < w; i++) {
      const x = i + 0.5 - w / 2, y = j + 0.5 - h / 2, z = f;
      const y1 = y * cp - z * sp, z1 = y * sp + z * cp;          // pitch about x
      const x2 = x * cy + z1 * sy, z2 = -x * sy + z1 * cy;        // yaw about y
      const n = Math.hypot(x2, y1, z2);
      const lon = Math.atan2(x2, z2), lat = Math.asin(-y1 / n);
      // Bilinear filtering between texel centres: columns wrap (the seam is continuous), rows clamp at the poles.
      const uf = ((lon + Math.PI) / (2 * Math.PI)) * W - 0.5, vf = ((Math.PI / 2 - lat) / Math.PI) * H - 0.5;
      const u0 = Math.floor(uf), v0 = Math.floor(vf), fu = uf - u0, fv = vf - v0;
      const ua = ((u0 % W) + W) % W, ub = (ua + 1) % W;
      const va = Math.max(0, Math.min(H - 1, v0)), vb = Math.max(0, Math.min(H - 1, v0 + 1));
      const s00 = (va * W + ua) * 4, s01 = (va * W + ub) * 4, s10 = (vb * W + ua) * 4, s11 = (vb * W + ub) * 4;
      const w00 = (1 - fu) * (1 - fv), w01 = fu * (1 - fv), w10 = (1 - fu) * fv, w11 = fu * fv;
      const d = (j * w + i) * 4;
      for (let c = 0; c < 3; c++) {
        o[d + c] = w00 * data[s00 + c] + w01 * data[s01 + c] + w10 * data[s10 + c] + w11 * data[s11 + c];
      }
      o[d + 3] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
  $("overview").src = "data:image/png;base64," + state.views[state.index].image_png_base64;
  $("overview").hidden = false;
  $("index").textContent = `view ${state.index + 1} / ${state.views.length}`;
  $("prompt").textContent = state.views[state.index].prompt;
}

async function request(method, url, body) {
  const res = await fetch(url, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  const data = await res.json();
  if (!res.ok) throw new Error(`${res.status}: ${JSON.stringify(data.detail)}`);
  return data;
}

async function generate() {
  const prompt = $("text").value || $("text").placeholder;
  setStatus("generating…");
  try {
    const res = await fetch("/v1/tours", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ prompt, num_views: Number($("views").value), num_inference_steps: Number($("steps").value),
                             stream: true }),
    });
    if (!res.ok) throw new Error(`${res.status}: ${JSON.stringify((await res.json()).detail)}`);
    await readEvents(res, {
      progress: (p) => {
        setStatus(`step ${p.step} / ${p.steps}`);
        if (p.preview_png_base64) {
          $("overview").src = "data:image/png;base64," + p.preview_png_base64;
          $("overview").hidden = false;
        }
      },
      tour: (tour) => showTour(tour),
      error: (e) => { throw new Error(`${e.status}: ${JSON.stringify(e.detail)}`); },
    });
  } catch (err) { setStatus(String(err)); }
}

// Server-sent events of a fetch response (EventSource cannot POST): each "event: NAME / data: JSON" block in turn.
async function readEvents(res, handlers) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = /^event: (.*)$/m.exec(block)?.[1];
      const data = /^data: (.*)$/m.exec(block)?.[1];
      if (name && data && handlers[name]) await handlers[name](JSON.parse(data));
    }
  }
}

async function load(id) {
  setStatus(`loading ${id}…`);
  try { await showTour(await request("GET", `/v1/tours/${encodeURIComponent(id)}`)); }
  catch (err) { setStatus(String(err)); }
}

let drag = null;
canvas.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY }; canvas.setPointerCapture(e.pointerId); });
canvas.addEventListener("pointerup", () => { drag = null; });
canvas.addEventListener("pointermove", (e) => {
  if (!drag) return;
  const scale = (state.fov * Math.PI) / 180 / canvas.clientWidth;
  state.yaw -= (e.clientX - drag.x) * scale;
  state.pitch = Math.max(-1.5, Math.min(1.5, state.pitch - (e.clientY - drag.y) * scale));
  drag = { x: e.clientX, y: e.clientY };
  draw();
});
canvas.addEventListener("wheel", (e) => { e.preventDefault(); zoomTo(state.fov + e.deltaY * 0.05); draw(); });
$("prev").onclick = () => { if (state.views.length) { state.index = (state.index + state.views.length - 1) % state.views.length; draw(); } };
$("next").onclick = () => { if (state.views.length) { state.index = (state.index + 1) % state.views.length; draw(); } };
$("generate").onclick = generate;
$("load").onclick = () => load($("tourid").value);
window.diffpanoViewer = { state, showTour, draw, zoomTo, minFov };

const params = new URLSearchParams(location.search);
if (params.get("tour")) load(params.get("tour"));
else if (params.get("prompt")) { $("text").value = params.get("prompt"); generate(); }
else draw();
