// The live page (index.html): its figures from /api/snapshot, then /events; its actions
// under the admin token. A file of its own, so that the page's Content-Security-Policy
// allows no inline script; no inline style either (styles are set through the CSSOM).
"use strict";
const $ = (selector, root = document) => root.querySelector(selector);
const token = $("#token");
token.value = sessionStorage.getItem("ingest-token") || "";
function showMode() {
  $("#mode").textContent = token.value ? "actions enabled" : "read-only";
  document.querySelectorAll("button.admin").forEach(b => { b.disabled = !token.value; });
}
token.addEventListener("input", () => { sessionStorage.setItem("ingest-token", token.value); showMode(); });
$("#admin").addEventListener("submit", event => event.preventDefault());  // Enter in the token field

// `style` is an object of CSS properties, set through the CSSOM: a style attribute would be
// inline style, which the page's Content-Security-Policy refuses.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function health(view) {
  if (view.state === "failed" || view.state === "restarting") return ["bad", view.state];
  if (view.circuit === "open") return ["bad", "circuit open"];
  if (view.paused) return ["warn", "paused"];
  if (view.circuit === "half-open") return ["warn", "circuit half-open"];
  if (!view.ready) return ["warn", view.not_ready || "not ready"];
  return ["ok", "running"];
}

// The topology: producer -> processors -> each batcher -> its batch processors. The
// processors and batch processors are shaded by how busy they were (share of their time
// at work, last 5 s); the producer and the batchers by how much of the prefetch is in flight.
function topology(view) {
  const t = view.topology, held = view.prefetch ? Math.min(1, view.in_flight / view.prefetch) : 0;
  const busy = view.busy || { processors: 0, batchers: {} };
  const batchers = t.batchers.length ? t.batchers : [];
  const rows = Math.max(1, batchers.length), height = 20 + rows * 46, width = 640;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `topology of ${t.pipeline}` });
  const fill = share => `rgba(9,105,218,${(0.08 + 0.6 * share).toFixed(2)})`;
  function box(x, y, label, sub, share, name) {
    const g = svg("g", { class: "stage", "data-stage": name, "data-busy": String(share) });
    g.append(svg("rect", { x, y, width: 140, height: 36, rx: 6, fill: fill(share), stroke: "#57606a" }));
    g.append(svg("text", { x: x + 70, y: y + 15, "text-anchor": "middle", "font-size": 12 }, label));
    g.append(svg("text", { x: x + 70, y: y + 29, "text-anchor": "middle", "font-size": 11,
      fill: "#1b1f24" }, sub));
    g.append(svg("title", {}, `${label}: ${(100 * share).toFixed(0)}% ${name.includes("processors") ? "busy" : "of the prefetch in flight"}`));
    root.append(g);
  }
  function arrow(x1, y1, x2, y2) {
    root.append(svg("line", { x1, y1, x2, y2, stroke: "#57606a", "stroke-width": 1.5 }));
  }
  const pct = share => `${(100 * share).toFixed(0)}%`;
  const middle = height / 2 - 18;
  box(10, middle, "producer", `×${t.producer.concurrency} · ${pct(held)} held`, held, "producer");
  arrow(150, middle + 18, 180, middle + 18);
  box(180, middle, "processors", `×${t.processors.concurrency} · ${pct(busy.processors)} busy`,
    busy.processors, "processors");
  batchers.forEach((group, i) => {
    const y = 10 + i * 46, share = busy.batchers[group.name] || 0;
    arrow(320, middle + 18, 350, y + 18);
    box(350, y, `batcher ${group.name}`, `size ${group.details.batch_size}`, held, `batcher ${group.name}`);
    arrow(490, y + 18, 500, y + 18);
    box(500, y, "batch processors", `×${group.concurrency} · ${pct(share)} busy`, share,
      `batch processors ${group.name}`);
  });
  return root;
}

function sparkline(values, colour) {
  const width = 300, height = 36, max = Math.max(1, ...values);
  const step = width / Math.max(1, values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
    class: "sparkline", role: "img", "aria-label": `peak ${max} a second` });
  root.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 1.5 }));
  return root;
}

async function act(name, path, method = "POST") {
  const out = $(`#out-${name}`);
  try {
    const response = await fetch(`/pipelines/${encodeURIComponent(name)}/${path}`,
      { method, headers: { Authorization: `Bearer ${token.value}` } });
    const body = await response.json();
    if (!response.ok) { out.textContent = `${response.status}: ${body.error}`; out.className = "bad"; return; }
    out.className = "ok";
    if (body.dead_letters) {
      out.replaceChildren(`${body.total} dead letter(s)`, table(["reason", "attempts", "when", "message_id", "payload"],
        body.dead_letters.map(d => [d.reason, d.attempts, d.failed_at || "-", d.message_id || "-", d.payload])));
    } else {
      out.textContent = JSON.stringify(body);
    }
  } catch (error) { out.textContent = String(error); out.className = "bad"; }
}

function table(headers, rows) {
  const t = el("table");
  t.append(el("tr", {}, ...headers.map(h => el("th", {}, h))));
  for (const row of rows) t.append(el("tr", {}, ...row.map(c => el("td", {}, c))));
  return t;
}

// The running or latest upload to this pipeline (the snapshot's `uploads`, newest first):
// its rows done, of all, and those that failed, as a figure of the card.
function uploadFigure(upload) {
  if (!upload) return null;
  const done = upload.successful + upload.failed;
  return el("div", { class: "figure", title: `${upload.filename}: ${upload.state}` },
    el("b", { "data-figure": "upload" }, `${done} / ${upload.rows}`),
    "upload rows done, ",
    el("span", { class: upload.failed ? "bad" : "", "data-figure": "upload-failed" }, upload.failed),
    ` failed (${upload.state})`);
}

function card(name, view, upload) {
  const [tone, text] = health(view);
  const last = series => series[series.length - 1] || 0;
  const section = el("section", { class: "pipeline", id: `pipeline-${name}`, "data-pipeline": name });
  section.append(el("h2", {}, name, el("span", { class: `badge ${tone}`, "data-health": text }, text),
    el("span", { class: "note" }, `restarts ${view.restarts}`)));
  const fill = view.prefetch ? Math.min(100, 100 * view.in_flight / view.prefetch) : 0;
  const bar = el("div", { class: "bar", title: "in flight against the prefetch" });
  bar.append(el("div", { style: { width: `${fill.toFixed(0)}%` } }));
  if (view.close_early_at && view.prefetch) {  // open batches close early past this line
    const at = 100 * view.close_early_at / view.prefetch;
    bar.append(el("span", { class: "limit", style: { left: `${at.toFixed(0)}%` },
      title: `open batches close early past ${view.close_early_at}` }));
  }
  const consumers = view.consumers_ready.map((up, i) =>
    el("span", { class: up ? "ok" : "bad", "data-consumer": i }, up ? "● consuming" : "○ not consuming"));
  section.append(el("div", { class: "figures" },
    el("div", { class: "figure" }, el("b", { "data-figure": "received" }, sum(view.rates.received)), "received, 15 min"),
    el("div", { class: "figure" }, el("b", { "data-figure": "successful" }, sum(view.rates.successful)), "successful"),
    el("div", { class: "figure" }, el("b", { "data-figure": "failed" }, sum(view.rates.failed)), "failed"),
    el("div", { class: "figure" }, el("b", {}, `${view.in_flight} / ${view.prefetch ?? "-"}`), "in flight / prefetch", bar),
    el("div", { class: "figure", title: "publish to acknowledgement, last minute, of the messages stamped by a publisher" },
      el("b", { "data-figure": "latency" }, view.latency_ms
        ? `${view.latency_ms.p50} / ${view.latency_ms.p90} / ${view.latency_ms.p99} ms` : "-"),
      "publish→ack p50 / p90 / p99"),
    el("div", { class: "figure" }, el("b", {}, "consumers"), ...consumers),
    ...[uploadFigure(upload)].filter(Boolean)));
  section.append(el("h3", {}, "Topology"), topology(view));
  section.append(el("h3", {}, "Per second, last 15 minutes"));
  for (const [key, colour] of [["received", "#0969da"], ["successful", "#1a7f37"], ["failed", "#cf222e"]]) {
    section.append(el("div", { class: "spark" }, key, sparkline(view.rates[key], colour), `${last(view.rates[key])}/s`));
  }
  const queues = Object.entries(view.queues);
  if (queues.length) section.append(el("h3", {}, "Queues (ready)"), table(["queue", "messages"], queues));
  const open = Object.entries(view.open_batches);
  if (open.length) section.append(el("h3", {}, "Open batches"), table(
    ["batcher", "kept in", "batches", "messages", "oldest (s)", "due, not yet flushed", "busiest keys"],
    open.map(([batcher, o]) => [batcher, o.stored ? "database" : "memory (unacked)", o.batches,
      o.messages, o.oldest_s ?? "-", o.stored ? o.closed : "-",
      o.busiest.map(([key, size]) => `${key} (${size})`).join(", ") || "-"])));
  const triggers = Object.entries(view.batches_by_trigger);
  if (triggers.length) section.append(el("h3", {}, "Batches closed by"), table(["trigger", "batches"], triggers));
  section.append(el("h3", {}, `Last failures (${view.failures.length})`));
  section.append(view.failures.length
    ? table(["when", "message_id", "reason"], view.failures.slice(0, 10).map(
        f => [new Date(f.time * 1000).toLocaleTimeString(), f.message_id || "-", f.reason]))
    : el("p", { class: "note" }, "none"));
  const actions = el("div", { class: "actions" });
  const buttons = [["pause", "Pause"], ["resume", "Resume"], ["dlq", "Show dead letters", "GET"],
    ["dlq/replay", "Replay dead letters"], ["dlq/purge", "Purge dead letters"]];
  for (const [path, label, method] of buttons) {
    const button = el("button", { class: "admin", type: "button", "data-action": path }, label);
    button.addEventListener("click", () => {
      if (path === "dlq/purge" && !confirm(`Delete every dead letter of ${name}?`)) return;
      act(name, path, method || "POST");
    });
    actions.append(button);
  }
  section.append(actions, el("output", { id: `out-${name}` }));
  return section;
}
const sum = values => values.reduce((a, b) => a + b, 0);

function uploads(list) {
  const rows = list.map(u => {
    const done = u.successful + u.failed, share = u.rows ? Math.min(1, done / u.rows) : 0;
    const progress = el("progress", { class: "progress", max: u.rows, value: done,
      "aria-label": `${u.filename}: ${done} of ${u.rows} rows` });
    const state = u.report_error ? `${u.state}: mail not sent yet` : u.error ? `${u.state}: ${u.error}` : u.state;
    const tone = u.state === "failed" || u.report_error ? "bad" : u.state === "done" ? "ok" : "info";
    const row = el("tr", { "data-upload": u.id },
      el("td", {}, u.filename), el("td", { class: tone, "data-upload-state": u.state }, state),
      el("td", {}, progress, ` ${(100 * share).toFixed(0)}%`),
      el("td", { "data-upload-done": "" }, `${done} / ${u.rows}`),
      el("td", { "data-upload-failed": "" }, u.failed),
      el("td", {}, u.rate != null ? `${u.rate}/s` : "-"),
      el("td", {}, u.eta_s != null ? `${Math.ceil(u.eta_s)} s` : "-"),
      el("td", {}, u.email));
    return row;
  });
  const t = el("table");
  t.append(el("tr", {}, ...["file", "state", "progress", "rows done", "failed", "rate", "time left", "report to"]
    .map(h => el("th", {}, h))));
  t.append(...rows);
  $("#upload-list").replaceChildren(list.length ? t : el("p", { class: "note" }, "no uploads yet"));
}

// Where uploads go and what rows each takes come with the figures (`upload_forms`): the
// page names no pipeline of its own.
let uploadForms = {};
function uploadTargets(forms) {
  if (JSON.stringify(forms) === JSON.stringify(uploadForms)) return;
  uploadForms = forms;
  const names = Object.keys(forms), select = $("#upload-target"), chosen = select.value;
  select.replaceChildren(...names.map(name => el("option", { value: name }, name)));
  if (names.includes(chosen)) select.value = chosen;
  $("#upload-target-label").hidden = names.length < 2;
  showUploadForm();
}
function showUploadForm() {
  const form = uploadForms[$("#upload-target").value];
  $("#uploads-title").textContent = form ? `Upload ${form.rows} (CSV)` : "Upload (CSV)";
  $("#upload-columns").textContent = form ? form.columns.join(",") : "…";
}
$("#upload-target").addEventListener("change", showUploadForm);

$("#upload-form").addEventListener("submit", async event => {
  event.preventDefault();
  const out = $("#upload-out"), file = $("#upload-file").files[0];
  if (!$("#upload-target").value) {  // submitted before the first figures came
    uploadTargets((await (await fetch("/api/snapshot")).json()).upload_forms || {});
  }
  const target = $("#upload-target").value;
  const form = new FormData();
  form.append("email", $("#upload-email").value);
  form.append("file", file);
  out.className = "info"; out.textContent = `uploading ${file.name}…`;
  try {
    const response = await fetch(`/uploads/${encodeURIComponent(target)}`,
      { method: "POST", body: form, headers: { Authorization: `Bearer ${token.value}` } });
    const body = await response.json();
    if (!response.ok) { out.className = "bad"; out.textContent = `${file.name} refused: ${body.error}`; return; }
    out.className = "ok";
    out.textContent = `${body.filename} accepted (${body.rows} rows): upload ${body.id}`;
  } catch (error) { out.className = "bad"; out.textContent = String(error); }
});

// `ingest run --workers N`: the supervisor's snapshot lists its workers, each with its
// health and its own figures; a single process has none and the section stays hidden.
function workers(list) {
  $("#workers").hidden = !list;
  if (!list) return;
  const names = [...new Set(list.flatMap(w => Object.keys(w.figures)))];
  const tones = { ready: "ok", "not ready": "warn", starting: "warn", down: "bad", exited: "bad" };
  const rows = list.map(w => el("tr", { "data-worker": w.index },
    el("td", {}, `worker ${w.index}`),
    el("td", { class: tones[w.health] || "bad", "data-worker-health": w.health,
      title: w.not_ready || "" }, w.not_ready ? `${w.health}: ${w.not_ready}` : w.health),
    el("td", {}, w.pid ?? "-"),
    ...names.map(name => {
      const f = w.figures[name];
      return el("td", { "data-worker-figures": name },
        f ? `${f.received} / ${f.successful} / ${f.failed}` : "-");
    })));
  $("#worker-list").replaceChildren(table(
    ["worker", "health", "pid", ...names.map(n => `${n}: received / successful / failed`)], [])
  );
  $("#worker-list table").append(...rows);
}

function render(snapshot) {
  if (snapshot.uploads) uploads(snapshot.uploads);
  if (snapshot.upload_forms) uploadTargets(snapshot.upload_forms);
  workers(snapshot.workers);
  const main = $("#pipelines");
  for (const [name, view] of Object.entries(snapshot.pipelines)) {
    const upload = (snapshot.uploads || []).find(u => u.pipeline === name);
    const fresh = card(name, view, upload), old = $(`#pipeline-${name}`);
    if (old) {  // keep what an action printed
      fresh.querySelector("output").replaceWith(old.querySelector("output"));
      old.replaceWith(fresh);
    } else {
      main.append(fresh);
    }
  }
  showMode();
}

// The browser reconnects a stream that broke by itself, but not one answered with an error
// (503: the service's streams are all taken; it says Retry-After): that one is opened again here.
const RETRY_MS = 5000;
function listen() {
  const events = new EventSource("/events");
  events.onopen = () => { $("#stream").textContent = "live"; $("#stream").className = "ok"; };
  events.onerror = () => {
    $("#stream").textContent = "disconnected, retrying…"; $("#stream").className = "bad";
    if (events.readyState === EventSource.CLOSED) setTimeout(listen, RETRY_MS);
  };
  let view = null;
  events.onmessage = message => {
    const data = JSON.parse(message.data);
    view = data.delta && view ? merged(view, data) : data;
    render(view);
  };
}

// A stream sends the whole snapshot first, then what changed (ingest.service.activity.delta):
// each pipeline's newest seconds of history (`rates_shift` of them: as many of the oldest go)
// and its failures only when they changed.
function merged(view, change) {
  for (const [name, now] of Object.entries(change.pipelines)) {
    const before = view.pipelines[name];
    if (!before) continue;
    if ("rates_shift" in now) {
      const shift = now.rates_shift;
      for (const [series, fresh] of Object.entries(now.rates)) {
        now.rates[series] = before.rates[series].slice(shift).concat(fresh);
      }
    }
    if (!("failures" in now)) now.failures = before.failures;
  }
  return change;
}
listen();
fetch("/api/snapshot").then(r => r.json()).then(render);
