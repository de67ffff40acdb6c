// rlhfkit labelling page. Plain JS, no dependencies, no build step.
// Model output is untrusted: every text from the server goes into the page with
// textContent, never innerHTML. The CSP forbids inline scripts anyway.
"use strict";

const TOKEN_KEY = "rlhfkit-label-token";
const FLAG_NAMES = ["unsafe", "nonsense"];

const state = {
  token: null,
  me: null,
  task: null,        // {id, messages, k, responses: [{position, text}]}
  groups: [],        // tie groups of display positions, best first
  flags: {},         // position -> Set of flag names
  selected: null,    // selected display position
  editing: null,     // task id when changing an earlier label (PUT)
  busy: false,
  drag: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "type" || k === "title") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c) node.appendChild(c);
  return node;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text || "";
  s.className = kind || "";
}

// ---- API -------------------------------------------------------------------
async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + state.token };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const isJson = (res.headers.get("content-type") || "").startsWith("application/json");
  const data = isJson ? await res.json().catch(() => null) : await res.text();
  if (!res.ok) {
    const err = new Error((data && data.detail) || res.status + " " + res.statusText);
    err.status = res.status;
    err.code = data && data.code;
    if (res.status === 401) showLogin(err.message);
    throw err;
  }
  return data;
}

// ---- views -----------------------------------------------------------------
function show(section) {
  for (const id of ["login", "switch", "done", "work"]) $(id).hidden = id !== section;
  $("legend").hidden = section !== "work";
}

function showLogin(message) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  state.task = null;
  show("login");
  $("logout").hidden = true;
  $("who").textContent = "";
  $("progress").textContent = "";
  if (message) setStatus(message, "error");
}

function renderProgress(p) {
  if (!p) return;
  const you = p.you, all = p.overall;
  const seen = you.labelled + you.skipped;
  const pct = all.wanted ? Math.round((100 * all.labels) / all.wanted) : 100;
  $("progress").textContent =
    `You: ${seen} / ${seen + you.remaining} done (${you.labelled} labelled, ${you.skipped} skipped)` +
    ` · Everyone: ${all.labels} / ${all.wanted} labels (${pct}%)`;
}

function renderConversation() {
  const box = $("conversation");
  box.replaceChildren();
  const msgs = state.task.messages;
  msgs.forEach((m, i) => {
    const last = i === msgs.length - 1;
    box.appendChild(
      el("div", { class: "msg role-" + m.role + (last ? " last" : "") },
        el("div", { class: "role", text: m.role }),
        el("div", { class: "text", text: m.content }))
    );
  });
}

function groupOf(pos) {
  return state.groups.findIndex((g) => g.includes(pos));
}

function renderRanking() {
  const list = $("ranking");
  list.replaceChildren();
  const texts = {};
  for (const r of state.task.responses) texts[r.position] = r.text;
  state.groups.forEach((group, g) => {
    const tied = group.length > 1;
    const li = el("li", { class: "group" + (tied ? " tied" : ""), "data-group": String(g) });
    li.appendChild(el("div", { class: "rank", title: tied ? "tied responses share a rank" : "rank" },
      el("div", { text: String(g + 1) }),
      tied ? el("div", { class: "tie-note", text: "tie" }) : null));
    const cards = el("div", { class: "cards" });
    for (const pos of group) {
      const flags = state.flags[pos] || new Set();
      const card = el("article", {
        class: "card" + (state.selected === pos ? " selected" : "") + (flags.size ? " flagged" : ""),
        "data-pos": String(pos),
      });
      const head = el("div", { class: "card-head", title: "drag to move" });
      head.appendChild(el("span", { class: "grip", text: "⠿", "aria-hidden": "true" }));
      head.appendChild(el("span", { class: "label", text: "Response " + (pos + 1) }));
      for (const f of flags) head.appendChild(el("span", { class: "badge", text: f }));
      const buttons = el("span", { class: "buttons" });
      const btn = (action, text, title, extra) =>
        el("button", Object.assign({ type: "button", class: "small", "data-action": action, text, title }, extra || {}));
      buttons.appendChild(btn("up", "↑", "move up (↑ or u)"));
      buttons.appendChild(btn("down", "↓", "move down (↓ or d)"));
      const tieBtn = btn("tie", tied ? "untie" : "tie ↑", tied ? "untie (t)" : "tie with the one above (t)");
      if (!tied && g === 0) tieBtn.disabled = true;
      buttons.appendChild(tieBtn);
      for (const f of FLAG_NAMES) {
        buttons.appendChild(btn("flag-" + f, f, "flag as " + f + (f === "unsafe" ? " (f)" : " (n)"),
          { "aria-pressed": String(flags.has(f)) }));
      }
      head.appendChild(buttons);
      card.appendChild(head);
      card.appendChild(el("div", { class: "text", text: texts[pos] }));
      cards.appendChild(card);
    }
    li.appendChild(cards);
    list.appendChild(li);
  });
}

function render() {
  if (!state.task) return;
  show("work");
  $("task-id").textContent = "(task " + state.task.id + ")";
  $("editing").hidden = !state.editing;
  $("editing-id").textContent = state.editing || "";
  $("skip").disabled = !!state.editing;
  renderConversation();
  renderRanking();
}

// ---- ranking operations (all on display positions) --------------------------
function select(pos) {
  if (!state.task || pos < 0 || pos >= state.task.k) return;
  state.selected = pos;
  renderRanking();
  const card = document.querySelector(`.card[data-pos="${pos}"]`);
  if (card) card.scrollIntoView({ block: "nearest" });
}

function needSelection() {
  if (state.selected === null) {
    setStatus("Select a response first: press its number or click it.", "hint");
    return false;
  }
  return true;
}

function move(pos, dir) {
  const gs = state.groups;
  const g = groupOf(pos);
  if (gs[g].length > 1) {
    // leave the tie, landing just above (or below) the former tie-mates
    gs[g] = gs[g].filter((p) => p !== pos);
    gs.splice(dir < 0 ? g : g + 1, 0, [pos]);
  } else {
    const h = g + dir;
    if (h < 0 || h >= gs.length) return;
    [gs[g], gs[h]] = [gs[h], gs[g]];
  }
  renderRanking();
}

function toggleTie(pos) {
  const gs = state.groups;
  const g = groupOf(pos);
  if (gs[g].length > 1) {
    gs[g] = gs[g].filter((p) => p !== pos);
    gs.splice(g + 1, 0, [pos]);
  } else if (g > 0) {
    gs[g - 1].push(pos);
    gs.splice(g, 1);
  } else {
    setStatus("The top response has nothing above it to tie with.", "hint");
    return;
  }
  renderRanking();
}

function toggleFlag(pos, flag) {
  const set = state.flags[pos] || (state.flags[pos] = new Set());
  if (set.has(flag)) set.delete(flag);
  else set.add(flag);
  renderRanking();
}

function moveToGroupIndex(pos, index) {
  const rest = state.groups.map((g) => g.filter((p) => p !== pos)).filter((g) => g.length);
  rest.splice(Math.max(0, Math.min(index, rest.length)), 0, [pos]);
  state.groups = rest;
  renderRanking();
}

// ---- loading, submitting ----------------------------------------------------
function startTask(task, ranking, flags) {
  state.task = task;
  state.selected = null;
  state.groups = ranking ? ranking.map((g) => g.slice()) : task.responses.map((r) => [r.position]);
  state.flags = {};
  for (const [pos, names] of Object.entries(flags || {})) state.flags[Number(pos)] = new Set(names);
  render();
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  window.scrollTo(0, 0);
}

async function loadNext() {
  state.busy = true;
  try {
    const data = await api("POST", "/api/next");
    state.editing = null;
    renderProgress(data.progress);
    if (data.task) startTask(data.task);
    else {
      state.task = null;
      show("done");
    }
  } finally {
    state.busy = false;
  }
}

function currentLabel() {
  const flags = {};
  for (const [pos, set] of Object.entries(state.flags)) if (set.size) flags[pos] = [...set].sort();
  return { ranking: state.groups.map((g) => g.slice()), flags };
}

async function submit() {
  if (!state.task || state.busy) return;
  const id = state.task.id;
  state.busy = true;
  try {
    if (state.editing) await api("PUT", "/api/labels/" + encodeURIComponent(id), currentLabel());
    else await api("POST", "/api/tasks/" + encodeURIComponent(id) + "/submit", currentLabel());
    setStatus(state.editing ? `Changed your label of task ${id}.` : `Saved task ${id}.`, "ok");
  } catch (err) {
    state.busy = false;
    if (err.code === "already_submitted") setStatus(`Task ${id} was already saved.`, "ok");
    else {
      setStatus("Not saved: " + err.message, "error");
      if (err.code !== "lease_expired" && err.code !== "skipped") return;
    }
  }
  state.busy = false;
  await loadNext().catch((e) => setStatus(e.message, "error"));
}

async function skip() {
  if (!state.task || state.busy || state.editing) return;
  const id = state.task.id;
  state.busy = true;
  try {
    await api("POST", "/api/tasks/" + encodeURIComponent(id) + "/skip");
    setStatus(`Skipped task ${id}.`, "ok");
  } catch (err) {
    setStatus("Not skipped: " + err.message, "error");
  }
  state.busy = false;
  await loadNext().catch((e) => setStatus(e.message, "error"));
}

async function editLast() {
  if (state.busy) return;
  try {
    const { labels } = await api("GET", "/api/labels");
    if (!labels.length) {
      setStatus("You have no submitted label yet.", "hint");
      return;
    }
    const id = labels[0].task_id;
    const label = await api("GET", "/api/labels/" + encodeURIComponent(id));
    state.editing = id;
    startTask(label.task, label.ranking, label.flags);
    setStatus(`Editing task ${id}.`, "hint");
  } catch (err) {
    setStatus(err.message, "error");
  }
}

// ---- mouse: clicks and drag-and-drop ------------------------------------------
function onRankingClick(e) {
  const card = e.target.closest(".card");
  if (!card) return;
  const pos = Number(card.dataset.pos);
  const button = e.target.closest("button");
  if (!button) {
    select(pos);
    return;
  }
  state.selected = pos;
  const action = button.dataset.action;
  if (action === "up") move(pos, -1);
  else if (action === "down") move(pos, 1);
  else if (action === "tie") toggleTie(pos);
  else if (action.startsWith("flag-")) toggleFlag(pos, action.slice(5));
}

function dropIndex(pos, y) {
  // index among the groups that remain once `pos` is taken out
  let index = 0;
  for (const li of document.querySelectorAll("#ranking > li.group")) {
    const group = state.groups[Number(li.dataset.group)];
    if (group.length === 1 && group[0] === pos) continue;
    const r = li.getBoundingClientRect();
    if (r.top + r.height / 2 < y) index++;
  }
  return index;
}

function placeIndicator(pos, index) {
  const lis = [...document.querySelectorAll("#ranking > li.group")].filter((li) => {
    const g = state.groups[Number(li.dataset.group)];
    return !(g.length === 1 && g[0] === pos);
  });
  const ind = state.drag.indicator;
  let y;
  if (!lis.length) y = $("ranking").getBoundingClientRect().top;
  else if (index < lis.length) y = lis[index].getBoundingClientRect().top - 5;
  else y = lis[lis.length - 1].getBoundingClientRect().bottom + 3;
  const box = $("ranking").getBoundingClientRect();
  ind.style.top = y + "px";
  ind.style.left = box.left + "px";
  ind.style.width = box.width + "px";
}

function onPointerDown(e) {
  const head = e.target.closest(".card-head");
  if (!head || e.target.closest("button") || e.button !== 0 || state.busy) return;
  const pos = Number(head.parentElement.dataset.pos);
  state.drag = { pos, startY: e.clientY, started: false, pointerId: e.pointerId, head, indicator: null };
  head.setPointerCapture(e.pointerId);
  e.preventDefault();
}

function onPointerMove(e) {
  const d = state.drag;
  if (!d || e.pointerId !== d.pointerId) return;
  if (!d.started) {
    if (Math.abs(e.clientY - d.startY) < 5) return;
    d.started = true;
    d.head.parentElement.classList.add("dragging");
    document.body.classList.add("is-dragging");
    d.indicator = el("div", { class: "drop-indicator" });
    document.body.appendChild(d.indicator);
  }
  placeIndicator(d.pos, dropIndex(d.pos, e.clientY));
}

function onPointerUp(e) {
  const d = state.drag;
  if (!d || e.pointerId !== d.pointerId) return;
  state.drag = null;
  document.body.classList.remove("is-dragging");
  if (d.indicator) d.indicator.remove();
  if (!d.started) {
    select(d.pos);
    return;
  }
  state.selected = d.pos;
  moveToGroupIndex(d.pos, dropIndex(d.pos, e.clientY));
}

function onPointerCancel() {
  const d = state.drag;
  state.drag = null;
  document.body.classList.remove("is-dragging");
  if (d && d.indicator) d.indicator.remove();
  if (state.task) renderRanking();
}

// ---- keyboard -------------------------------------------------------------------
function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (!state.task || $("work").hidden) return;
  const k = e.key;
  if (state.busy) {
    if (k === "Enter") e.preventDefault();
    return;
  }
  let handled = true;
  if (/^[1-9]$/.test(k)) select(Number(k) - 1);
  else if (k === "ArrowUp" || k === "u") { if (needSelection()) move(state.selected, -1); }
  else if (k === "ArrowDown" || k === "d") { if (needSelection()) move(state.selected, 1); }
  else if (k === "t") { if (needSelection()) toggleTie(state.selected); }
  else if (k === "f") { if (needSelection()) toggleFlag(state.selected, "unsafe"); }
  else if (k === "n") { if (needSelection()) toggleFlag(state.selected, "nonsense"); }
  else if (k === "s") skip();
  else if (k === "Enter") submit();
  else if (k === "Escape") { state.selected = null; renderRanking(); }
  else handled = false;
  if (handled) e.preventDefault();
}

// ---- admin --------------------------------------------------------------------------
async function loadStats() {
  try {
    const s = await api("GET", "/api/admin/stats");
    const lines = [`tasks: ${s.tasks.total}, complete: ${s.tasks.complete}, labels: ${s.tasks.labels} / ${s.tasks.wanted}`];
    for (const a of s.annotators) {
      const med = a.median_seconds === null ? "-" : a.median_seconds.toFixed(1) + " s";
      lines.push(`${a.annotator}: ${a.labelled} labelled, ${a.skipped} skipped, median ${med}`);
    }
    const ag = s.agreement.overall;
    lines.push("agreement: " + (ag === null ? "no shared tasks yet" : ag.toFixed(3)));
    $("stats-text").textContent = lines.join("\n");
  } catch (err) {
    setStatus(err.message, "error");
  }
}

async function downloadExport() {
  try {
    const text = await api("GET", "/api/admin/export");
    const url = URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" }));
    const a = el("a", { href: url, download: "rankings.jsonl" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (err) {
    setStatus(err.message, "error");
  }
}

// ---- start: sign-in, and asking before a login link switches the account ------------------
function tokenFromUrl() {
  // the login link carries the token in the fragment (never sent to the server); clear the address bar
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (!m) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return decodeURIComponent(m[1]);
}

async function whoIs(token) {
  // the account a token opens, or null; reads only (GET /api/me leases nothing)
  try {
    const res = await fetch("/api/me", { headers: { Authorization: "Bearer " + token } });
    return res.ok ? await res.json() : null;
  } catch (err) {
    return null;
  }
}

async function signIn(linkToken) {
  const stored = localStorage.getItem(TOKEN_KEY);
  if (linkToken && stored && linkToken !== stored) {
    // someone may already be signed in on this page: never switch accounts without asking
    const [current, next] = await Promise.all([whoIs(stored), whoIs(linkToken)]);
    if (current && !next) {
      await start();
      setStatus("The login link you opened is not valid (revoked or mistyped); you are still signed in as " + current.name + ".", "error");
      return;
    }
    if (current && next && current.name !== next.name) {
      askSwitch(current.name, next.name, linkToken);
      return;
    }
  }
  if (linkToken) localStorage.setItem(TOKEN_KEY, linkToken);
  await start();
}

function askSwitch(currentName, nextName, linkToken) {
  state.task = null;
  show("switch");
  $("switch-text").textContent =
    `This page is signed in as ${currentName}. The login link you opened is for ${nextName}. Switch accounts?`;
  $("switch-yes").textContent = "Switch to " + nextName;
  $("switch-no").textContent = "Stay signed in as " + currentName;
  $("switch-yes").onclick = () => {
    localStorage.setItem(TOKEN_KEY, linkToken);
    start();
  };
  $("switch-no").onclick = () => start();
}

async function start() {
  state.token = localStorage.getItem(TOKEN_KEY);
  state.task = null;
  state.editing = null;
  setStatus("");
  if (!state.token) {
    showLogin();
    return;
  }
  try {
    state.me = await api("GET", "/api/me");
  } catch (err) {
    return;
  }
  $("who").textContent = state.me.name + (state.me.is_admin ? " (admin)" : "");
  $("logout").hidden = false;
  $("admin").hidden = !state.me.is_admin;
  await loadNext().catch((e) => setStatus(e.message, "error"));
}

async function main() {
  // a login link opened in a tab already showing the page only changes the fragment
  window.addEventListener("hashchange", () => {
    const linkToken = tokenFromUrl();
    if (linkToken) signIn(linkToken);
  });
  $("ranking").addEventListener("click", onRankingClick);
  $("ranking").addEventListener("pointerdown", onPointerDown);
  document.addEventListener("pointermove", onPointerMove);
  document.addEventListener("pointerup", onPointerUp);
  document.addEventListener("pointercancel", onPointerCancel);
  document.addEventListener("keydown", onKey);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("edit-last").addEventListener("click", editLast);
  $("edit-last-done").addEventListener("click", editLast);
  $("cancel-edit").addEventListener("click", () => loadNext().catch((e) => setStatus(e.message, "error")));
  $("reload").addEventListener("click", () => loadNext().catch((e) => setStatus(e.message, "error")));
  $("logout").addEventListener("click", () => { showLogin(); setStatus("Logged out.", "ok"); });
  $("load-stats").addEventListener("click", loadStats);
  $("download-export").addEventListener("click", downloadExport);
  await signIn(tokenFromUrl());
}

main();
