// Loong's live console: polls GET /console/state about every second and draws the
// cluster (KV per instance, the groups of the step just run, queues, rates, latency
// percentiles); the chat box streams from POST /v1/chat/completions (server-sent events).
// Plain browser JavaScript: no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("loong-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("loong-api-key", keyInput.value));

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function ms(v) { return v === null || v === undefined ? "-" : (v * 1000).toFixed(v < 0.1 ? 1 : 0); }

let modelName = null;

function drawInstances(state) {
  const box = $("instances");
  const roles = {};
  for (const g of state.groups) {
    for (const i of g.instances) {
      const what = g.kind === "decode" && !g.masters.includes(i) ? "decode (holder)" :
                   g.kind === "decode" ? "decode (master)" : g.kind;
      (roles[i] = roles[i] || []).push([g.kind, what]);
    }
  }
  while (box.children.length > state.instances.length) box.lastChild.remove();
  state.instances.forEach((inst, k) => {
    let panel = box.children[k];
    if (!panel) {
      panel = el("div", "instance");
      panel.innerHTML = '<h3><span class="name"></span><span class="alive"></span></h3>' +
        '<div class="bar"><div class="used"></div><div class="cached"></div></div>' +
        '<div class="nums"></div><div class="roles"></div>';
      box.appendChild(panel);
    }
    const total = inst.blocks_used + inst.blocks_cached + inst.blocks_free || 1;
    panel.className = "instance" + (inst.alive ? "" : " dead");
    panel.dataset.rank = inst.rank;
    panel.querySelector(".name").textContent = "instance " + inst.rank;
    panel.querySelector(".alive").textContent = inst.alive ? "alive" : "lost";
    panel.querySelector(".bar .used").style.width = (100 * inst.blocks_used / total) + "%";
    panel.querySelector(".bar .cached").style.width = (100 * inst.blocks_cached / total) + "%";
    panel.querySelector(".nums").textContent =
      `${inst.blocks_used} used, ${inst.blocks_cached} cached, ${inst.blocks_free} free ` +
      `of ${total} blocks (${state.block_size} tokens each)`;
    const r = panel.querySelector(".roles");
    r.replaceChildren(...(roles[inst.rank] || []).map(([kind, what]) => el("span", "role " + kind, what)));
  });
}

function drawGroups(state) {
  const box = $("groups");
  if (!state.groups.length) { box.replaceChildren(el("p", "idle", "idle")); return; }
  box.replaceChildren(...state.groups.map((g) => {
    let text;
    if (g.kind === "prefill") {
      const reqs = g.requests.map((r) => `${r.id} (${r.tokens} tokens)`).join(", ");
      text = `ring prefill over instances [${g.instances.join(", ")}]: ${reqs}`;
    } else if (g.kind === "decode") {
      text = `decode: ${g.requests} request(s), masters [${g.masters.join(", ")}], ` +
             `KV on [${g.instances.join(", ")}]` + (g.extends ? `, ${g.extends} extend(s)` : "");
    } else {
      const reqs = g.requests.map((r) => `${r.id} (${r.tokens})`).join(", ");
      text = `batch on [${g.instances.join(", ")}]: ${reqs}`;
    }
    return el("div", "group " + g.kind, text);
  }));
}

function draw(state) {
  $("model").textContent = `${state.model} · ${state.policy} policy · ${state.instances.length} instance(s)`;
  $("running").textContent = state.running;
  $("waiting").textContent = state.waiting + (state.preparing ? ` (+${state.preparing})` : "");
  $("tps").textContent = state.tokens_per_s.toFixed(1);
  const l = state.latency_s;
  $("ttft").textContent = `${ms(l.ttft_s.p50)} / ${ms(l.ttft_s.p90)} / ${ms(l.ttft_s.p99)} ms`;
  $("tpot").textContent = `${ms(l.tpot_s.p50)} / ${ms(l.tpot_s.p90)} / ${ms(l.tpot_s.p99)} ms`;
  const pc = state.prefix_cache || {};
  $("hit").textContent = pc.queried_tokens ? (100 * pc.hit_tokens / pc.queried_tokens).toFixed(1) + "%" : "-";
  $("finished").textContent = state.finished;
  drawInstances(state);
  drawGroups(state);
}

async function poll() {
  try {
    const r = await fetch("/console/state", { headers: headers() });
    if (r.status === 401) throw new Error("401: enter the server's API key above");
    if (!r.ok) throw new Error(`${r.status} from /console/state`);
    draw(await r.json());
    $("status").textContent = "live";
    $("status").className = "badge ok";
    $("error").textContent = "";
  } catch (e) {
    $("status").textContent = "offline";
    $("status").className = "badge bad";
    $("error").textContent = String(e.message || e);
  }
  setTimeout(poll, 1000);
}

async function models() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.ok) modelName = (await r.json()).data[0].id;
  } catch (e) { /* the poll reports it */ }
}

const history = [];

function addMsg(role, text) {
  const m = el("div", "msg " + role, text);
  $("chat-log").appendChild(m);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return m;
}

async function send(ev) {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  history.push({ role: "user", content: text });
  addMsg("user", text);
  const out = addMsg("assistant", "");
  $("chat-send").disabled = true;
  try {
    if (!modelName) await models();
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: modelName || undefined, messages: history, stream: true,
                             max_tokens: Number($("chat-max").value),
                             temperature: Number($("chat-temp").value) }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", answer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) { answer += c.delta.content; out.textContent = answer; }
        }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    out.className = "msg error";
    out.textContent = "error: " + (e.message || e);
    history.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", send);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
models();
poll();
