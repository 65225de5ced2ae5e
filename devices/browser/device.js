// fedmq browser device: the same kernels.wasm as `fedmq device --runtime wasm`, driven from
// the page. Protocol as devices/http.py: register, signal join + ready, heartbeat, long-poll
// /messages; when selected: fetch the announced model, train, upload the delta.
// The gateway's /device/codec routes convert blobs, since a browser has no zstd.
// Every message from /messages is verified against the orchestrator's Ed25519 key (pinned at
// registration, WebCrypto) before it is acted on; the signed bytes are protocol/signing.py's.

const params = new URLSearchParams(location.search);
const cfg = {
  run: params.get("run"),
  index: Number(params.get("index") ?? 0),
  clients: Number(params.get("clients") ?? 1),
  dataset: params.get("dataset") ?? "digits",
  partition: params.get("partition") ?? "iid",
  seed: Number(params.get("seed") ?? 0),
  name: params.get("name") ?? `browser-${params.get("index") ?? 0}`,
};
const TRAIN_DEFAULTS = { epochs: 1, lr: 0.05, momentum: 0.9, batch_size: 32, weight_decay: 0 };
const HEARTBEAT_MS = 5000;

const logEl = document.getElementById("log");
const statusEl = document.getElementById("status");
function log(line) {
  logEl.textContent += `${new Date().toISOString().slice(11, 19)} ${line}\n`;
  console.log(line);
}
function status(state) {
  statusEl.textContent = state;
  document.body.dataset.state = state;
}
function bump(key) {
  document.body.dataset[key] = String(Number(document.body.dataset[key]) + 1);
}

let ident = null; // {client_id, token, signing_key}
let orchestratorKey = null; // the CryptoKey of ident.signing_key, for the page's lifetime

// protocol/signing.py: DOMAIN NUL kind NUL run NUL recipient NUL headers NUL body, where
// round announcements are signed for the whole run ("*") and the rest for this client, and
// JSON messages cover no headers.
const SIGNATURE_DOMAIN = "fedmq-orchestrator-signature/1";
const BROADCAST_KINDS = new Set(["model", "round"]);

function base64Bytes(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

async function pinKey(signingKey) {
  if (typeof signingKey !== "string") throw new Error("the registration names no signing key");
  try {
    orchestratorKey = await crypto.subtle.importKey(
      "raw", base64Bytes(signingKey), { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    // Without it nothing from the orchestrator can be told from a forgery: stop.
    throw new Error(`this browser cannot verify Ed25519 signatures (${e.message})`);
  }
}

function drop(reason) {
  bump("dropped");
  log(`dropped: ${reason}`);
  return null;
}

// The message of one {body, signature} of /messages, or null when it does not verify.
async function verified(item) {
  let msg;
  try {
    msg = JSON.parse(item.body);
  } catch (e) {
    return drop(`unreadable message: ${e.message}`);
  }
  const kind = String(msg.type);
  if (!item.signature) return drop(`unsigned ${kind} message`);
  const to = BROADCAST_KINDS.has(kind) ? "*" : ident.client_id;
  const enc = new TextEncoder();
  const head = enc.encode([SIGNATURE_DOMAIN, kind, cfg.run, to, "", ""].join("\0"));
  const body = enc.encode(item.body);
  const signed = new Uint8Array(head.length + body.length);
  signed.set(head);
  signed.set(body, head.length);
  let ok = false;
  try {
    ok = await crypto.subtle.verify(
      { name: "Ed25519" }, orchestratorKey, base64Bytes(item.signature), signed);
  } catch (e) {
    ok = false;
  }
  if (!ok) return drop(`${kind} message not signed by the pinned orchestrator key`);
  return msg;
}

async function api(method, path, { body, headers = {}, raw = false } = {}) {
  const h = { ...headers };
  if (ident) h.Authorization = `Bearer ${ident.token}`;
  if (body !== undefined && !(body instanceof ArrayBuffer) && !ArrayBuffer.isView(body)) {
    h["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const res = await fetch(path, { method, headers: h, body });
  if (!res.ok) {
    throw new Error(`${method} ${path}: ${res.status} ${await res.text()}`);
  }
  return raw ? res : res.status === 204 ? null : res.json();
}

// --- the module ---------------------------------------------------------------------------

// Steps per exported call of trainEpoch: the module gathers each batch from the data set
// held in its memory, so a call costs the page one crossing per this many steps.
const STEPS_PER_CALL = 64;

class WasmMLP {
  static async load(widths, maxBatch) {
    const { instance } = await WebAssembly.instantiateStreaming(
      fetch("/device/kernels.wasm"), {});
    return new WasmMLP(instance.exports, widths, maxBatch);
  }
  constructor(ex, widths, maxBatch) {
    this.ex = ex;
    this.widths = widths;
    this.maxBatch = maxBatch;
    this.data = null; // {x, y, order, rows}: pointers into module memory
    ex.fm_reset();
    const wp = ex.fm_alloc(4 * widths.length);
    new Int32Array(ex.memory.buffer, wp, widths.length).set(widths);
    this.h = ex.mlp_create(widths.length - 1, wp, maxBatch);
    if (!this.h) throw new Error("out of module memory");
    this.numParams = ex.mlp_num_params(this.h);
  }
  f32(ptr, n) { return new Float32Array(this.ex.memory.buffer, ptr, n); }
  alloc(bytes) {
    const ptr = this.ex.fm_alloc(Math.max(bytes, 4));
    if (!ptr) throw new Error("out of module memory");
    return ptr;
  }
  setWeights(flat) { this.f32(this.ex.mlp_params(this.h), this.numParams).set(flat); }
  weights() { return this.f32(this.ex.mlp_params(this.h), this.numParams).slice(); }
  // The partition, copied into module memory once (views are made after every
  // allocation: growing memory replaces the buffer).
  loadData(x, y, rows) {
    const at = {
      x: this.alloc(x.length * 4), y: this.alloc(rows * 4), order: this.alloc(rows * 4),
    };
    this.f32(at.x, x.length).set(x);
    new Int32Array(this.ex.memory.buffer, at.y, rows).set(y);
    this.data = { ...at, rows };
  }
  // One epoch over the rows in `order`, batchSize at a time (the last batch may be short):
  // mlp_train_steps runs up to STEPS_PER_CALL steps per call.
  trainEpoch(order, batchSize, s) {
    const d = this.data;
    new Int32Array(this.ex.memory.buffer, d.order, order.length).set(order);
    let lossSum = 0, correct = 0;
    const chunk = batchSize * STEPS_PER_CALL;
    for (let start = 0; start < order.length; start += chunk) {
      const n = Math.min(chunk, order.length - start);
      const out = this.ex.mlp_train_steps(this.h, d.x, d.y, d.rows, d.order + 4 * start, n,
        batchSize, s.lr, s.momentum, s.weight_decay, 0, 0);
      if (out < 0) throw new Error("mlp_train_steps refused its arguments");
      lossSum += out;
      correct += this.ex.mlp_correct(this.h);
    }
    return { lossSum, correct };
  }
}

// Layers in order: net.<i>.weight (out, in) then net.<i>.bias; widths from the shapes.
function mlpLayout(layout) {
  const key = ([name]) => {
    const m = /^net\.(\d+)\.(weight|bias)$/.exec(name);
    if (!m) throw new Error(`not an MLP tensor: ${name}`);
    return Number(m[1]) * 2 + (m[2] === "bias" ? 1 : 0);
  };
  const ordered = [...layout].sort((a, b) => key(a) - key(b));
  const widths = [ordered[0][1][1]];
  for (let i = 0; i < ordered.length; i += 2) widths.push(ordered[i][1][0]);
  return { ordered, widths };
}

// A seeded shuffle (mulberry32 + Fisher-Yates): each round's order differs, reproducibly.
function shuffled(n, seed) {
  let a = seed >>> 0;
  const rand = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

// --- one round ----------------------------------------------------------------------------

let data = null; // {x: Float32Array, y: Int32Array, rows, features}
let model = null;
const trained = new Set();

async function loadData() {
  const q = new URLSearchParams({
    clients: cfg.clients, index: cfg.index, dataset: cfg.dataset,
    partition: cfg.partition, seed: cfg.seed,
  });
  const res = await api("GET", `/device/data?${q}`, { raw: true });
  const rows = Number(res.headers.get("x-fedmq-rows"));
  const features = Number(res.headers.get("x-fedmq-features"));
  const buf = await res.arrayBuffer();
  return {
    rows, features,
    x: new Float32Array(buf, 0, rows * features),
    y: new Int32Array(buf, rows * features * 4, rows),
  };
}

async function train(ann) {
  const settings = { ...TRAIN_DEFAULTS, ...(ann.train_config ?? {}) };
  if (settings.local_epochs !== undefined) settings.epochs = settings.local_epochs;
  if (settings.batch !== undefined) settings.batch_size = settings.batch;
  status(`training round ${ann.round}`);
  const blob = await (await api("GET",
    `/api/v1/runs/${cfg.run}/models/${ann.model_version}`, { raw: true })).arrayBuffer();
  const dec = await api("POST", "/device/codec/decode", { body: blob, raw: true });
  const layout = JSON.parse(dec.headers.get("x-fedmq-tensors"));
  const raw = new Float32Array(await dec.arrayBuffer());
  const offsets = {};
  let at = 0;
  for (const [name, shape] of layout) {
    const size = shape.reduce((p, s) => p * s, 1);
    offsets[name] = [at, size];
    at += size;
  }
  const { ordered, widths } = mlpLayout(layout);
  const globalFlat = new Float32Array(raw.length);
  let k = 0;
  for (const [name] of ordered) {
    const [o, size] = offsets[name];
    globalFlat.set(raw.subarray(o, o + size), k);
    k += size;
  }
  if (!model || model.maxBatch < settings.batch_size ||
      model.widths.join() !== widths.join()) {
    model = await WasmMLP.load(widths, settings.batch_size);
    model.loadData(data.x, data.y, data.rows);
  }
  model.setWeights(globalFlat);
  model.ex.mlp_reset_velocity(model.h);
  const started = performance.now();
  let lossSum = 0, correct = 0;
  for (let e = 0; e < settings.epochs; e++) {
    const order = shuffled(data.rows, cfg.seed * 1000003 + ann.round * 1009 + cfg.index + e);
    ({ lossSum, correct } = model.trainEpoch(order, settings.batch_size, settings));
  }
  const seconds = (performance.now() - started) / 1000;
  // The delta (trained - global) in the decoded layout's order, for the encode route.
  const after = model.weights();
  const delta = new Float32Array(raw.length);
  k = 0;
  for (const [name] of ordered) {
    const [o, size] = offsets[name];
    for (let i = 0; i < size; i++) delta[o + i] = after[k + i] - globalFlat[k + i];
    k += size;
  }
  const enc = await api("POST", `/device/codec/encode?base_version=${ann.model_version}`, {
    body: delta, raw: true,
    headers: { "x-fedmq-tensors": JSON.stringify(layout),
               "Content-Type": "application/octet-stream" },
  });
  const update = await enc.arrayBuffer();
  const metrics = {
    loss: lossSum / data.rows, accuracy: correct / data.rows, train_time_s: seconds,
    runtime: "wasm-browser",
  };
  const q = new URLSearchParams({
    round: ann.round, base_model_version: ann.model_version, num_samples: data.rows,
    message_id: crypto.randomUUID().replaceAll("-", ""), metrics: JSON.stringify(metrics),
  });
  await api("POST", `/api/v1/clients/${ident.client_id}/updates?${q}`, {
    body: update, headers: { "Content-Type": "application/octet-stream" },
  });
  bump("rounds");
  log(`round ${ann.round}: trained ${data.rows} samples in ${seconds.toFixed(3)} s ` +
      `(loss ${metrics.loss.toFixed(4)}, accuracy ${metrics.accuracy.toFixed(3)}); update sent`);
  status("waiting for a round");
}

async function handle(msg) {
  if (msg.type === "round") {
    if (!msg.selected.includes(ident.client_id) || trained.has(msg.round)) return;
    trained.add(msg.round);
    try {
      await train(msg);
    } catch (e) {
      log(`round ${msg.round}: failed: ${e.message}`);
      status("waiting for a round");
    }
  } else if (msg.type === "event" && msg.kind === "update.accepted") {
    bump("accepted");
    log(`round ${msg.round}: update accepted`);
  } else if (msg.type === "event" && msg.kind === "update.rejected") {
    log(`round ${msg.round}: update rejected: ${msg.detail?.reason}`);
  } else if (msg.type === "event" && msg.kind === "client.rejoin") {
    await signal("join");
    await signal("ready");
  }
}

async function signal(state) {
  await api("POST", `/api/v1/clients/${ident.client_id}/signal`, { body: { state } });
}

async function main() {
  if (!cfg.run) throw new Error("the page needs ?run=<run id>&index=<k>&clients=<K>");
  status("loading data");
  data = await loadData();
  log(`partition ${cfg.index} of ${cfg.clients}: ${data.rows} samples of ${data.features}`);
  status("registering");
  ident = await api("POST", `/api/v1/runs/${cfg.run}/clients`, {
    body: { display_name: cfg.name, device_info: { runtime: "wasm-browser",
      user_agent: navigator.userAgent } },
  });
  await pinKey(ident.signing_key);
  log(`registered as ${ident.client_id}; orchestrator key ${ident.signing_key}`);
  await signal("join");
  await signal("ready");
  status("waiting for a round");
  let lastBeat = performance.now();
  for (;;) {
    if (performance.now() - lastBeat > HEARTBEAT_MS) {
      await api("POST", `/api/v1/clients/${ident.client_id}/heartbeat`);
      lastBeat = performance.now();
    }
    try {
      const { signed } = await api("GET",
        `/api/v1/clients/${ident.client_id}/messages?wait=1`);
      for (const item of signed) {
        const msg = await verified(item); // before anything is recorded, "trained" included
        if (msg !== null) await handle(msg);
      }
    } catch (e) {
      log(`poll: ${e.message}`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

main().catch((e) => {
  log(`stopped: ${e.message}`);
  status("failed");
});
