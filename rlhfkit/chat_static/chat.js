// rlhfkit chat page. Plain JS, no dependencies, no build step.
// Model output is untrusted: every text goes into the page with textContent / text nodes,
// never innerHTML. The CSP forbids inline scripts anyway.
"use strict";

const state = { models: [], running: 0, controllers: [] };
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text || "";
  s.className = kind || "muted";
}

async function loadModels() {
  const res = await fetch("/api/models");
  if (!res.ok) throw new Error("could not list the models: " + res.status);
  const data = await res.json();
  state.models = data.models;
  $("models-info").textContent = data.models.map((m) => m.name).join("  vs  ");
  $("max-tokens").value = data.defaults.max_new_tokens;
  $("max-tokens").max = data.max_new_tokens_limit;
  $("temperature").value = data.defaults.temperature;
  document.documentElement.style.setProperty("--columns", String(data.models.length));
}

// One exchange: the prompt, then one column per model.
function addExchange(prompt) {
  const box = el("article", "exchange");
  box.appendChild(el("div", "prompt", prompt));
  const grid = el("div", "columns");
  const columns = state.models.map((m) => {
    const col = el("section", "column");
    col.dataset.model = String(m.id);
    col.dataset.state = "waiting";
    const head = el("div", "head");
    head.appendChild(el("b", "name", m.name));
    head.title = m.path;
    const meta = el("span", "meta", "waiting…");
    head.appendChild(meta);
    const text = el("div", "text");
    col.appendChild(head);
    col.appendChild(text);
    grid.appendChild(col);
    return { col, meta, text };
  });
  box.appendChild(grid);
  $("log").appendChild(box);
  box.scrollIntoView({ block: "end", behavior: "smooth" });
  return columns;
}

function describeDone(msg) {
  const parts = [`${msg.tokens} tokens`, `${msg.seconds.toFixed(1)} s`, `${msg.tokens_per_s.toFixed(1)} tok/s`];
  parts.push(msg.has_eos ? "ended" : "hit max tokens");
  return parts.join(" · ");
}

async function streamInto(column, body, controller) {
  const { col, meta, text } = column;
  col.dataset.state = "streaming";
  meta.textContent = "generating…";
  let res;
  try {
    res = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
  } catch (err) {
    return fail(column, err.name === "AbortError" ? "stopped" : "request failed: " + err.message);
  }
  if (!res.ok) {
    const detail = await res.json().then((d) => d.detail).catch(() => res.statusText);
    return fail(column, `${res.status}: ${detail}`);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.trim()) handle(column, JSON.parse(line));
      }
    }
  } catch (err) {
    return fail(column, err.name === "AbortError" ? "stopped" : "stream failed: " + err.message);
  }
  if (col.dataset.state === "streaming") fail(column, "the stream ended early");
}

function handle(column, msg) {
  const { col, meta, text } = column;
  if (msg.text !== undefined) {
    // the first piece often starts with the space of its first token
    const piece = text.textContent ? msg.text : msg.text.trimStart();
    if (piece) text.appendChild(document.createTextNode(piece));
  } else if (msg.done) {
    col.dataset.state = "done";
    meta.textContent = describeDone(msg);
    if (!text.textContent.trim()) text.appendChild(el("span", "muted", "(empty response)"));
  } else if (msg.error !== undefined) {
    fail(column, msg.error);
  }
}

function fail(column, message) {
  column.col.dataset.state = "error";
  column.meta.textContent = message;
  column.meta.classList.add("error");
}

function setRunning(n) {
  state.running = n;
  $("send").disabled = n > 0;
  $("stop").disabled = n === 0;
  setStatus(n > 0 ? `${n} model${n > 1 ? "s" : ""} answering…` : "");
}

async function ask(event) {
  if (event) event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || state.running) return;
  const maxTokens = parseInt($("max-tokens").value, 10);
  const temperature = parseFloat($("temperature").value);
  const system = $("system").value.trim();
  const columns = addExchange(prompt);
  $("prompt").value = "";
  state.controllers = state.models.map(() => new AbortController());
  setRunning(state.models.length);
  await Promise.all(
    state.models.map(async (m, i) => {
      const body = {
        model: m.id,
        prompt,
        system: system || null,
        max_new_tokens: Number.isFinite(maxTokens) ? maxTokens : null,
        temperature: Number.isFinite(temperature) ? temperature : null,
      };
      try {
        await streamInto(columns[i], body, state.controllers[i]);
      } finally {
        setRunning(state.running - 1);
      }
    })
  );
  $("prompt").focus();
}

function stop() {
  for (const c of state.controllers) c.abort();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("ask").addEventListener("submit", ask);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(e);
  });
  try {
    await loadModels();
    document.body.dataset.ready = "1";
    $("prompt").focus();
  } catch (err) {
    setStatus(err.message, "error");
  }
});
