// steerlab playground: plain DOM, no framework. Every server-provided string is shown with
// textContent (never innerHTML), so nothing the model, a file or a user types can become markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { vectors: [], strengthMode: "fraction", sweep: null };

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok || data.error) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "—" : Number(x).toPrecision(digits);
}

// --- vectors -------------------------------------------------------------------------------------------

function fillSelect(select, options, keep) {
  const previous = keep ? select.value : null;
  select.replaceChildren(...options.map(([value, label]) => el("option", label, { value })));
  if (previous !== null && options.some(([value]) => value === previous)) select.value = previous;
}

function currentVector() {
  return state.vectors.find((v) => v.id === $("vector").value);
}

function renderState(data) {
  $("model").textContent = `model ${data.model.name}, ${data.model.layers} layers`;
  state.vectors = data.vectors;
  const options = data.vectors.map((v) => [v.id, `${v.name} (${v.origin}, layers ${v.layers.join(",")})`]);
  fillSelect($("vector"), options, true);
  fillSelect($("sweep-vector"), options, true);
  fillSelect($("second"), [["", "(the vector itself, for ablation)"], ...options], true);
  $("unusable").replaceChildren(...data.unusable.map((u) => el("li", `${u.name}: ${u.error}`)));
  fillSelect($("extract-source"), [...data.extract_sources.map((s) => [s, s]), ["upload", "upload a file"]], true);
  const metricData = Object.entries(data.metric_data).map(([key, label]) => [key, `${key}: ${label}`]);
  fillSelect($("metric-data"), metricData, true);
  fillSelect($("sweep-data"), metricData, true);
  if (!$("extract-layers").value) {
    const n = data.model.layers;
    $("extract-layers").value = [Math.floor(n / 2), Math.floor((3 * n) / 4)].join(",");
  }
  document.querySelector('[data-tab="results"]').hidden = !data.results;
  vectorChanged();
}

function vectorChanged() {
  const v = currentVector();
  const layerSelect = $("layer");
  if (!v) {
    $("vector-info").textContent = "No vector yet: extract one below, or start the server with --vectors DIR.";
    layerSelect.replaceChildren();
    return;
  }
  const previous = layerSelect.value;
  fillSelect(layerSelect, v.layers.map((l) => [String(l), String(l)]), false);
  if (v.layers.map(String).includes(previous)) layerSelect.value = previous;
  const bits = [v.method && `method ${v.method}`, v.model && `from ${v.model}`, v.source && `data ${v.source}`];
  $("vector-info").textContent = bits.filter(Boolean).join("; ");
  layerChanged();
}

function norms() {
  const v = currentVector();
  const layer = $("layer").value;
  return v ? { norm: v.norms[layer], residual: v.residual_norms[layer] } : {};
}

function layerChanged() {
  const { residual } = norms();
  $("fraction").disabled = residual === null || residual === undefined;
  if ($("fraction").disabled) state.strengthMode = "multiplier";
  syncStrength();
}

function syncStrength() {
  const { norm, residual } = norms();
  const fraction = Number($("fraction").value);
  if (state.strengthMode === "fraction" && residual) {
    $("multiplier").value = ((fraction * residual) / norm).toPrecision(4);
  } else if (residual) {
    const f = (Number($("multiplier").value) * norm) / residual;
    $("fraction").value = String(Math.max(-1, Math.min(1, f)));
  }
  const shown = residual ? (Number($("multiplier").value) * norm) / residual : null;
  $("fraction-value").textContent = shown === null ? "n/a" : shown.toFixed(2);
}

function setting() {
  const out = {
    vector: $("vector").value,
    layer: Number($("layer").value),
    positions: $("positions").value,
    op: $("op").value,
    second: $("second").value,
  };
  if (state.strengthMode === "fraction") out.fraction = Number($("fraction").value);
  else out.multiplier = $("multiplier").value;
  return out;
}

async function refresh(path = "/api/state", body) {
  try {
    renderState(await api(path, body));
  } catch (error) {
    showError(error.message);
  }
}

async function readFile(input) {
  const file = input.files[0];
  if (!file) throw new Error("upload: choose a file of pairs");
  return { filename: file.name, content: await file.text() };
}

async function extract() {
  showError("");
  const status = $("extract-status");
  status.textContent = "extracting…";
  try {
    const body = {
      source: $("extract-source").value,
      layers: $("extract-layers").value,
      method: $("extract-method").value,
      name: $("extract-name").value,
    };
    if (body.source === "upload") body.upload = await readFile($("extract-file"));
    const entry = await api("/api/extract", body);
    await refresh();
    $("vector").value = entry.id;
    vectorChanged();
    status.textContent = `extracted ${entry.name}`;
  } catch (error) {
    status.textContent = "";
    showError(error.message);
  }
}

// --- generation ----------------------------------------------------------------------------------------

function shade(span, delta) {
  const alpha = Math.min(1, Math.abs(delta) / 4) * 0.7;
  span.style.backgroundColor = delta >= 0 ? `rgba(26,127,55,${alpha})` : `rgba(180,35,24,${alpha})`;
  span.title = `log p steered − log p unsteered = ${delta.toFixed(3)}`;
  span.dataset.delta = delta.toFixed(4);
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split("\n")) if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
    }
  }
}

async function generate() {
  showError("");
  const outputs = { unsteered: $("out-unsteered"), steered: $("out-steered") };
  for (const out of Object.values(outputs)) {
    out.replaceChildren();
    out.dataset.state = "waiting";
  }
  document.body.dataset.generation = "running";
  $("generate").disabled = true;
  const body = {
    setting: setting(),
    prompt: $("prompt").value,
    chat: $("chat").checked,
    system_prompt: $("system").value,
    max_new_tokens: Number($("max-tokens").value),
  };
  let failed = false;
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || `HTTP ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error);
      if ("queued" in event) {
        const f = event.fraction === null ? "" : ` (${fmt(event.fraction)} of the residual norm)`;
        $("applied").textContent = `layer ${event.layer}, multiplier ${fmt(event.multiplier, 4)}${f}, positions ${event.positions}`
          + (event.queued ? `; waiting for ${event.queued} request(s)` : "");
      } else if (event.start) {
        outputs[event.side].dataset.state = "running";
      } else if ("token" in event) {
        outputs[event.side].append(el("span", event.piece, { class: "tok", "data-token": event.token }));
      } else if (event.done) {
        outputs[event.side].dataset.state = "done";
        outputs[event.side].dataset.text = event.text;
      } else if (event.shading) {
        for (const [side, deltas] of Object.entries(event.shading)) {
          outputs[side].querySelectorAll(".tok").forEach((span, i) => shade(span, deltas[i]));
          outputs[side].dataset.shaded = "true";
        }
      }
    });
  } catch (error) {
    failed = true;
    showError(error.message);
  } finally {
    document.body.dataset.generation = failed ? "error" : "done";
    $("generate").disabled = false;
  }
}

async function metrics() {
  showError("");
  const table = $("metrics-table");
  table.hidden = true;
  try {
    const r = await api("/api/metrics", { setting: setting(), data: $("metric-data").value });
    const head = el("tr");
    for (const h of ["", r.label, "95% CI", "perplexity (neutral text)", "KL from unsteered"]) head.append(el("th", h));
    const rows = [head];
    for (const side of ["unsteered", "steered"]) {
      const s = r[side];
      const tr = el("tr", null, { "data-side": side });
      for (const cell of [side, fmt(s.score), `[${fmt(s.ci[0])}, ${fmt(s.ci[1])}]`, fmt(s.perplexity, 4), fmt(s.kl)]) {
        tr.append(el("td", cell));
      }
      rows.push(tr);
    }
    table.replaceChildren(...rows);
    table.hidden = false;
  } catch (error) {
    showError(error.message);
  }
}

// --- sweep ---------------------------------------------------------------------------------------------

function renderTable(table, header, rows) {
  const head = el("tr");
  for (const h of header) head.append(el("th", h));
  const body = rows.map((row) => {
    const tr = el("tr");
    for (const cell of row) {
      tr.append(el("td", typeof cell === "number" && !Number.isInteger(cell) ? fmt(cell, 4) : cell));
    }
    return tr;
  });
  table.replaceChildren(head, ...body);
}

async function runSweep() {
  showError("");
  const body = {
    vector: $("sweep-vector").value,
    layers: $("sweep-layers").value,
    strengths_kind: $("sweep-kind").value,
    strengths: $("sweep-strengths").value,
    positions: $("sweep-positions").value,
    data: $("sweep-data").value,
    limit: $("sweep-limit").value,
    controls: $("sweep-controls").checked,
  };
  for (const id of ["sweep-csv", "sweep-curves", "sweep-heatmap"]) $(id).hidden = true;
  $("sweep-table").replaceChildren();
  try {
    const job = await api("/api/sweep", body);
    $("sweep-run").disabled = true;
    document.body.dataset.sweep = "running";
    pollSweep(job.id);
  } catch (error) {
    showError(error.message);
  }
}

async function pollSweep(id) {
  let job;
  try {
    job = await api(`/api/sweep/${encodeURIComponent(id)}`);
  } catch (error) {
    showError(error.message);
    $("sweep-run").disabled = false;
    return;
  }
  $("sweep-progress").max = job.total;
  $("sweep-progress").value = job.done;
  $("sweep-status").textContent = `${job.state}: ${job.done} of ${job.total} evaluations`;
  if (job.state === "queued" || job.state === "running") {
    setTimeout(() => pollSweep(id), 400);
    return;
  }
  $("sweep-run").disabled = false;
  document.body.dataset.sweep = job.state;
  if (job.state === "error") {
    showError(job.error);
    return;
  }
  const base = `/api/sweep/${encodeURIComponent(id)}`;
  $("sweep-curves").src = `${base}/curves.png`;
  $("sweep-heatmap").src = `${base}/heatmap.png`;
  $("sweep-csv").href = `${base}/sweep.csv`;
  for (const name of ["sweep-csv", "sweep-curves", "sweep-heatmap"]) $(name).hidden = false;
  const columns = ["vector", "layer", "fraction", "multiplier", "score", "score_ci_low", "score_ci_high", "perplexity", "kl"];
  renderTable($("sweep-table"), columns, job.rows.map((r) => columns.map((c) => (r[c] === null ? "" : r[c]))));
}

// --- results -------------------------------------------------------------------------------------------

async function loadResults() {
  try {
    const data = await api("/api/results");
    const items = data.runs.map((run) => {
      const li = el("li");
      li.append(el("strong", run.folder));
      const list = el("ul");
      for (const file of run.files) {
        const link = el("a", file.split("/").pop(), { href: "#", "data-path": file });
        link.addEventListener("click", (event) => { event.preventDefault(); openResult(file); });
        const item = el("li");
        item.append(link);
        list.append(item);
      }
      li.append(list);
      return li;
    });
    $("runs").replaceChildren(...(items.length ? items : [el("li", "no runs found in the results folder")]));
  } catch (error) {
    showError(error.message);
  }
}

async function openResult(path) {
  showError("");
  $("result-title").textContent = path;
  for (const id of ["result-frame", "result-image", "result-text", "result-table"]) $(id).hidden = true;
  const url = "/results/" + path.split("/").map(encodeURIComponent).join("/");
  try {
    if (path.endsWith(".html")) {
      $("result-frame").src = url;
      $("result-frame").hidden = false;
    } else if (path.endsWith(".png")) {
      $("result-image").src = url;
      $("result-image").hidden = false;
    } else if (path.endsWith(".csv")) {
      const t = await api(`/api/results/table?path=${encodeURIComponent(path)}`);
      renderTable($("result-table"), t.header, t.rows);
      $("result-table").hidden = false;
    } else {
      const response = await fetch(url);
      $("result-text").textContent = await response.text();
      $("result-text").hidden = false;
    }
  } catch (error) {
    showError(error.message);
  }
}

// --- wiring --------------------------------------------------------------------------------------------

function showTab(name) {
  for (const button of document.querySelectorAll(".tab")) button.classList.toggle("active", button.dataset.tab === name);
  for (const panel of document.querySelectorAll(".panel")) panel.hidden = panel.id !== `tab-${name}`;
  if (name === "results") loadResults();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll(".tab")) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("vector").addEventListener("change", vectorChanged);
  $("op").addEventListener("change", () => { $("second").disabled = $("op").value === "none"; });
  $("second").disabled = true;
  $("layer").addEventListener("change", layerChanged);
  $("fraction").addEventListener("input", () => { state.strengthMode = "fraction"; syncStrength(); });
  $("multiplier").addEventListener("input", () => { state.strengthMode = "multiplier"; syncStrength(); });
  $("rescan").addEventListener("click", () => refresh("/api/rescan", {}));
  $("extract-source").addEventListener("change", () => { $("upload-label").hidden = $("extract-source").value !== "upload"; });
  $("extract").addEventListener("click", extract);
  $("generate").addEventListener("click", generate);
  $("metrics").addEventListener("click", metrics);
  $("sweep-run").addEventListener("click", runSweep);
  refresh().then(() => { document.body.dataset.ready = "true"; });
});
