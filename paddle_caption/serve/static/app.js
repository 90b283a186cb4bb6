// The caption page: pick an image (drop, file dialog or gallery), POST it to /v1/captions as
// multipart with stream=true, show the caption as it grows, then its latency and token count.
// Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { blob: null, name: null, reference: null, busy: false };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function showModeControls() {
  const m = mode();
  document.querySelectorAll(".beam-only").forEach((el) => { el.hidden = m !== "beam"; });
  document.querySelectorAll(".sampling-only").forEach((el) => { el.hidden = m !== "sampling"; });
}

function choose(blob, name, reference = null) {
  if (!blob.type.startsWith("image/")) {
    setStatus(`${name} is not an image`, true);
    return;
  }
  state.blob = blob;
  state.name = name;
  state.reference = reference;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("drop-hint").hidden = true;
  $("run").disabled = false;
  caption();
}

async function caption() {
  if (!state.blob || state.busy) return;
  state.busy = true;
  $("run").disabled = true;
  setStatus("captioning…");
  const form = new FormData();
  form.append("image", state.blob, state.name || "image");
  form.append("max_new_tokens", $("max-new-tokens").value);
  const m = mode();
  if (m === "beam") form.append("num_beams", $("num-beams").value);
  if (m === "sampling") {
    form.append("do_sample", "true");
    form.append("temperature", $("temperature").value);
    form.append("top_p", $("top-p").value);
    form.append("seed", $("seed").value);
  }
  const headers = {};
  const key = $("api-key").value || sessionStorage.getItem("apiKey");
  if (key) headers.Authorization = `Bearer ${key}`;
  form.append("stream", "true");  // JSON lines: the caption grows as its tokens are decided
  const started = performance.now();
  try {
    const response = await fetch("/v1/captions", { method: "POST", body: form, headers });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      if (response.status === 401) $("key-row").hidden = false;
      const message = body && body.error ? body.error.message : response.statusText;
      setStatus(`error ${response.status}: ${message}`, true);
      return;
    }
    if (key) sessionStorage.setItem("apiKey", key);
    const text = $("caption");
    text.textContent = "";
    text.classList.remove("empty");
    $("result").dataset.done = "false";
    for (const id of ["latency", "tokens", "roundtrip", "logprob"]) $(id).textContent = "…";
    $("reference").hidden = !state.reference;
    $("reference").textContent = state.reference ? `reference 参考: ${state.reference}` : "";
    $("result").hidden = false;
    await readLines(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.delta) text.textContent += event.delta;
      if (event.result) showResult(event.result, started);
    });
    setStatus("");
  } catch (err) {
    setStatus(`request failed: ${err.message || err}`, true);
  } finally {
    state.busy = false;
    $("run").disabled = !state.blob;
  }
}

function showResult(result, started) {
  const text = $("caption");
  text.textContent = result.caption || "(empty caption)";
  text.classList.toggle("empty", !result.caption);
  $("latency").textContent = result.latency_ms.toFixed(0);
  $("tokens").textContent = String(result.tokens);
  $("logprob").textContent = result.mean_logprob == null ? "–" : result.mean_logprob.toFixed(3);
  $("roundtrip").textContent = (performance.now() - started).toFixed(0);
  $("result").dataset.done = "true";
}

// Calls onEvent with each JSON line of a streamed response as it arrives.
async function readLines(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();  // stream mode: a character split across reads is kept whole
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffered += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) onEvent(JSON.parse(line));
    }
    if (done) return;
  }
}

async function loadGallery() {
  const gallery = $("gallery");
  try {
    const items = await (await fetch("/examples")).json();
    gallery.textContent = "";
    for (const item of items) {
      const button = document.createElement("button");
      button.type = "button";
      button.title = item.reference;
      button.dataset.id = item.id;
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.reference;
      button.append(img);
      button.addEventListener("click", async () => {
        const blob = await (await fetch(item.url)).blob();
        choose(blob, `${item.id}.jpg`, item.reference);
      });
      gallery.append(button);
    }
  } catch (err) {
    gallery.textContent = `no examples (${err})`;
  }
}

async function loadServer() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    $("server").textContent = `model ${health.model} · ${health.status}`;
  } catch (err) {
    $("server").textContent = "server unreachable";
  }
}

function wireDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (event) => {
    const file = event.dataTransfer.files[0];
    if (file) choose(file, file.name);
  });
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) choose(file, file.name);
  });
}

document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", showModeControls));
$("run").addEventListener("click", caption);
wireDrop();
showModeControls();
loadServer();
loadGallery();
