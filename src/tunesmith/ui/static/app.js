// tunesmith dashboard: plain JS, no build step, no CDN (works offline). Polls the JSON API every second.
"use strict";

// The token comes in the address `tunesmith ui` printed; it is kept for this tab, taken out of the
// address bar (so it is in no later address, bookmark or history entry) and sent as a header.
const params = new URLSearchParams(location.search);
const TOKEN = params.get("token") || sessionStorage.getItem("tunesmith-token") || "";
if (TOKEN) sessionStorage.setItem("tunesmith-token", TOKEN);
if (params.has("token")) {
  params.delete("token");
  const query = params.toString();
  history.replaceState(null, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}
const app = document.getElementById("app");
const COLORS = ["#2f6fdf", "#e8590c", "#2b8a3e", "#ae3ec9"];
let poller = null;

async function api(path, body) {
  const init = { headers: { "X-Tunesmith-Token": TOKEN } };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const value = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(value.error || response.statusText);
  return value;
}

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || attrs.svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "svg" || value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}
const svg = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);

function fmt(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(2) : value.toPrecision(digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}
const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "–");
function duration(seconds) {
  if (!seconds) return "–";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}
const badge = (status, id) => el("span", { class: `badge ${status}`, id, text: status });
const runLink = (name) => el("a", { href: `#/run/${encodeURIComponent(name)}`, text: name });

// Re-run `task` every `ms` until the page changes; one request at a time, errors shown in the header.
function poll(ms, task) {
  clearInterval(poller);
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try {
      await task();
      document.getElementById("conn").textContent = "";
    } catch (err) {
      document.getElementById("conn").textContent = err.message;
    } finally {
      busy = false;
    }
  };
  tick();
  poller = setInterval(tick, ms);
}

// ---- charts: hand-written SVG line charts ----
function chart(id, title, series, { width = 440, height = 220 } = {}) {
  const m = { l: 54, r: 12, t: 26, b: 26 };
  const root = svg("svg", { id, class: "chart", width, height, viewBox: `0 0 ${width} ${height}` });
  root.append(svg("text", { x: m.l, y: 16, class: "title", text: title }));
  const points = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (!points.length) {
    root.append(svg("text", { x: width / 2 - 30, y: height / 2, text: "no data yet" }));
    for (const s of series) root.append(svg("path", { class: "series", "data-series": s.name, "data-points": 0, d: "" }));
    return root;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = (y1 - y0) * 0.06 || Math.abs(y0) * 0.1 || 1;
  [y0, y1] = [y0 - pad, y1 + pad];
  const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const sy = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    root.append(svg("line", { class: "grid", x1: m.l, x2: width - m.r, y1: sy(y), y2: sy(y) }));
    root.append(svg("text", { x: 4, y: sy(y) + 4, text: fmt(y, 3) }));
    const x = x0 + ((x1 - x0) * i) / 4;
    root.append(svg("text", { x: sx(x) - 8, y: height - 8, text: fmt(x1 - x0 >= 8 ? Math.round(x) : x, 3) }));
  }
  series.forEach((s, index) => {
    const color = s.color || COLORS[index % COLORS.length];
    const good = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const d = good.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    root.append(svg("path", { class: "series", d, stroke: color, "data-series": s.name, "data-points": good.length }));
    if (good.length <= 40) for (const [x, y] of good) root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color }));
    const lx = width - m.r - 120;
    root.append(svg("rect", { x: lx, y: 8 + index * 13, width: 10, height: 3, fill: color }));
    root.append(svg("text", { x: lx + 14, y: 13 + index * 13, text: s.name }));
  });
  return root;
}

const pointsOf = (records, event, key) =>
  records.filter((r) => r.event === event && r[key] !== null && r[key] !== undefined).map((r) => [r.step, r[key]]);
// Each logging interval's mean loss where the run logged one (a single step's loss jumps about).
const trainLoss = (records) => records.filter((r) => r.event === "train" && (r.mean_loss ?? r.loss) !== null
  && (r.mean_loss ?? r.loss) !== undefined).map((r) => [r.step, r.mean_loss ?? r.loss]);

function trainCharts(records, label = "") {
  return [
    chart("chart-loss", "Loss", [
      { name: `${label}train loss`, points: trainLoss(records) },
      { name: `${label}eval loss`, points: pointsOf(records, "eval", "eval_loss") },
    ]),
    chart("chart-lr", "Learning rate", [{ name: "lr", points: pointsOf(records, "train", "lr") }]),
    chart("chart-speed", "Tokens / second", [{ name: "tokens/s", points: pointsOf(records, "train", "tokens_per_second") }]),
    chart("chart-grad", "Gradient norm", [{ name: "grad norm", points: pointsOf(records, "train", "grad_norm") }]),
    ...objectiveCharts(records),
  ];
}

// An objective's statistics (train.objective other than sft; metrics.jsonl keys "objective/..."), one chart
// per first name part: implicit rewards, each scorer's mean reward, the KL, answer length, clipped share.
function objectiveCharts(records) {
  const prefix = "objective/";
  const keys = [...new Set(records.filter((r) => r.event === "train").flatMap(Object.keys))]
    .filter((k) => k.startsWith(prefix) && !k.endsWith("/std"));
  const groups = {};
  for (const key of keys) (groups[key.slice(prefix.length).split("/")[0]] ||= []).push(key);
  return Object.entries(groups).map(([name, members]) => chart(`chart-objective-${name.replace(/[^\w-]/g, "_")}`,
    `Objective: ${name}`, members.map((k) => ({ name: k.slice(prefix.length), points: pointsOf(records, "train", k) }))));
}

// ---- tables ----
function table(headers, rows, attrs = {}) {
  return el("table", attrs, el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows));
}

function kvTable(object, id) {
  if (!object || typeof object !== "object") return el("p", { class: "muted", id, text: "none" });
  return table(["", ""], Object.entries(object).map(([key, value]) =>
    el("tr", {}, el("th", { text: key }),
      el("td", { class: "text", text: value !== null && typeof value === "object" ? JSON.stringify(value) : fmt(value) }))), { id });
}

const LOWER_IS_BETTER = /loss|perplexity|error|repetition/;
function comparisonRows(base, tuned) {
  const keys = [...new Set([...Object.keys(tuned || {}), ...Object.keys(base || {})])].filter(
    (k) => typeof (tuned || {})[k] === "number" || typeof (base || {})[k] === "number");
  return keys.map((key) => {
    const b = (base || {})[key], t = (tuned || {})[key];
    let change = null, cls = "";
    if (typeof b === "number" && typeof t === "number" && b !== t) {
      const better = LOWER_IS_BETTER.test(key) ? t < b : t > b;
      change = (t > b ? "+" : "") + fmt(t - b, 3);
      cls = better ? "better" : "worse";
    }
    return el("tr", { "data-metric": key }, el("th", { text: key }), el("td", { class: "num base", text: fmt(b) }),
      el("td", { class: "num tuned", text: fmt(t) }), el("td", { class: `num ${cls}`, text: change || "" }));
  });
}

// The baselines (base, k-shot, retrieval, fine-tuned) against the fine-tuned model with 95% intervals
// and the verdict; the general-ability probe before and after.
function evidenceTables(results) {
  const out = [];
  const fixed = (v, places) => (typeof v === "number" ? v.toFixed(places) : "–");
  const signed = (v, places) => `${v >= 0 ? "+" : ""}${fixed(v, places)}`;
  const interval = (d, places) => `${signed(d.difference, places)} [${signed(d.low, places)}, ${signed(d.high, places)}]`;
  const b = results.baselines;
  if (b && b.models) {
    const names = Object.keys(b.models), candidate = names[names.length - 1], metric = b.primary_metric;
    const diff = Object.fromEntries(b.differences.filter((d) => d.metric === metric).map((d) => [d.baseline, d]));
    out.push(el("h3", { text: "Fine-tuning against prompting and retrieval" }),
      el("p", { id: "verdict", text: `Verdict: ${b.verdict || "–"}` }),
      table(["row", metric, `${candidate} − row [95% interval]`, "win / tie / loss"], names.map((n) => el("tr", { "data-row": n },
        el("th", { text: n }), el("td", { class: "num", text: fmt(b.models[n][metric]) }),
        el("td", { class: "num", text: diff[n] ? interval(diff[n], 3) : "" }),
        el("td", { class: "num", text: diff[n] ? `${diff[n].win} / ${diff[n].tie} / ${diff[n].loss}` : "" }))), { id: "baselines" }),
      ...(b.warnings || []).map((w) => el("p", { class: "error", text: w })));
  }
  const g = results.general;
  if (g && g.differences) {
    out.push(el("h3", { text: "General ability kept? (points of 100)" }),
      table(["probe", "items", "base", "fine-tuned", "difference [95% interval]"], g.differences.filter((d) => d.main).map((d) =>
        el("tr", { "data-probe": d.set }, el("th", { text: `${d.set} ${d.metric}` }), el("td", { class: "num", text: fmt(d.items) }),
          el("td", { class: "num", text: fixed(d.base, 1) }), el("td", { class: "num", text: fixed(d.fine_tuned, 1) }),
          el("td", { class: `num ${d.lost ? "worse" : ""}`, text: interval(d, 1) }))), { id: "general" }),
      ...(g.warnings || []).map((w) => el("p", { class: "error", text: w })));
  }
  return out;
}

// ---- pages ----
function listPage() {
  const selected = new Set();
  const compare = el("button", { id: "compare", disabled: true, text: "Compare selected (2)",
    onclick: () => { location.hash = `#/compare/${[...selected].map(encodeURIComponent).join("/")}`; } });
  const body = el("tbody", { id: "runs-body" });
  app.replaceChildren(el("h1", { text: "Runs" }),
    el("div", { class: "actions" }, el("a", { href: "#/new" }, el("button", { class: "secondary", text: "New run" })), compare),
    el("table", { id: "runs" }, el("thead", {}, el("tr", {}, ["", "Run", "Status", "Model", "Method", "Data", "Step",
      "Last loss", "Best eval loss", "Started", "Time"].map((h) => el("th", { text: h })))), body),
    el("p", { class: "muted", id: "runs-empty" }));
  let last = "";
  poll(1000, async () => {
    const { runs } = await api("/api/runs");
    const text = JSON.stringify(runs);
    if (text === last) return;
    last = text;
    document.getElementById("runs-empty").textContent = runs.length ? "" : "No runs yet: start one with “New run”.";
    body.replaceChildren(...runs.map((run) => el("tr", { id: `row-${run.name}`, "data-status": run.status },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: run.name, checked: selected.has(run.name),
        onchange: (e) => { e.target.checked ? selected.add(run.name) : selected.delete(run.name); compare.disabled = selected.size !== 2; } })),
      el("td", {}, runLink(run.name)), el("td", {}, badge(run.status)), el("td", { text: run.model }),
      el("td", { text: run.method }), el("td", { text: run.data }),
      el("td", { class: "num", text: run.max_steps ? `${run.step}/${run.max_steps}` : fmt(run.step) }),
      el("td", { class: "num", text: fmt(run.last_loss) }), el("td", { class: "num best-eval", text: fmt(run.best_eval) }),
      el("td", { text: when(run.started) }), el("td", { text: duration(run.seconds) }))));
  });
}

function runPage(name) {
  const status = badge("…", "run-status");
  const stop = el("button", { id: "stop", hidden: true, text: "Stop (checkpoint first)", onclick: () => act("stop") });
  const resume = el("button", { id: "resume", hidden: true, class: "secondary", text: "Resume", onclick: () => act("resume") });
  const finish = el("button", { id: "finish", hidden: true, class: "secondary", text: "Finish here (keep the last checkpoint)",
    onclick: () => act("finish") });
  const message = el("span", { class: "error", id: "run-error" });
  const section = (id, title) => [el("h2", { text: title }), el("div", { id })];
  app.replaceChildren(el("h1", {}, `${name} `, status), el("div", { class: "actions" }, stop, resume, finish, message),
    el("div", { class: "charts", id: "charts" }), el("p", { class: "muted", id: "run-facts" }),
    ...section("reports", "Report"), ...section("results", "Comparison with the base model"),
    ...section("examples", "Examples"), ...section("data-check", "Data check"), ...section("config", "Config"),
    ...section("checkpoints", "Checkpoints"), ...section("log", "Log"));
  async function act(action) {
    message.textContent = "";
    try { await api(`/api/runs/${encodeURIComponent(name)}/${action}`, {}); } catch (err) { message.textContent = err.message; }
  }
  let lastDetail = "";
  poll(1000, async () => {
    const [detail, metrics] = await Promise.all([api(`/api/runs/${encodeURIComponent(name)}`),
      api(`/api/runs/${encodeURIComponent(name)}/metrics`)]);
    status.textContent = detail.status;
    status.className = `badge ${detail.status}`;
    stop.hidden = detail.status !== "running";
    resume.hidden = !["stopped", "failed"].includes(detail.status);
    finish.hidden = detail.status !== "stopped";
    document.getElementById("charts").replaceChildren(...trainCharts(metrics.records));
    document.getElementById("run-facts").textContent = `model ${detail.model} · ${detail.method} · data ${detail.data} · step ` +
      `${detail.step}${detail.max_steps ? "/" + detail.max_steps : ""} · best eval loss ${fmt(detail.best_eval)} · started ${when(detail.started)}`;
    const { now, log, ...stable } = detail;
    document.getElementById("log").replaceChildren(el("pre", { text: log || "(no log: started outside the dashboard)" }));
    const text = JSON.stringify(stable);
    if (text === lastDetail) return;
    lastDetail = text;
    renderRunSections(name, detail);
  });
}

function renderRunSections(name, detail) {
  const results = detail.results;
  // A new tab cannot send the token: the server gives each file an address signed for that file alone.
  const reports = detail.reports.map((file) => el("a", { href: detail.links[file], target: "_blank", rel: "noopener noreferrer",
    id: `report-${file.replace(".", "-")}`, text: file }));
  document.getElementById("reports").replaceChildren(reports.length ? el("p", {}, "Open: ", ...reports.flatMap((a) => [a, " "]))
    : el("p", { class: "muted", text: results ? "Results below (no report file in this run)." : "The report appears when the run finishes." }));
  document.getElementById("results").replaceChildren(...(results
    ? [table(["metric", "base", "fine-tuned", "change"], comparisonRows(results.base, results.fine_tuned), { id: "comparison" }),
      ...evidenceTables(results)]
    : [el("p", { class: "muted", text: "Not finished yet." })]));
  document.getElementById("examples").replaceChildren(detail.predictions.length
    ? table(["prompt", "reference", "base", "fine-tuned"], detail.predictions.map((p) => el("tr", {},
        ["prompt", "reference", "base", "fine_tuned"].map((k) => el("td", { class: "text", text: p[k] ?? "–" })))), { id: "examples-table" })
    : el("p", { class: "muted", text: "No test predictions (yet)." }));
  document.getElementById("data-check").replaceChildren(kvTable(detail.data_check, "data-check-table"));
  document.getElementById("config").replaceChildren(el("pre", { id: "config-text", text: detail.config_text }));
  document.getElementById("checkpoints").replaceChildren(el("p", { text: detail.checkpoints.join(", ") || "none" }));
}

function flatten(object, prefix = "", out = {}) {
  for (const [key, value] of Object.entries(object || {})) {
    if (value && typeof value === "object" && !Array.isArray(value)) flatten(value, `${prefix}${key}.`, out);
    else out[prefix + key] = value;
  }
  return out;
}

function comparePage(a, b) {
  app.replaceChildren(el("h1", {}, "Compare ", runLink(a), " and ", runLink(b)), el("div", { class: "charts", id: "charts" }),
    el("div", { class: "side" }, el("div", {}, el("h2", { text: "Summary and results" }), el("div", { id: "compare-results" })),
      el("div", {}, el("h2", { text: "Config differences" }), el("div", { id: "compare-config" }))));
  poll(2000, async () => {
    const [da, db, ma, mb] = await Promise.all([a, b].map((n) => api(`/api/runs/${encodeURIComponent(n)}`))
      .concat([a, b].map((n) => api(`/api/runs/${encodeURIComponent(n)}/metrics`))));
    document.getElementById("charts").replaceChildren(
      chart("chart-loss", "Train loss", [{ name: a, points: trainLoss(ma.records) },
        { name: b, points: trainLoss(mb.records) }], { width: 560 }),
      chart("chart-eval", "Eval loss", [{ name: a, points: pointsOf(ma.records, "eval", "eval_loss") },
        { name: b, points: pointsOf(mb.records, "eval", "eval_loss") }], { width: 560 }));
    const facts = ["status", "model", "method", "data", "step", "best_eval", "seconds"];
    const resultsOf = (d) => ({ ...flatten(d.results ? { base: d.results.base, fine_tuned: d.results.fine_tuned } : {}),
      tokens_per_second: d.results?.tokens_per_second });
    const ra = resultsOf(da), rb = resultsOf(db);
    const keys = [...new Set([...Object.keys(ra), ...Object.keys(rb)])];
    document.getElementById("compare-results").replaceChildren(table(["", a, b], [
      ...facts.map((k) => el("tr", { "data-key": k }, el("th", { text: k }), el("td", { text: fmt(da[k]) }), el("td", { text: fmt(db[k]) }))),
      ...keys.map((k) => el("tr", { "data-key": k }, el("th", { text: k }), el("td", { class: "num", text: fmt(ra[k]) }),
        el("td", { class: "num", text: fmt(rb[k]) }))),
    ], { id: "compare-table" }));
    const ca = flatten(da.config), cb = flatten(db.config);
    const differ = [...new Set([...Object.keys(ca), ...Object.keys(cb)])]
      .filter((k) => k !== "output.dir" && JSON.stringify(ca[k]) !== JSON.stringify(cb[k]));
    document.getElementById("compare-config").replaceChildren(differ.length
      ? table(["setting", a, b], differ.map((k) => el("tr", { "data-key": k }, el("th", { text: k }),
          el("td", { text: JSON.stringify(ca[k]) }), el("td", { text: JSON.stringify(cb[k]) }))), { id: "config-diff" })
      : el("p", { class: "muted", text: "Same settings." }));
  });
}

const FIELDS = [
  ["name", "Run name", () => `run-${new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-")}`],
  ["model", "Model (default, hub id, folder, .gguf)", "default", "wide"],
  ["method", "Method", "lora"],
  ["train", "Train data file (or demo)", "demo", "wide"],
  ["validation", "Validation file (optional)", "", "wide"],
  ["test", "Test file (optional)", "", "wide"],
  ["max_seq_len", "Max sequence length", "512"],
  ["epochs", "Epochs", "1"], ["max_steps", "Max steps (overrides epochs)", ""],
  ["batch_size", "Batch size", "8"], ["grad_accum", "Gradient accumulation", "1"], ["lr", "Learning rate", "2e-4"],
  ["r", "LoRA rank", "16"], ["alpha", "LoRA alpha", "32"], ["log_every", "Log every (steps)", "5"],
  ["eval_every", "Eval every (steps, 0 = end)", "0"], ["checkpoint_every", "Checkpoint every (steps)", "0"],
];

function newRunPage() {
  clearInterval(poller);
  const inputs = {};
  const start = el("button", { id: "start", type: "button", disabled: true, text: "Start run" });
  const out = el("div", { id: "preview-out" });
  const invalidate = () => { start.disabled = true; };
  const form = el("form", { class: "run", id: "run-form", oninput: invalidate, onchange: invalidate },
    FIELDS.map(([key, label, value, cls]) => {
      inputs[key] = key === "method"
        ? el("select", { id: `f-${key}`, name: key }, ["lora", "full"].map((m) => el("option", { value: m, text: m })))
        : el("input", { id: `f-${key}`, name: key, value: typeof value === "function" ? value() : value });
      return el("label", { class: cls }, label, inputs[key]);
    }),
    el("label", { class: "full" }, "More settings, one section.key=value per line (see `tunesmith config`)",
      inputs.extra = el("textarea", { id: "f-extra", name: "extra", rows: 3 })));
  const values = () => Object.fromEntries(Object.entries(inputs).map(([k, input]) => [k, input.value]));
  const check = el("button", { id: "preview", type: "button", class: "secondary", text: "Check data and plan", onclick: async () => {
    out.replaceChildren(el("p", { class: "muted", text: "Reading and tokenising the data…" }));
    try {
      const found = await api("/api/preview", values());
      const dataCheck = found.data_check;
      out.replaceChildren(el("div", { class: "side" },
        el("div", {}, el("h2", { text: "Data check" }), kvTable(dataCheck, "data-check-table")),
        el("div", {}, el("h2", { text: "Plan" }), kvTable(found.plan, "plan-table"),
          found.plan_text ? el("pre", { id: "plan-text", text: found.plan_text }) : "")),
        found.exists ? el("p", { class: "error", text: `A run named ${found.name} exists: choose another name.` }) : "");
      start.disabled = found.exists;
    } catch (err) {
      out.replaceChildren(el("p", { class: "error", id: "form-error", text: err.message }));
    }
  } });
  start.addEventListener("click", async () => {
    start.disabled = true;
    try {
      const started = await api("/api/runs", values());
      location.hash = `#/run/${encodeURIComponent(started.name)}`;
    } catch (err) {
      out.append(el("p", { class: "error", id: "form-error", text: err.message }));
    }
  });
  app.replaceChildren(el("h1", { text: "New run" }), form,
    el("div", { class: "actions" }, check, start, el("span", { class: "muted", text: "The data check and plan come first; then start." })), out);
}

function route() {
  const [page, ...args] = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (page === "run" && args[0]) runPage(args[0]);
  else if (page === "compare" && args.length === 2) comparePage(args[0], args[1]);
  else if (page === "new") newRunPage();
  else listPage();
}
window.addEventListener("hashchange", route);
route();
