
"use strict";
(() => {
  const POLL_MS = 1000;
  const LOG_MAX = 2000000; // characters of log kept in the page
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
  const $ = (id) => document.getElementById(id);

  // Every string from the API goes into the page as a text node or an attribute value.
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else el.setAttribute(k, String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  function dur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "\u2013";
    s = Math.max(0, s);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.floor(s) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    const hr = Math.floor(m / 60);
    if (hr < 24) return hr + " h " + String(m % 60).padStart(2, "0") + " min";
    return Math.floor(hr / 24) + " d " + (hr % 24) + " h";
  }
  const nowSec = () => Date.now() / 1000;
  const stamp = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "");
  function size(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  const shq = (a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'");
  const shell = (argv) => (argv || []).map(String).map(shq).join(" ");
  // What a list shows of a command: the script itself for `sh -c SCRIPT` (the shell quoting
  // around it only gets in the way of reading it), the quoted argv otherwise.
  const SHELLS = /^(\/usr)?(\/bin\/)?(ba|da|z)?sh$/;
  function display(argv) {
    argv = (argv || []).map(String);
    if (argv.length >= 3 && SHELLS.test(argv[0]) && argv[1] === "-c") {
      return argv[2] + (argv.length > 3 ? "  \u00b7 " + shell(argv.slice(3)) : "");
    }
    return shell(argv);
  }
  const buildHref = (id) => "#build/" + encodeURIComponent(id);
  const apiBuild = (id) => "builds/" + encodeURIComponent(id);

  // Counters that move between polls: "ping" adds local time to the last sinceLastPing,
  // "since" and "ago" count from a wall-clock timestamp.
  function ticker(kind, base, at) {
    const el = h("span", {class: "tick num"});
    el._kind = kind; el._base = base; el._at = at;
    renderTick(el);
    return el;
  }
  function renderTick(el) {
    const s = el._kind === "ping"
      ? el._base + (performance.now() - el._at) / 1000
      : nowSec() - el._base;
    el.textContent = dur(s) + (el._kind === "ago" ? " ago" : "");
  }
  setInterval(() => document.querySelectorAll(".tick").forEach(renderTick), 250);

  // Keeps rows whose data did not change (so hovering and selecting text survive polls).
  function reconcile(parent, items, key, sig, render) {
    const old = new Map();
    for (const el of parent.children) old.set(el._key, el);
    const els = items.map((item) => {
      const k = key(item), s = sig(item), prev = old.get(k);
      if (prev && prev._sig === s) return prev;
      const el = render(item);
      el._key = k; el._sig = s;
      return el;
    });
    const kids = parent.children;
    if (els.length !== kids.length || els.some((el, i) => kids[i] !== el)) {
      parent.replaceChildren(...els);
    }
    return els;
  }

  // -- the runner's token ---------------------------------------------------------------
  // A runner started with --token-file --http-token-for-reads answers reads with 403 unless
  // they carry "Authorization: Bearer <token>".  The page gets the token once per tab, either
  // from the address (open "/#token=<token>": a fragment never reaches a server, and it is
  // removed from the address and history entry at once) or from the prompt shown on a 403;
  // it keeps it in sessionStorage (this tab only, gone when the tab closes) and sends it with
  // every request, output downloads and the raw log included.
  const TOKEN_KEY = "hydra-trio-token";
  let token = "";
  try { token = sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { /* storage off */ }
  function setToken(value) {
    token = value.trim();
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage off: the token lasts until the page is reloaded */ }
  }
  function takeTokenFromHash() {
    const m = /^#token=(.*)$/.exec(location.hash);
    if (!m) return;
    let value = m[1];
    try { value = decodeURIComponent(value); } catch (e) { /* use it as it is */ }
    setToken(value);
    history.replaceState(null, "", location.pathname + location.search);
  }
  const authHeaders = (extra) => Object.assign(token ? {Authorization: "Bearer " + token} : {},
    extra || {});

  function askForToken(why) {
    $("auth-why").textContent = why + (token ? " (the token given is not accepted)" : "");
    if ($("auth").hidden) {
      $("auth").hidden = false;
      $("auth-token").value = "";
      $("auth-token").focus();
    }
  }
  function useToken() {
    setToken($("auth-token").value);
    $("auth-token").value = "";
    $("auth").hidden = true;
    if (current && current.logCtl) current.logCtl.abort();
    if (current) Object.assign(current, {logMode: "none", logRetryAt: 0});
    schedule(0);
  }
  $("auth-use").addEventListener("click", useToken);
  $("auth-token").addEventListener("keydown", (ev) => { if (ev.key === "Enter") useToken(); });

  // With a token, links to outputs and the raw log (which a plain navigation could not send
  // it with) are fetched with it and saved from memory.
  document.addEventListener("click", (ev) => {
    const a = ev.target instanceof Element ? ev.target.closest("a[data-save-as]") : null;
    if (!a || !token || ev.button !== 0) return;
    ev.preventDefault();
    saveAs(a.getAttribute("href"), a.dataset.saveAs);
  });
  async function saveAs(url, name) {
    try {
      const r = await fetch(url, {headers: authHeaders(), cache: "no-store"});
      if (!r.ok) throw new Error(await errorText(r));
      const href = URL.createObjectURL(await r.blob());
      const link = h("a", {href, download: name, hidden: true});
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(href), 60000);
    } catch (e) {
      const banner = $("banner");
      banner.hidden = false;
      banner.textContent = "Cannot download " + name + ": " + e.message;
    }
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      if (body && typeof body.error === "string") return body.error;
    } catch (e) { /* not JSON */ }
    return r.status + " " + r.statusText;
  }
  // A state-changing call (cancel, drain, undrain), with the token when there is one.  Its
  // error goes to the banner; a 403 asks for the token.
  async function post(url, what) {
    try {
      const r = await fetch(url, {method: "POST", cache: "no-store",
        headers: authHeaders({Accept: "application/json"})});
      if (!r.ok) {
        const message = await errorText(r);
        if (r.status === 403) askForToken(message);
        throw new Error(message);
      }
      $("notice").hidden = true;
      return true;
    } catch (e) {
      $("notice").hidden = false;
      $("notice").textContent = "Cannot " + what + ": " + e.message;
      return false;
    } finally {
      schedule(0);
    }
  }
  // A button that acts on a second click within 4 s of the first (which says what it will
  // do); it stays disabled while the call runs, and comes back if the call failed.
  function arm(button, label, ask, act) {
    let armedAt = -Infinity;
    button.addEventListener("click", async (ev) => {
      ev.preventDefault();
      if (performance.now() - armedAt > 4000) {
        armedAt = performance.now();
        button.textContent = ask;
        setTimeout(() => { if (!button.disabled) button.textContent = label; }, 4000);
        return;
      }
      armedAt = -Infinity;
      button.disabled = true;
      button.textContent = label + "\u2026";
      if (!(await act())) { button.disabled = false; button.textContent = label; }
    });
    return button;
  }

  async function getJSON(url) {
    const r = await fetch(url, {headers: authHeaders({Accept: "application/json"}),
      cache: "no-store"});
    if (!r.ok) {
      const err = new Error(await errorText(r));
      err.status = r.status;
      throw err;
    }
    return r.json();
  }

  // -- overview ------------------------------------------------------------------------
  const MACHINE_BADGE = {connected: "ok", draining: "warn", disconnected: "bad"};

  function stateBadge(b) {
    if (b.state === "running") return h("span", {class: "badge run"}, b.phase || "running");
    if (b.state === "queued") return h("span", {class: "badge"}, "queued");
    const cls = b.state === "succeeded" ? "ok" : b.state === "failed" ? "bad" : "";
    return h("span", {class: "badge " + cls}, b.status || b.state);
  }

  function machineRow(m) {
    const down = m.state === "disconnected";
    const bar = h("span", {class: "bar"}, h("span"));
    const pct = m.maxJobs ? Math.min(100, (100 * m.currentJobs) / m.maxJobs) : 0;
    bar.firstChild.style.width = pct + "%";
    const ping = ticker("ping", m.sinceLastPing, performance.now());
    const features = [...(m.supportedFeatures || [])];
    for (const f of m.mandatoryFeatures || []) if (!features.includes(f)) features.push(f);
    const row = h("tr", {class: down ? "down" : null},
      h("td", {title: "machine id " + m.machineId}, h("strong", null, m.hostname),
        h("div", {class: "sub mono"}, m.machineId)),
      h("td", {class: "wrap"},
        h("span", {class: "badge " + (MACHINE_BADGE[m.state] || "")}, m.state),
        down && m.disconnectReason ? h("div", {class: "sub"}, m.disconnectReason) : null),
      h("td", {class: "num"}, bar, m.currentJobs + " / " + m.maxJobs),
      h("td", {class: "num"}, ping),
      h("td", {class: "wrap"}, (m.systems || []).join(", "),
        features.length ? h("div", {class: "sub"}, "features: " + features.join(", ")) : null),
      h("td", {class: "num"},
        h("span", {class: "good", title: "succeeded builds"}, "\u2713 " + m.succeededBuilds),
        "  ",
        h("span", {class: "fail", title: "failed builds"}, "\u2717 " + m.failedBuilds),
        "  ",
        h("span", {class: m.lostBuilds ? "lost" : "sub", title: "builds lost with the machine"},
          "lost " + m.lostBuilds)),
      h("td", {class: "num", title: "load average (1 min) and free disk in the work dir"},
        down ? "\u2013" : "load " + Number(m.load || 0).toFixed(2),
        m.diskFree && !down ? h("div", {class: "sub"}, size(m.diskFree) + " disk free") : null),
      h("td", {class: "act"}, machineAction(m)));
    row._ping = ping;
    return row;
  }

  // Drain (no new builds; a connected builder leaves once its builds are done) and undrain
  // (the runner gives it builds again), each on the machine's id.
  function machineAction(m) {
    const path = "machines/" + encodeURIComponent(m.machineId);
    if (m.drainRequested) {
      const b = h("button", {type: "button", class: "small",
        title: "give this machine builds again"}, "Undrain");
      b.addEventListener("click", async () => {
        b.disabled = true;
        if (!(await post(path + "/undrain", "undrain " + m.hostname))) b.disabled = false;
      });
      return b;
    }
    if (m.state === "disconnected") return null;
    return arm(h("button", {type: "button", class: "small",
      title: "no new builds; a connected builder leaves once its builds are done"}, "Drain"),
    "Drain", "Drain? Click again", () => post(path + "/drain", "drain " + m.hostname));
  }

  function buildRow(b) {
    let detail, time;
    if (b.state === "running") {
      detail = ["on ", h("strong", null, b.machine || "?"),
        b.attempts > 1 ? " \u00b7 attempt " + b.attempts : null];
      time = b.startedAt ? ticker("since", b.startedAt) : null;
    } else if (b.state === "queued") {
      detail = [b.waitingReason || "",
        b.attempts ? " \u00b7 tried " + b.attempts + "\u00d7" : null];
      time = ["queued ", ticker("ago", b.submittedAt)];
    } else {
      detail = [b.machine ? "on " + b.machine : null,
        b.error ? " \u00b7 " + b.error
          : b.state === "failed" && b.exitCode !== null ? " \u00b7 exit " + b.exitCode : null];
      time = [b.startedAt && b.finishedAt ? dur(b.finishedAt - b.startedAt) + " \u00b7 " : null,
        ticker("ago", b.finishedAt || b.submittedAt)];
    }
    return h("li", null, h("a", {href: buildHref(b.id), title: shell(b.command)},
      h("span", null, stateBadge(b)),
      h("code", {class: "c-id"}, b.id),
      h("span", {class: "c-what"}, b.name ? [h("strong", null, b.name), "  "] : null,
        h("code", null, display(b.command))),
      h("span", {class: "c-detail"}, detail),
      h("span", {class: "c-time"}, time)));
  }

  // Builds of one graph (linked by `after` within the list) are shown as a group: a header
  // row naming them and what became of them, then the builds, indented.  A graph's builds
  // were submitted together, so they are next to each other in the list.
  function withGroups(builds) {
    const parent = new Map(builds.map((b) => [b.id, b.id]));
    const root = (id) => {
      while (parent.get(id) !== id) id = parent.get(id);
      return id;
    };
    for (const b of builds) {
      for (const dep of b.after || []) if (parent.has(dep)) parent.set(root(dep), root(b.id));
    }
    const members = new Map();
    for (const b of builds) {
      const r = root(b.id);
      if (!members.has(r)) members.set(r, []);
      members.get(r).push(b);
    }
    const items = [], headed = new Set();
    for (const b of builds) {
      const group = members.get(root(b.id));
      if (group.length > 1 && !headed.has(group)) {
        headed.add(group);
        items.push({group});
      }
      items.push(group.length > 1 ? Object.assign({inGroup: true}, b) : b);
    }
    return items;
  }
  function groupRow(item) {
    const counts = {};
    for (const b of item.group) {
      const what = b.state === "failed" ? b.status || "failed" : b.state;
      counts[what] = (counts[what] || 0) + 1;
    }
    const names = item.group.map((b) => b.name || b.id).reverse().join(", ");
    return h("li", {class: "group"},
      h("span", {class: "g-title"}, "graph of " + item.group.length + " builds: ", names),
      h("span", {class: "sub"}, "  " + Object.entries(counts).map(([k, n]) => n + " " + k)
        .join(", ")));
  }
  const itemKey = (item) => (item.group ? "g:" + item.group.map((b) => b.id).join(",") : item.id);
  const itemRow = (item) => {
    if (item.group) return groupRow(item);
    const row = buildRow(item);
    if (item.inGroup) row.classList.add("in-group");
    return row;
  };

  function renderList(name, data, skipped) {
    const builds = data.builds || [];
    reconcile($(name), withGroups(builds), itemKey, (item) => JSON.stringify(item), itemRow);
    const total = typeof data.total === "number" ? data.total : builds.length;
    skipped = skipped || 0;
    $("n-" + name).textContent = skipped
      ? "(" + (skipped + 1) + "\u2013" + (skipped + builds.length) + " of " + total + ")"
      : total > builds.length ? "(newest " + builds.length + " of " + total + ")"
      : "(" + builds.length + ")";
  }

  // -- the builds list: a state filter, a text search and pages of PAGE builds --------------
  // A page is asked for with the cursor the previous one answered (``next``); going back pops
  // the cursors.  Changing the filter or the search starts again from the newest build.
  const PAGE = 50;
  const list = {state: "succeeded,failed,cancelled", text: "", cursors: [], next: null};
  function listURL() {
    const q = new URLSearchParams({limit: String(PAGE)});
    if (list.state) q.set("state", list.state);
    if (list.text) q.set("q", list.text);
    const cursor = list.cursors[list.cursors.length - 1];
    if (cursor) q.set("cursor", cursor);
    return "builds?" + q.toString();
  }
  function listChanged() {
    list.cursors = []; list.next = null;
    schedule(0);
  }
  $("f-state").addEventListener("change", () => { list.state = $("f-state").value; listChanged(); });
  let typing = 0;
  $("f-text").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { list.text = $("f-text").value.trim(); listChanged(); }, 250);
  });
  $("page-older").addEventListener("click", () => {
    if (!list.next) return;
    list.cursors.push(list.next);
    schedule(0);
  });
  $("page-newer").addEventListener("click", () => {
    list.cursors.pop();
    schedule(0);
  });

  async function pollOverview() {
    const [st, running, queued, recent] = await Promise.all([
      getJSON("status"),
      getJSON("builds?state=running&limit=500"),
      getJSON("builds?state=queued&limit=50"),
      getJSON(listURL()),
    ]);
    if (current) return; // the page switched to a build meanwhile
    const q = st.queue || {};
    $("counts").replaceChildren(...[
      ["queued", ""], ["running", "run"], ["succeeded", "ok"], ["failed", "bad"],
      ["cancelled", ""],
    ].map(([k, cls]) => h("span", {class: "badge " + (q[k] ? cls : "")}, k + " " + (q[k] || 0))));
    document.title = "hydra-trio \u2013 " + (q.running || 0) + " running, "
      + (q.queued || 0) + " queued";

    const at = performance.now();
    const machines = [...(st.machines || [])].sort((a, b) =>
      a.hostname.localeCompare(b.hostname) || a.machineId.localeCompare(b.machineId));
    const rows = reconcile($("machines"), machines, (m) => m.machineId, (m) => {
      const {sinceLastPing, load, diskFree, ...rest} = m;
      return JSON.stringify([rest, Math.round(load * 100), Math.round(diskFree / 2 ** 20)]);
    }, machineRow);
    rows.forEach((row, i) => { row._ping._base = machines[i].sinceLastPing; row._ping._at = at; });
    $("machines-empty").hidden = machines.length > 0;
    const byState = {};
    for (const m of machines) byState[m.state] = (byState[m.state] || 0) + 1;
    $("n-machines").textContent = machines.length
      ? "(" + Object.entries(byState).map(([s, n]) => n + " " + s).join(", ") + ")" : "";

    renderList("running", running);
    renderList("queued", queued);
    list.next = recent.next || null;
    renderList("recent", recent, list.cursors.length * PAGE);
    $("page-older").disabled = !list.next;
    $("page-newer").disabled = list.cursors.length === 0;
  }

  // -- one build -----------------------------------------------------------------------
  let current = null; // the build view's state, or null on the overview

  function newView(id) {
    return {id, build: null, sig: null, logMode: "none", logCtl: null, logRetryAt: 0,
      buf: "", pending: "", reflow: false, dropped: 0, painting: false};
  }

  function when(ts) {
    return [h("time", null, stamp(ts)), " (", ticker("ago", ts), ")"];
  }
  function buildLinks(ids) {
    return ids.map((id, i) => [i ? ", " : null,
      h("a", {href: buildHref(id)}, h("code", null, id))]);
  }

  function renderBuild(view, b) {
    const sig = JSON.stringify(b);
    if (view.sig === sig) return;
    view.sig = sig;
    document.title = "hydra-trio \u2013 " + (b.name || b.id) + " (" + (b.status || b.state) + ")";
    $("b-title").replaceChildren(stateBadge(b), h("span", null, b.name || b.id));
    const rows = [];
    const add = (label, ...value) => rows.push(h("dt", null, label), h("dd", null, ...value));
    add("ID", h("code", null, b.id));
    if (b.name) add("Name", b.name);
    add("State", b.state, b.phase ? " \u00b7 " + b.phase : null);
    if (b.status) add("Status", b.status);
    if (b.waitingReason) add("Waiting", b.waitingReason);
    add("Command", h("code", null, shell(b.command)));
    add("System", b.system);
    if ((b.requiredFeatures || []).length) add("Features", b.requiredFeatures.join(", "));
    if ((b.after || []).length) add("After", buildLinks(b.after));
    if ((b.waitingFor || []).length) add("Waiting for", buildLinks(b.waitingFor));
    add("Priority", String(b.priority));
    if (b.timeout !== null) add("Timeout", dur(b.timeout));
    if (b.maxSilent !== null) add("Max silent", dur(b.maxSilent));
    add("Attempts", String(b.attempts));
    if (b.machine) add("Machine", b.machine, " ", h("span", {class: "sub mono"}, b.machineId));
    if (b.exitCode !== null) add("Exit code", String(b.exitCode));
    if (b.error) add("Error", h("span", {class: "err"}, b.error));
    add("Submitted", when(b.submittedAt));
    if (b.startedAt) add("Started", when(b.startedAt));
    if (b.finishedAt) add("Finished", when(b.finishedAt));
    if (b.startedAt) {
      add("Duration",
        b.finishedAt ? dur(b.finishedAt - b.startedAt) : ticker("since", b.startedAt));
    }
    const timings = Object.entries(b.timings || {});
    if (timings.length) add("Timings", timings.map(([k, v]) => k + " " + dur(v)).join(" \u00b7 "));
    $("b-fields").replaceChildren(...rows);
    $("b-cancel").hidden = FINISHED.has(b.state);

    const outputs = [...(b.outputs || [])].sort((x, y) => x.path.localeCompare(y.path));
    const base = apiBuild(b.id) + "/outputs/";
    $("b-outputs").replaceChildren(...outputs.map((o) => h("li", null,
      h("a", {href: base + o.path.split("/").map(encodeURIComponent).join("/"),
        title: "sha256 " + o.sha256, "data-save-as": o.path.split("/").pop()},
      h("code", null, o.path)),
      h("span", {class: "sub"}, "  " + size(o.size)))));
    $("b-outputs-empty").hidden = outputs.length > 0;
    $("b-outputs-empty").textContent = FINISHED.has(b.state) ? "No outputs." : "None yet.";
  }

  function setLogState(text) { $("log-state").textContent = text; }

  function logReset(view) {
    Object.assign(view, {buf: "", pending: "", reflow: true, dropped: 0});
    paintSoon(view);
  }
  function logAppend(view, s) {
    if (!s) return;
    view.buf += s;
    view.pending += s;
    if (view.buf.length > LOG_MAX) {
      let cut = view.buf.length - LOG_MAX;
      const nl = view.buf.indexOf("\n", cut);
      if (nl >= 0 && nl - cut < 4096) cut = nl + 1;
      view.dropped += cut;
      view.buf = view.buf.slice(cut);
      view.reflow = true;
    }
    paintSoon(view);
  }
  function paintSoon(view) {
    if (view.painting) return;
    view.painting = true;
    requestAnimationFrame(() => {
      view.painting = false;
      if (view !== current) return;
      const pre = $("log");
      const stick = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 32;
      if (view.reflow) pre.textContent = view.buf;
      else if (view.pending) pre.append(view.pending);
      view.pending = ""; view.reflow = false;
      $("log-trim").hidden = view.dropped === 0;
      if (stick) pre.scrollTop = pre.scrollHeight;
    });
  }

  // A finished build's log is fetched once; an unfinished one's is streamed (?follow=1)
  // until the build ends, and streamed again from the start if the stream breaks.
  async function loadLog(view, b) {
    const follow = !FINISHED.has(b.state);
    const ctl = new AbortController();
    view.logCtl = ctl;
    logReset(view);
    setLogState(follow ? "following\u2026" : "loading\u2026");
    try {
      const url = apiBuild(view.id) + "/log" + (follow ? "?follow=1" : "");
      const r = await fetch(url, {signal: ctl.signal, headers: authHeaders(), cache: "no-store"});
      if (!r.ok) {
        const err = new Error(await errorText(r));
        if (r.status === 403) askForToken(err.message);
        throw err;
      }
      const dec = new TextDecoder();
      if (r.body && r.body.getReader) {
        const reader = r.body.getReader();
        for (;;) {
          const {done, value} = await reader.read();
          if (done) break;
          logAppend(view, dec.decode(value, {stream: true}));
        }
      } else {
        logAppend(view, dec.decode(new Uint8Array(await r.arrayBuffer()), {stream: true}));
      }
      logAppend(view, dec.decode());
      view.logMode = follow ? "ended" : "done";
      if (!follow) setLogState("complete");
    } catch (e) {
      if (ctl.signal.aborted) return;
      view.logRetryAt = performance.now() + 3000;
      setLogState("log unavailable: " + e.message + " \u2013 retrying");
    } finally {
      if (view.logCtl === ctl) view.logCtl = null;
    }
  }

  async function pollBuild(view) {
    if (view.build && FINISHED.has(view.build.state) && view.logMode === "done") return;
    let b;
    try {
      b = await getJSON(apiBuild(view.id));
    } catch (e) {
      if (e.status !== 404) throw e;
      if (view === current) {
        $("b-title").replaceChildren(h("span", {class: "err"}, e.message));
        $("b-fields").replaceChildren();
      }
      return;
    }
    if (view !== current) return;
    view.build = b;
    renderBuild(view, b);
    if (view.logMode === "ended") {
      // The stream ends when the build does; if it has not, the stream broke: start over.
      view.logMode = FINISHED.has(b.state) ? "done" : "none";
      if (view.logMode === "done") setLogState("complete");
    }
    if (view.logMode === "none" && !view.logCtl && performance.now() >= view.logRetryAt) {
      loadLog(view, b);
    }
  }

  // Cancelling cannot be undone: the first click asks, a second one within 4 s cancels.
  arm($("b-cancel"), "Cancel build", "Cancel? Click again", () => {
    if (!current) return Promise.resolve(false);
    current.sig = null; // repaint the page (and hide the button) with the answer
    return post(apiBuild(current.id) + "/cancel", "cancel " + current.id);
  });

  // -- routing and polling -------------------------------------------------------------
  function navigate() {
    takeTokenFromHash();
    if (current && current.logCtl) current.logCtl.abort();
    current = null;
    const m = /^#build\/(.+)$/.exec(location.hash);
    let id = null;
    if (m) { try { id = decodeURIComponent(m[1]); } catch (e) { id = null; } }
    $("overview").hidden = id !== null;
    $("buildview").hidden = id === null;
    if (id !== null) {
      current = newView(id);
      $("b-title").replaceChildren(h("span", null, id));
      $("b-fields").replaceChildren();
      $("b-cancel").hidden = true;
      $("b-outputs").replaceChildren();
      $("b-outputs-empty").hidden = true;
      $("log").textContent = "";
      $("log-trim").hidden = true;
      $("log-raw").setAttribute("href", apiBuild(id) + "/log");
      $("log-raw").dataset.saveAs = id + ".log";
      setLogState("");
    } else {
      document.title = "hydra-trio";
    }
    window.scrollTo(0, 0);
    schedule(0);
  }

  function setOnline(ok, err) {
    const conn = $("conn"), banner = $("banner");
    const refused = !ok && err && err.status === 403; // reachable, but wants the token
    document.body.classList.toggle("stale", !ok);
    banner.hidden = ok || refused;
    if (ok) $("auth").hidden = true;
    conn.className = ok ? "conn ok" : "conn bad";
    conn.textContent = ok ? "live" : refused ? "token needed" : "runner unreachable";
    if (!ok && !refused) {
      banner.textContent = "Cannot reach the queue runner (" + (err && err.message || err)
        + "); retrying every second. What is shown may be out of date.";
    }
  }

  let generation = 0, timer = 0;
  function schedule(delay) {
    clearTimeout(timer);
    const g = ++generation;
    timer = setTimeout(() => run(g), delay);
  }
  async function run(g) {
    if (!document.hidden) {
      try {
        if (current) await pollBuild(current);
        else await pollOverview();
        if (g === generation) setOnline(true);
      } catch (e) {
        if (g === generation) {
          if (e.status === 403) askForToken(e.message);
          setOnline(false, e);
        }
      }
    }
    if (g === generation) schedule(POLL_MS);
  }

  window.addEventListener("hashchange", navigate);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
  navigate();
})();
