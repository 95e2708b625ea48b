// The Lockstep web console: search, releases, jobs with their training reports, and the drift probe.
// Plain DOM code over the JSON API; the admin token lives in this page's memory only.
"use strict";

(() => {
  const OLD_TOKEN_KEY = "lockstep.adminToken"; // where earlier versions kept it; removed on load
  const TERMINAL = new Set(["succeeded", "rejected", "failed", "cancelled"]);
  const COLORS = ["#1f5fa8", "#c2410c", "#047857", "#6d28d9"];
  const $ = (id) => document.getElementById(id);

  // ---- small helpers -------------------------------------------------------------------------

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const fixed = (value, digits = 4) => (typeof value === "number" ? value.toFixed(digits) : "–");
  const percent = (value) => (typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "–");
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

  function seconds(value) {
    if (typeof value !== "number") return "";
    if (value < 90) return `${Math.round(value)} s`;
    if (value < 5400) return `${Math.round(value / 60)} min`;
    return `${(value / 3600).toFixed(1)} h`;
  }

  // Writes only a changed text, so a live region polled every few seconds announces changes, not repeats.
  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // A message written by a poll is marked (`data-source="poll"`) so the next good poll may clear it; any other
  // message (an action's error, say) stays until replaced.
  function say(id, message, isError = false) {
    const node = $(id);
    node.textContent = message;
    node.classList.toggle("error", isError);
    delete node.dataset.source;
  }

  function facts(list, pairs) {
    list.replaceChildren(...pairs.filter(([, value]) => value !== undefined && value !== null && value !== "")
      .flatMap(([term, value]) => [el("dt", { text: term }), el("dd", {}, value)]));
  }

  // ---- the API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // Not in sessionStorage: any script of this origin can read that, such as the API docs pages' CDN scripts.
  let adminToken = null;
  const token = () => adminToken;
  sessionStorage.removeItem(OLD_TOKEN_KEY);

  async function api(method, path, body, admin = false) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const sent = token();
    if (admin) {
      if (!sent) throw new ApiError(0, "Enter the admin token at the top of the page first.");
      headers.Authorization = `Bearer ${sent}`;
    }
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await response.json().catch(() => null);
    if (admin && (response.status === 401 || response.status === 403) && token() === sent) forgetToken();
    if (!response.ok) {
      throw new ApiError(response.status, data && data.error ? data.error : `${response.status} ${response.statusText}`);
    }
    return data;
  }

  // ---- tabs ----------------------------------------------------------------------------------

  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const onShow = {};

  function selectTab(name, focus = false) {
    for (const tab of tabs) {
      const selected = tab.dataset.tab === name;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !selected;
      if (selected && focus) tab.focus();
    }
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
    if (onShow[name]) onShow[name]();
  }

  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.dataset.tab));
    tab.addEventListener("keydown", (event) => {
      const index = tabs.indexOf(tab);
      const next = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length].dataset.tab, true);
    });
  }

  // ---- the admin token -----------------------------------------------------------------------

  function showTokenState() {
    const set = Boolean(token());
    $("token-state").textContent = set
      ? "Admin token set for this page; it is kept in the page's memory (gone on reload) and sent only to this server."
      : "Releases, jobs and the drift probe need the admin token (LOCKSTEP_ADMIN_TOKEN).";
    $("token-forget").hidden = !set;
  }

  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) {
      $("token-state").textContent = "Type the admin token first.";
      return;
    }
    adminToken = value;
    $("token").value = "";
    try {
      await api("GET", "/v1/admin/releases", undefined, true);
      showTokenState();
      const current = tabs.find((tab) => tab.getAttribute("aria-selected") === "true");
      if (current && onShow[current.dataset.tab]) onShow[current.dataset.tab]();
    } catch (error) {
      forgetToken();
      $("token-state").textContent = `That token was refused: ${error.message}`;
    }
  });

  function forgetToken() {
    adminToken = null;
    showTokenState();
  }

  $("token-forget").addEventListener("click", forgetToken);

  // ---- the live release ----------------------------------------------------------------------

  async function showServing() {
    try {
      const health = await api("GET", "/readyz");
      setText($("serving"), `Serving release ${health.release}`);
    } catch (error) {
      setText($("serving"), `Not serving: ${error.message}`);
    }
  }

  // ---- search --------------------------------------------------------------------------------

  function snippet(text, limit = 320) {
    return text.length > limit ? `${text.slice(0, limit).trimEnd()}…` : text;
  }

  $("search-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      query: $("query").value, k: Number($("k").value), lexical_weight: Number($("lexical").value), rerank: $("rerank").checked,
    };
    const filter = $("filter").value.trim();
    if (filter) {
      try {
        body.filter = JSON.parse(filter);
      } catch (error) {
        say("search-status", `The metadata filter is not JSON (${error.message}); write it as {"lang": "en"}`, true);
        $("results").replaceChildren();
        return;
      }
    }
    say("search-status", "Searching…");
    try {
      const answer = await api("POST", "/v1/search", body);
      const timings = Object.entries(answer.timings_ms).filter(([name]) => name !== "total")
        .map(([name, ms]) => `${name} ${ms.toFixed(1)}`).join(", ");
      say("search-status", `${answer.results.length} results from release ${answer.release} in ` +
        `${answer.timings_ms.total.toFixed(1)} ms (${timings} ms)`);
      $("results").replaceChildren(...answer.results.map((hit) => el("li", {},
        el("h3", { text: hit.title || hit.id }),
        el("p", { class: "meta" }, `score ${hit.score.toFixed(4)} · document `, el("code", { text: hit.id })),
        ...(Object.keys(hit.metadata).length ? [el("p", { class: "meta metadata", text: JSON.stringify(hit.metadata) })] : []),
        el("p", { text: snippet(hit.text) }))));
    } catch (error) {
      say("search-status", error.message, true);
      $("results").replaceChildren();
    }
  });

  // ---- releases ------------------------------------------------------------------------------

  function releaseCard(item, serving) {
    const m = item.manifest;
    const badges = [];
    if (item.active) badges.push(el("span", { class: "badge good", text: "Active" }));
    if (item.release_id === serving) badges.push(el("span", { class: "badge info", text: "Serving here" }));
    if (item.job && item.job.status === "rejected") badges.push(el("span", { class: "badge warn", text: "Gate rejected" }));
    const metrics = [];
    for (const [name, value] of Object.entries(m.evaluation || {})) metrics.push(`${name} ${fixed(value)}`);
    if (m.recall) metrics.push(`recall@${m.recall.k} vs exact search ${fixed(m.recall.recall)}`);
    if (m.int8_agreement) metrics.push(`int8 agreement ${fixed(m.int8_agreement.mean_cosine)} mean cosine`);
    const gate = item.job && item.job.gate;
    if (gate && !gate.skipped && gate.candidate) metrics.push(`gate dev nDCG@10 ${fixed(gate.candidate["ndcg@10"])}`);
    const list = el("dl", { class: "facts" });
    facts(list, [
      ["Created", when(m.created)],
      ["Model", m.model.name],
      ["Fingerprint", el("code", { title: m.model.fingerprint, text: m.model.fingerprint.slice(0, 19) })],
      ["Documents", String(m.doc_count)],
      ["Precision", `${m.precision} on ${m.runtime}${m.int8_activations ? `, ${m.int8_activations} activations` : ""}`],
      ["Index", `${m.index_type}, ${m.dim} dimensions${Object.keys(m.search_params || {}).length ?
        ` (${Object.entries(m.search_params).map(([k, v]) => `${k} ${v}`).join(", ")})` : ""}`],
      ["Metrics", metrics.join("; ") || "none recorded"],
      ["Built by", item.job ? `${item.job.kind} job ${item.job.id} (${item.job.status})` : null],
      ["Gate", gate ? gate.reason : null],
    ]);
    const actions = el("div", { class: "toolbar" });
    if (!item.active) {
      actions.append(el("button", {
        type: "button", "aria-label": `Activate release ${item.release_id}`, text: "Activate",
        onclick: () => switchRelease("POST", `/v1/admin/releases/${encodeURIComponent(item.release_id)}/activate`),
      }));
    }
    return el("article", { class: item.active ? "card active" : "card", "data-release": item.release_id },
      el("h3", {}, el("span", { class: "mono", text: item.release_id }), ...badges), list, actions);
  }

  async function loadReleases() {
    if (!token()) {
      say("releases-status", "Enter the admin token to list releases.");
      return;
    }
    try {
      const listing = await api("GET", "/v1/admin/releases", undefined, true);
      $("releases").replaceChildren(...listing.releases.map((item) => releaseCard(item, listing.serving)));
      say("releases-status", listing.active
        ? `${listing.releases.length} releases; ${listing.active} is active.`
        : `${listing.releases.length} releases; none is active.`);
      $("rollback").disabled = listing.releases.length < 2;
    } catch (error) {
      say("releases-status", error.message, true);
    }
  }

  async function switchRelease(method, path) {
    say("releases-status", "Switching…");
    try {
      const pointer = await api(method, path, undefined, true);
      await loadReleases();
      if (pointer.load_error) say("releases-status", `Release ${pointer.active} is active, but this server still ` +
        `serves ${pointer.serving}: ${pointer.load_error}`, true);
      else say("releases-status", `Release ${pointer.active} is active; this server serves ${pointer.serving}.`);
      showServing();
    } catch (error) {
      say("releases-status", error.message, true);
    }
  }

  $("releases-refresh").addEventListener("click", loadReleases);
  $("rollback").addEventListener("click", () => switchRelease("POST", "/v1/admin/rollback"));
  onShow.releases = loadReleases;

  // ---- jobs ----------------------------------------------------------------------------------

  let openJob = null;
  let jobTimer = null;
  let listTimer = null;

  function progressText(job) {
    const p = job.progress || {};
    const parts = [`step ${p.step || job.step}`];
    if (p.phase) parts.push(p.phase);
    if (p.total) parts.push(`${p.done}/${p.total}`);
    if (!TERMINAL.has(job.status) && typeof p.eta_s === "number") parts.push(`ETA ${seconds(p.eta_s)}`);
    if (p.metrics && typeof p.metrics.loss === "number") parts.push(`loss ${p.metrics.loss.toFixed(4)}`);
    return parts.join(" · ");
  }

  function setProgress(bar, job) {
    const p = job.progress || {};
    if (job.status === "succeeded") {
      bar.max = 1;
      bar.value = 1;
    } else if (p.total) {
      bar.max = p.total;
      bar.value = p.done;
    } else if (TERMINAL.has(job.status)) {
      bar.max = 1;
      bar.value = 0; // ended without a count: not a busy bar forever
    } else {
      bar.removeAttribute("value");
    }
  }

  function statusBadge(status) {
    const kind = { succeeded: "good", failed: "bad", cancelled: "bad", rejected: "warn", running: "info" }[status] || "";
    return el("span", { class: `badge ${kind}`, "data-status": status, text: status });
  }

  async function loadJobs() {
    if (!token()) {
      say("jobs-status", "Enter the admin token to see and start jobs.");
      $("jobs-status").dataset.source = "poll";
      return;
    }
    clearTimeout(listTimer);
    try {
      const { jobs } = await api("GET", "/v1/jobs?limit=50", undefined, true);
      const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.job : null;
      $("job-list").replaceChildren(...jobs.map((job) => {
        const bar = el("progress", { max: 1, "aria-label": `Progress of job ${job.id}` });
        setProgress(bar, job);
        return el("li", {}, el("button", {
          type: "button", class: "job-item", "data-job": job.id, "aria-current": String(job.id === openJob),
          onclick: () => openJobDetail(job.id),
        }, el("span", { class: "mono", text: job.id }), el("span", {}, `${job.kind} `, statusBadge(job.status)),
        el("span", { class: "hint", text: progressText(job) }), bar));
      }));
      if (focused) {
        const again = [...document.querySelectorAll(".job-item")].find((item) => item.dataset.job === focused);
        if (again) again.focus({ preventScroll: true }); // the list was rebuilt under a keyboard user's focus
      }
      const status = $("jobs-status");
      if (!jobs.length) say("jobs-status", "No jobs yet.");
      else if (status.dataset.source === "poll") say("jobs-status", ""); // the refresh's own error or prompt, now stale
      if (jobs.some((job) => !TERMINAL.has(job.status)) && !$("panel-jobs").hidden) listTimer = setTimeout(loadJobs, 3000);
    } catch (error) {
      say("jobs-status", error.message, true);
      $("jobs-status").dataset.source = "poll";
      if (token() && !$("panel-jobs").hidden) listTimer = setTimeout(loadJobs, 10000); // a blip must not end updates
    }
  }

  function finalMetrics(job) {
    const m = job.metrics || {};
    const training = m.training || {};
    const gate = m.gate || {};
    const shadow = gate.shadow || {};
    return [
      ["Dev nDCG@10", training.final ? `${fixed(training.base["ndcg@10"])} → ${fixed(training.final["ndcg@10"])} ` +
        `(${training.dev_queries} dev queries, ${training.train_examples} training pairs)` : null],
      ["Alerts at the end", training.alerts ? (training.alerts.map((a) => a.mode).join(", ") || "none") : null],
      ["Release built", m.release ? `${m.release.id} (${m.release.documents} documents)` : null],
      ["Gate", gate.reason ? `${gate.passed ? "passed" : "failed"}: ${gate.reason}` : null],
      ["Shadow comparison", shadow.queries ? `top-10 overlap ${fixed(shadow.top10_overlap)}, ` +
        `Kendall's tau ${fixed(shadow.kendall_tau)} on ${shadow.queries} queries` : null],
    ];
  }

  async function openJobDetail(jobId) {
    openJob = jobId;
    for (const item of document.querySelectorAll(".job-item")) {
      item.setAttribute("aria-current", String(item.dataset.job === jobId));
    }
    $("job-detail").hidden = false;
    $("job-title").replaceChildren(`Job `, el("span", { class: "mono", text: jobId }));
    for (const id of ["job-summary", "job-progress-text", "job-phase", "job-message", "job-error", "job-metrics-json"]) {
      $(id).textContent = "";
    }
    $("job-error").hidden = true;
    $("job-cancel").disabled = $("job-retry").disabled = true;
    say("report-status", "");
    $("job-metrics").replaceChildren();
    $("report-panels").replaceChildren();
    $("report-log").replaceChildren();
    await refreshJob();
  }

  async function refreshJob() {
    clearTimeout(jobTimer); // one poll at a time, however often this is called
    const jobId = openJob;
    let job;
    try {
      job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`, undefined, true);
    } catch (error) {
      say("jobs-status", error.message, true);
      $("jobs-status").dataset.source = "poll";
      if (token() && jobId === openJob && !$("panel-jobs").hidden) jobTimer = setTimeout(refreshJob, 5000);
      return;
    }
    if (jobId !== openJob) return;
    $("job-title").replaceChildren(`Job `, el("span", { class: "mono", text: job.id }), " ", statusBadge(job.status));
    $("job-summary").textContent = `${job.kind} job, created ${when(job.created)}` +
      (job.finished ? `, finished ${when(job.finished)}` : "") + `; attempts ${job.attempts}.`;
    setProgress($("job-progress"), job);
    $("job-progress-text").textContent = progressText(job);
    setText($("job-phase"), `${job.status}${job.progress && job.progress.phase ? `: ${job.progress.phase}` : ""}`);
    $("job-cancel").disabled = TERMINAL.has(job.status) || job.cancel_requested;
    $("job-retry").disabled = !["failed", "cancelled"].includes(job.status);
    $("job-message").textContent = job.message || (job.cancel_requested ? "Cancellation requested." : "");
    $("job-error").hidden = !job.error;
    $("job-error").textContent = job.error || "";
    facts($("job-metrics"), finalMetrics(job));
    $("job-metrics-json").textContent = JSON.stringify({ metrics: job.metrics, outputs: job.outputs, params: job.params }, null, 2);
    $("report").hidden = job.kind !== "retrain";
    if (job.kind === "retrain") await refreshReport(job);
    if (!TERMINAL.has(job.status) && jobId === openJob && !$("panel-jobs").hidden) {
      jobTimer = setTimeout(refreshJob, 1000);
    } else {
      loadJobs();
    }
  }

  async function jobAction(path, message) {
    try {
      await api("POST", path, undefined, true);
      await refreshJob();
      await loadJobs();
      say("jobs-status", message);
    } catch (error) {
      say("jobs-status", error.message, true);
    }
  }

  $("job-cancel").addEventListener("click", () =>
    jobAction(`/v1/jobs/${encodeURIComponent(openJob)}/cancel`, `Cancelling job ${openJob}; what it built is removed.`));
  $("job-retry").addEventListener("click", () =>
    jobAction(`/v1/jobs/${encodeURIComponent(openJob)}/retry`, `Job ${openJob} was queued again.`));

  async function startJob(kind, body) {
    try {
      const job = await api("POST", `/v1/jobs/${kind}`, body, true);
      await loadJobs();
      say("jobs-status", `Started ${kind} job ${job.id}.`);
      await openJobDetail(job.id);
    } catch (error) {
      say("jobs-status", error.message, true);
    }
  }

  $("retrain-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const body = {};
    if ($("recipe").value === "custom") {
      if (!$("recipe-toml").value.trim()) {
        say("jobs-status", "Paste the recipe's TOML, or pick a named recipe.", true);
        return;
      }
      body.recipe_toml = $("recipe-toml").value;
    } else if ($("recipe").value) {
      body.recipe = $("recipe").value;
    } else {
      say("jobs-status", "The recipes could not be loaded; pick one once they are, or paste a TOML recipe.", true);
      return;
    }
    for (const name of ["queries", "qrels", "pairs", "corpus", "dev_queries", "dev_qrels"]) {
      const value = event.target.elements[name].value.trim();
      if (value) body[name] = value;
    }
    startJob("retrain", body);
  });

  $("reembed").addEventListener("click", () => startJob("reembed", {}));

  let recipes = null;

  async function loadRecipes() {
    if (recipes || !token()) return;
    try {
      recipes = (await api("GET", "/v1/jobs/recipes", undefined, true)).recipes;
    } catch (error) {
      say("jobs-status", error.message, true);
      return;
    }
    $("recipe").replaceChildren(...recipes.map((r) => el("option", { value: r.name, text: r.name })),
      el("option", { value: "custom", text: "custom (TOML)" }));
    showRecipe();
  }

  function showRecipe() {
    const chosen = $("recipe").value;
    $("recipe-toml-field").hidden = chosen !== "custom";
    const recipe = (recipes || []).find((r) => r.name === chosen);
    $("recipe-stages").textContent = recipe ? `Stages: ${recipe.stages.join(", ")}` : "A whole recipe as TOML.";
  }

  $("recipe").addEventListener("change", showRecipe);
  $("jobs-refresh").addEventListener("click", loadJobs);
  onShow.jobs = () => {
    loadRecipes();
    loadJobs();
    if (openJob) refreshJob();
  };

  // ---- the training report -------------------------------------------------------------------

  function ticks(low, high, count) {
    const step = (high - low) / (count - 1);
    return Array.from({ length: count }, (_, i) => low + i * step);
  }

  function label(value) {
    const size = Math.abs(value);
    if (size !== 0 && (size < 0.01 || size >= 10000)) return value.toExponential(1);
    return size >= 100 ? value.toFixed(0) : value.toFixed(size >= 10 ? 1 : 3);
  }

  function chart(panel) {
    const width = 480, height = 220, left = 52, right = 12, top = 10, bottom = 28;
    const points = panel.series.flatMap((s) => s.points);
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]).concat(panel.thresholds.map((t) => t.value));
    let [xLow, xHigh] = [Math.min(...xs), Math.max(...xs)];
    let [yLow, yHigh] = [Math.min(...ys), Math.max(...ys)];
    if (xHigh === xLow) xHigh = xLow + 1;
    if (yHigh === yLow) { yLow -= 0.5; yHigh += 0.5; }
    const pad = (yHigh - yLow) * 0.08;
    yLow -= pad;
    yHigh += pad;
    const x = (v) => left + ((v - xLow) / (xHigh - xLow)) * (width - left - right);
    const y = (v) => top + (1 - (v - yLow) / (yHigh - yLow)) * (height - top - bottom);
    const last = panel.series.filter((s) => s.points.length)
      .map((s) => `${s.label} ${label(s.points[s.points.length - 1][1])}`).join(", ");
    const thresholds = panel.thresholds.map((t) => `${t.label} ${label(t.value)}`).join(", ");
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": `${panel.caption}. Last values: ${last}.${thresholds ? ` Thresholds: ${thresholds}.` : ""}`,
    });
    for (const v of ticks(yLow + pad, yHigh - pad, 4)) {
      root.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      root.append(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, label(v)));
    }
    for (const v of new Set(ticks(xLow, xHigh, 5).map(Math.round))) {
      root.append(svg("text", { x: x(v), y: height - 8, "text-anchor": "middle" }, String(v)));
    }
    root.append(svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }));
    root.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
    for (const t of panel.thresholds) {
      root.append(svg("line", { class: "threshold", x1: left, x2: width - right, y1: y(t.value), y2: y(t.value) }));
      root.append(svg("text", { class: "threshold-label", x: width - right - 4, y: y(t.value) - 4, "text-anchor": "end" }, t.label));
    }
    panel.series.forEach((series, i) => {
      if (!series.points.length) return;
      const color = COLORS[i % COLORS.length];
      const path = series.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { class: "series", points: path, fill: "none", stroke: color, "stroke-width": 2 }));
      if (series.points.length <= 60) {
        for (const p of series.points) root.append(svg("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: color }));
      }
    });
    return root;
  }

  function legend(panel) {
    const items = panel.series.filter((s) => s.points.length).map((s) =>
      el("li", {}, el("span", { class: `swatch-${panel.series.indexOf(s) % COLORS.length}` }), s.label));
    for (const t of panel.thresholds) items.push(el("li", {}, el("span", { class: "dashed" }), `${t.label} (${label(t.value)})`));
    return el("ul", { class: "legend" }, items);
  }

  function panelFigure(panel, running) {
    const hasData = panel.series.some((s) => s.points.length);
    const title = el("figcaption", {}, panel.title);
    if (panel.fired) title.append(el("span", { class: "badge bad", text: "alert fired" }));
    const figure = el("figure", { class: panel.fired ? "panel fired" : "panel", "data-panel": panel.key },
      title, el("p", { class: "caption", text: panel.caption }));
    if (hasData) figure.append(chart(panel), legend(panel));
    else figure.append(el("p", { class: "hint", text: running ? "No points logged yet." : "This run did not log this signal." }));
    if (panel.fired) {
      figure.append(el("div", { class: "remedy" }, el("strong", { text: `${panel.mode}: ` }), `remedy: ${panel.remedy}`,
        el("ul", {}, panel.alerts.slice(-3).map((message) => el("li", { text: message })))));
    }
    return figure;
  }

  async function refreshReport(job) {
    let report;
    try {
      report = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}/report`, undefined, true);
    } catch (error) {
      say("report-status", error.message, true);
      return;
    }
    if (job.id !== openJob) return;
    const running = !TERMINAL.has(job.status);
    const fired = report.panels.filter((p) => p.fired).map((p) => p.title);
    say("report-status", report.records === 0
      ? "Training has not logged anything yet."
      : `${report.records} log records. ${fired.length ? `Alerts: ${fired.join(", ")}.` : "No failure-mode alert fired."}`);
    $("report-panels").replaceChildren(...report.panels
      .filter((p) => running || p.series.some((s) => s.points.length))
      .map((p) => panelFigure(p, running)));
    $("report-log").replaceChildren(...report.events.map((e) =>
      el("li", { class: e.type === "alert" ? "alert" : null,
        text: `${typeof e.time === "number" ? `${new Date(e.time * 1000).toLocaleTimeString()} ` : ""}${e.text}` })));
  }

  // ---- the drift probe -----------------------------------------------------------------------

  $("drift-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { sample: Number($("drift-sample").value), threshold: Number($("drift-threshold").value) };
    say("drift-status", "Re-encoding the sample…");
    try {
      const probe = await api("POST", "/v1/admin/drift-probe", body, true);
      say("drift-status", `Probed ${probe.sample} documents of release ${probe.release} in ${probe.elapsed_ms.toFixed(0)} ms.`);
      const drifted = probe.below_threshold > 0;
      const verdict = $("drift-verdict");
      verdict.className = drifted ? "verdict bad" : "verdict good";
      verdict.textContent = drifted
        ? `${probe.below_threshold} of ${probe.sample} documents (${percent(probe.share_below)}) drifted below cosine ` +
          `${probe.threshold}: the stored vectors no longer match the live model. Re-embed the corpus (Jobs, ` +
          "\"Re-embed the corpus with the live model\") or rebuild the release."
        : `All ${probe.sample} sampled documents re-encode to their stored vectors (cosine ≥ ${probe.threshold}).`;
      facts($("drift-facts"), [
        ["Release", probe.release],
        ["Model fingerprint", el("code", { text: probe.model_fingerprint })],
        ["Precision, index", `${probe.precision}, ${probe.index_type}`],
        ["Mean cosine", fixed(probe.mean_cosine, 6)],
        ["Minimum cosine", fixed(probe.min_cosine, 6)],
        ["Below threshold", `${probe.below_threshold} (${percent(probe.share_below)})`],
      ]);
      $("drift-worst").replaceChildren(...probe.worst.map((doc) => el("tr", {},
        el("td", {}, el("code", { text: doc.id })), el("td", { text: doc.title || "–" }), el("td", { text: fixed(doc.cosine, 6) }))));
      $("drift-result").hidden = false;
    } catch (error) {
      say("drift-status", error.message, true);
    }
  });

  // ---- start ---------------------------------------------------------------------------------

  showTokenState();
  showServing();
  setInterval(showServing, 5000);
  const initial = location.hash.slice(1);
  selectTab(tabs.some((tab) => tab.dataset.tab === initial) ? initial : "search");
})();
