// hvobs serve: the live fleet view. Plain JavaScript, no build step.
//
// On load the page reads the views from the JSON API (events, agents, sagas, spawn trees),
// then follows /api/stream (server-sent events read through fetch, so a bearer token can be
// sent as a header). Each "events" message is added to the feed at once; the derived views
// (tree, breaches, sagas) are re-read when events of their kind arrive, at most about once a
// second. When the stream ends or fails the page reconnects with the last id it received
// (Last-Event-ID), so no event is missed or shown twice; a "reset" message (events were
// missed) reloads every view. All data enters the page as text (textContent), never as HTML.
"use strict";

(function () {
  const FEED_MAX = 200;
  const SAGAS_SHOWN = 6;
  const TRACES_SHOWN = 4;
  const REFRESH_MS = 800;

  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem("hvobs-token") || "",
    lastId: null,
    reconnects: 0,
    events: 0,
    dirty: { agents: false, sagas: false },
    refreshTimer: null,
    latestEventTime: 0,
  };
  // Exposed for tests and curious operators: how many times the stream reconnected.
  window.hvobs = state;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (state.token) h.Authorization = "Bearer " + state.token;
    return h;
  }

  class Unauthorized extends Error {}

  async function api(path) {
    const response = await fetch(path, { headers: headers() });
    if (response.status === 401) throw new Unauthorized("token needed");
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  function setConnection(name, text) {
    const node = $("connection");
    node.dataset.state = name;
    node.textContent = text;
  }

  function askToken() {
    const form = $("token-form");
    form.hidden = false;
    setConnection("connecting", "token needed");
    form.onsubmit = (ev) => {
      ev.preventDefault();
      state.token = $("token-input").value.trim();
      sessionStorage.setItem("hvobs-token", state.token);
      form.hidden = true;
      start();
    };
  }

  // -- formatting ------------------------------------------------------------------------

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    const pad = (n, w) => String(n).padStart(w || 2, "0");
    return pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" + pad(d.getUTCSeconds()) +
      "." + pad(d.getUTCMilliseconds(), 3);
  }

  function secondsText(s) {
    if (s === null || s === undefined) return "";
    return s < 10 ? s.toFixed(2) + " s" : s < 120 ? s.toFixed(1) + " s" : Math.round(s) + " s";
  }

  function eventSeconds(ev) {
    const t = Date.parse(ev.timestamp);
    return Number.isNaN(t) ? 0 : t / 1000;
  }

  function payloadText(payload) {
    if (!payload || typeof payload !== "object") return "";
    return Object.entries(payload)
      .slice(0, 6)
      .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : String(v)))
      .join(" ")
      .slice(0, 240);
  }

  // -- live event feed --------------------------------------------------------------------

  function addEvents(events, fresh) {
    const feed = $("feed");
    const fragment = document.createDocumentFragment();
    for (const ev of events) {
      const category = String(ev.event_type).split(".")[0];
      const item = el("li", "event cat-" + category + (fresh ? " new" : ""));
      if (ev.event_type === "ring.breach_detected") item.classList.add("breach");
      if (ev.event_type === "saga.step_failed" || ev.event_type === "saga.escalated") {
        item.classList.add("failed");
      }
      item.dataset.eventId = ev.event_id;
      item.dataset.eventType = ev.event_type;
      const seconds = eventSeconds(ev);
      state.latestEventTime = Math.max(state.latestEventTime, seconds);
      const time = el("time", "when", clock(seconds));
      time.dateTime = ev.timestamp;
      item.append(
        time,
        el("span", "etype", ev.event_type),
        el("span", "agent mono", ev.agent_did || "—"),
        el("span", "payload", payloadText(ev.payload)),
      );
      fragment.prepend(item);
    }
    feed.prepend(fragment);
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  }

  function onEvents(events) {
    state.events += events.length;
    addEvents(events, true);
    for (const ev of events) {
      const category = String(ev.event_type).split(".")[0];
      if (category === "saga") state.dirty.sagas = true;
      else state.dirty.agents = true;
    }
    scheduleRefresh();
  }

  function scheduleRefresh() {
    if (state.refreshTimer !== null) return;
    state.refreshTimer = setTimeout(async () => {
      state.refreshTimer = null;
      const dirty = state.dirty;
      state.dirty = { agents: false, sagas: false };
      try {
        const jobs = [loadStatus()];
        if (dirty.agents) jobs.push(loadAgents(), loadTrees());
        if (dirty.sagas) jobs.push(loadSagas(), loadTrees());
        await Promise.all(jobs);
      } catch (err) {
        if (err instanceof Unauthorized) askToken();
      }
    }, REFRESH_MS);
  }

  // -- spawn tree -------------------------------------------------------------------------

  function ringBadge(ring) {
    if (ring === null || ring === undefined) return el("span", "ring", "ring ?");
    return el("span", "ring ring-" + ring, "ring " + ring);
  }

  function renderTree(trace) {
    const box = el("div", "trace");
    box.dataset.traceId = trace.trace_id;
    box.append(el("p", "trace-title", "trace " + trace.trace_id + " · " + trace.nodes.length +
      " spans"));
    const lists = new Map();
    const root = el("ul", "tree");
    box.append(root);
    const byId = new Map(trace.nodes.map((n) => [n.span_id, n]));
    for (const node of trace.nodes) {
      const item = el("li", "tree-node");
      item.dataset.spanId = node.span_id;
      if (node.agent_did) item.dataset.agent = node.agent_did;
      const line = el("span", "node");
      line.append(el("span", "did", node.agent_did || "(no agent)"), ringBadge(node.ring));
      if (node.elevated) line.append(el("span", "badge elevated", "elevated"));
      if (node.breaches > 0) {
        line.append(el("span", "badge breach",
          node.breaches + (node.breaches === 1 ? " breach" : " breaches")));
      }
      line.append(el("code", "span-id", "span " + node.span_id));
      item.append(line);
      const parentList = node.depth > 0 && byId.has(node.parent_span_id)
        ? lists.get(node.parent_span_id) : root;
      (parentList || root).append(item);
      const children = el("ul");
      item.append(children);
      lists.set(node.span_id, children);
    }
    for (const list of lists.values()) if (!list.children.length) list.remove();
    return box;
  }

  async function loadTrees() {
    const list = await api("/api/traces?limit=" + TRACES_SHOWN);
    const trees = await Promise.all(
      list.traces.map((t) => api("/api/traces/" + encodeURIComponent(t.trace_id))),
    );
    const box = $("trees");
    box.replaceChildren(...trees.map(renderTree));
    if (!trees.length) box.append(el("p", "empty", "no causal trace ids seen yet"));
  }

  // -- breaches and elevations ------------------------------------------------------------

  async function loadAgents() {
    const [breached, elevated] = await Promise.all([
      api("/api/agents?breached=true&limit=50"),
      api("/api/agents?elevated=true&limit=50"),
    ]);
    const breaches = $("breaches");
    const rows = breached.agents.slice().sort((a, b) => b.breaches - a.breaches);
    breaches.replaceChildren(...rows.map((a) => {
      const item = el("li");
      item.dataset.agent = a.agent_did;
      item.append(
        el("span", "did", a.agent_did), " ",
        el("span", "count", a.breaches + (a.breaches === 1 ? " breach" : " breaches")), " ",
        ringBadge(a.ring),
        el("span", "saga-meta", " last seen " + clock(a.last_seen)),
      );
      return item;
    }));
    if (!rows.length) breaches.append(el("li", "empty", "no breaches"));
    const list = $("elevated");
    list.replaceChildren(...elevated.agents.map((a) => {
      const item = el("li");
      item.dataset.agent = a.agent_did;
      item.append(el("span", "did", a.agent_did), " ", ringBadge(a.ring),
        el("span", "saga-meta", " for " + secondsText(a.elevated_seconds)));
      return item;
    }));
    if (!elevated.agents.length) list.append(el("li", "empty", "no agent is elevated"));
  }

  // -- saga timeline ----------------------------------------------------------------------

  const STATE_TEXT = {
    running: "running",
    failed: "failed",
    compensating: "compensating",
    completed: "completed",
    rolled_back: "rolled back",
    escalated: "escalated",
  };

  function niceStep(total) {
    const raw = total / 5;
    const power = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    for (const m of [1, 2, 5, 10]) if (raw <= m * power) return m * power;
    return 10 * power;
  }

  function tickText(t, step) {
    const digits = step >= 1 ? 0 : step >= 0.1 ? 1 : 2;
    return t.toFixed(digits) + " s";
  }

  function renderSaga(saga, now) {
    const box = el("article", "saga state-" + saga.state);
    box.dataset.sagaId = saga.saga_id;
    const head = el("div", "saga-head");
    const end = saga.ended_at !== null ? saga.ended_at : Math.max(now, saga.started_at);
    const spans = saga.spans.map((s) => Object.assign({}, s, {
      end: s.end_time !== null ? s.end_time : Math.max(now, s.start_time),
    }));
    const start = Math.min(saga.started_at, ...spans.map((s) => s.start_time));
    const stop = Math.max(end, ...spans.map((s) => s.end));
    const total = Math.max(stop - start, 0.001);
    head.append(
      el("span", "saga-id", saga.saga_id),
      el("span", "saga-state", STATE_TEXT[saga.state] || saga.state),
      el("span", "saga-meta", (saga.agent_did || "") + " · " + secondsText(stop - start) +
        (saga.failed_steps ? " · " + saga.failed_steps + " failed" : "") +
        (saga.compensations ? " · " + saga.compensations + " compensated" : "")),
    );
    box.append(head);
    const axis = el("div", "axis");
    const step = niceStep(total);
    for (let t = 0; t <= total + 1e-9; t += step) {
      const tick = el("span", "tick", tickText(t, step));
      tick.style.left = (t / total) * 100 + "%";
      axis.append(tick);
    }
    const lanes = el("div", "lanes");
    for (const span of spans) {
      const lane = el("div", "lane lane-" + span.kind);
      const failed = span.kind === "step" && span.status === "error";
      const label = span.kind === "saga" ? "saga " + (STATE_TEXT[saga.state] || "")
        : (span.kind === "compensation" ? "compensate " : "step ") +
          (span.step_action || span.step_id) +
          (failed ? " ✕ failed" : span.status === "running" ? " (running)" : "");
      const labelNode = el("span", "lane-label", label);
      labelNode.title = label;
      const track = el("div", "track");
      const kindClass = span.kind === "saga" ? "saga" : span.status;
      const bar = el("div", "bar " + kindClass + (failed ? " failed" : ""),
        secondsText(span.end - span.start_time));
      bar.dataset.kind = span.kind;
      bar.dataset.status = span.status;
      // A compensation span exists once the compensation happened; its published status
      // ("compensating") would read as still under way.
      const shown = span.kind === "compensation" && span.status === "compensating"
        ? "compensated" : span.status;
      bar.title = span.name + " · " + shown + " · " + secondsText(span.end - span.start_time) +
        (span.attributes && span.attributes["agent.saga.error"]
          ? " · " + span.attributes["agent.saga.error"] : "");
      bar.style.left = ((span.start_time - start) / total) * 100 + "%";
      bar.style.width = Math.max(((span.end - span.start_time) / total) * 100, 0.4) + "%";
      track.append(bar);
      lane.append(labelNode, track);
      lanes.append(lane);
    }
    box.append(axis, lanes);
    return box;
  }

  async function loadSagas() {
    const data = await api("/api/sagas?limit=" + SAGAS_SHOWN);
    const now = Math.max(Date.now() / 1000, state.latestEventTime);
    const box = $("timeline");
    box.replaceChildren(...data.sagas.map((s) => renderSaga(s, now)));
    if (!data.sagas.length) box.append(el("p", "empty", "no sagas seen yet"));
  }

  // -- status -----------------------------------------------------------------------------

  async function loadStatus() {
    const s = await api("/api/status");
    $("source").textContent = s.source;
    $("counts").textContent = s.events_indexed + " events indexed · " + s.view.agents +
      " agents · " + s.view.sagas + " sagas";
  }

  // -- the stream -------------------------------------------------------------------------

  function handleMessage(kind, id, data) {
    if (id) state.lastId = id;
    if (kind === "events") {
      onEvents(JSON.parse(data));
    } else if (kind === "reset") {
      reloadViews();
    }
  }

  async function follow() {
    const h = headers({ Accept: "text/event-stream" });
    if (state.lastId) h["Last-Event-ID"] = state.lastId;
    const response = await fetch("/api/stream", { headers: h, cache: "no-store" });
    if (response.status === 401) throw new Unauthorized("token needed");
    if (!response.ok || !response.body) throw new Error("stream: HTTP " + response.status);
    setConnection("live", "live");
    state.backoff = 500;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") kind = val;
          else if (field === "id") id = val;
          else if (field === "data") data.push(val);
        }
        if (data.length || id) handleMessage(kind, id, data.join("\n"));
      }
    }
  }

  async function streamForever() {
    state.backoff = 500;
    for (;;) {
      try {
        await follow();
      } catch (err) {
        if (err instanceof Unauthorized) {
          askToken();
          return;
        }
      }
      state.reconnects += 1;
      setConnection("reconnecting", "reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, state.backoff));
      state.backoff = Math.min(state.backoff * 2, 8000);
    }
  }

  async function reloadViews() {
    const page = await api("/api/events?limit=60");
    $("feed").replaceChildren();
    addEvents(page.events, false);
    await Promise.all([loadStatus(), loadAgents(), loadSagas(), loadTrees()]);
    return page;
  }

  async function start() {
    try {
      const page = await reloadViews();
      // Follow from the index position the events were read at: nothing missed, no repeat.
      state.lastId = page.stream_id;
    } catch (err) {
      if (err instanceof Unauthorized) {
        askToken();
        return;
      }
      setConnection("reconnecting", "server unreachable, retrying…");
      setTimeout(start, 2000);
      return;
    }
    streamForever();
  }

  start();
})();
