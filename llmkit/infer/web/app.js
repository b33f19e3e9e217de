// llmkit chat page: streaming replies over the server's OpenAI API, multi-turn history, a stop button
// (aborting the fetch closes the stream; the server then cancels the generation), settings, and
// visible tool calls run by the server's /tools/run (calculator; Python in the sandbox when enabled).
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_TOOL_ROUNDS = 3;  // a tool-using reply may call tools this many times before it must answer
let history = [];           // OpenAI-format messages of this chat
let modelId = null, builtinTools = [], controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("llmkit-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function bubble(role, cls) {
  const div = document.createElement("div");
  div.className = "msg " + role + (cls ? " " + cls : "");
  div.dataset.role = role;
  const body = document.createElement("div");
  body.className = "body";
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

function showUser(text) { bubble("user").textContent = text; }

function showTool(name, args, result) {
  const body = bubble("tool");
  body.innerHTML = "<div class=\"tool-head\">tool call: <code></code></div><pre class=\"tool-args\"></pre>" +
                   "<div class=\"tool-head\">result</div><pre class=\"tool-result\"></pre>";
  body.querySelector("code").textContent = name;
  body.querySelector(".tool-args").textContent = args;
  body.querySelector(".tool-result").textContent = result;
}

async function loadInfo() {
  try {
    const m = await (await fetch("/v1/models", { headers: headers() })).json();
    modelId = m.data[0].id;
    $("model").textContent = modelId;
    const t = await (await fetch("/tools", { headers: headers() })).json();
    builtinTools = t.tools;
    $("tool-names").textContent = builtinTools.map(x => x.function.name).join(", ");
    $("tool-note").textContent = t.note || "";
  } catch (e) {
    setStatus("cannot reach the server (API key?): " + e);
  }
}

// Reads an SSE stream of chat.completion.chunk objects; calls onChunk for each.
async function readStream(resp, onChunk) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i); buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        onChunk(obj);
      }
    }
  }
}

async function assistantTurn() {
  const body = bubble("assistant");
  body.classList.add("streaming");
  let content = "", calls = [], finish = null;
  const messages = ($("system").value ? [{ role: "system", content: $("system").value }] : []).concat(history);
  const req = {
    model: modelId, messages, stream: true,
    temperature: parseFloat($("temperature").value), max_tokens: parseInt($("max-tokens").value, 10),
  };
  if ($("use-tools").checked && builtinTools.length) req.tools = builtinTools;
  controller = new AbortController();
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(req), signal: controller.signal });
    if (!resp.ok) throw new Error((await resp.json()).error.message);
    await readStream(resp, (chunk) => {
      const ch = chunk.choices[0];
      if (!ch) return;
      if (ch.delta.content) { content += ch.delta.content; body.innerHTML = renderMarkdown(content); body.parentElement.scrollIntoView({ block: "end" }); }
      for (const tc of ch.delta.tool_calls || []) calls[tc.index] = tc;
      if (ch.finish_reason) finish = ch.finish_reason;
    });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
      const note = document.createElement("div");
      note.className = "stopped-note"; note.textContent = "[stopped]";
      body.parentElement.appendChild(note);
    } else {
      body.parentElement.classList.add("error");
      body.textContent = "error: " + e.message;
      finish = "error";
    }
  } finally {
    body.classList.remove("streaming");
    body.parentElement.dataset.finish = finish || "";
    controller = null;
  }
  if (!content && !calls.length && finish !== "error") body.textContent = finish === "stopped" ? "" : "(empty reply)";
  const msg = { role: "assistant", content };
  if (calls.length) msg.tool_calls = calls.map(({ id, type, function: f }) => ({ id, type, function: f }));
  if (content || calls.length) history.push(msg);
  return finish === "tool_calls" ? calls : null;
}

async function runTools(calls) {
  for (const c of calls) {
    let result;
    try {
      const r = await fetch("/tools/run", { method: "POST", headers: headers(), body: JSON.stringify({ name: c.function.name, arguments: c.function.arguments }) });
      const j = await r.json();
      result = r.ok ? j.content : "error: " + j.error.message;
    } catch (e) { result = "error: " + e; }
    showTool(c.function.name, c.function.arguments, result);
    history.push({ role: "tool", tool_call_id: c.id, content: result });
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  showUser(text);
  $("send").disabled = true; $("stop").disabled = false;
  setStatus("generating…");
  try {
    for (let round = 0; round <= MAX_TOOL_ROUNDS; round++) {
      const calls = await assistantTurn();
      if (!calls) break;
      await runTools(calls);
    }
  } finally {
    $("send").disabled = false; $("stop").disabled = true;
    setStatus("");
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || $("send").disabled) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history = []; $("messages").innerHTML = ""; });
$("api-key").addEventListener("change", () => { localStorage.setItem("llmkit-key", $("api-key").value); loadInfo(); });
loadInfo();
