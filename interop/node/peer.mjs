#!/usr/bin/env node
// Interop peer on the published npm package @microsoft/agent-governance-sdk
// 4.0.0: the line protocol of interop/PROTOCOL.md on stdin/stdout (one JSON
// object per line; logs on stderr only).
//
// The SDK is used as published: MeshClient does the relay connection, the
// session set-up (X3DH + KNOCK) and the Double Ratchet; its RegistryClient
// uploads the pre-keys and fetches peer bundles. Only the registration itself
// is done here, because 4.0.0's registration body carries no proof of
// possession and the AGT 5.0.0 registry rejects it (see interop/README.md).
//
// Environment:
//   MESHWIRE_NODE_PEER_DEBUG=1       log every frame sent / received on stderr
//   MESHWIRE_NODE_HEARTBEAT_MS=N     heartbeat period (default 20000, 0 = off)
//   MESHWIRE_NODE_CONNECT_GRACE_MS=N how long a fresh connection must survive
//                                    before `connect`/`reconnect` report ok
//                                    (default 300)

import { spawn } from "node:child_process";
import { createPrivateKey, createPublicKey, createHash, sign as edSign } from "node:crypto";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

// ── Runtime prerequisites ───────────────────────────────────────────────
// 4.0.0 opens its socket with the global WHATWG `WebSocket` (global by
// default from Node 22; Node 20 needs --experimental-websocket). JSON.rawJSON
// (Node 21+, or Node 20 with --harmony-json-parse-with-source) lets payload
// integers beyond 2^53 reach the SDK's JSON.stringify with their exact text.
// When either is missing, run this file again with the flags.
const REEXEC_ENV = "MESHWIRE_NODE_PEER_REEXEC";
{
  const flags = [];
  if (typeof globalThis.WebSocket !== "function" && process.allowedNodeEnvironmentFlags.has("--experimental-websocket")) {
    flags.push("--experimental-websocket");
  }
  const nodeMajor = Number(process.versions.node.split(".")[0]);
  if (typeof JSON.rawJSON !== "function" && nodeMajor === 20) {
    flags.push("--harmony-json-parse-with-source");
  }
  if (flags.length > 0 && !process.env[REEXEC_ENV]) {
    const child = spawn(
      process.execPath,
      [...flags, ...process.execArgv, fileURLToPath(import.meta.url), ...process.argv.slice(2)],
      { stdio: "inherit", env: { ...process.env, [REEXEC_ENV]: "1" } },
    );
    for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
      process.on(sig, () => child.kill(sig));
    }
    child.on("exit", (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
    await new Promise(() => {}); // the child does the work; never continue here
  }
}

// Keep stdout for protocol lines only, whatever the SDK prints.
console.log = (...args) => console.error(...args);
console.info = (...args) => console.error(...args);

const require = createRequire(import.meta.url);
const sdk = require("@microsoft/agent-governance-sdk");
const SDK_VERSION = require("@microsoft/agent-governance-sdk/package.json").version;
const { MeshClient, X3DHKeyManager } = sdk;

const DEBUG = process.env.MESHWIRE_NODE_PEER_DEBUG === "1";
const HEARTBEAT_MS = Number(process.env.MESHWIRE_NODE_HEARTBEAT_MS ?? 20_000);
const CONNECT_GRACE_MS = Number(process.env.MESHWIRE_NODE_CONNECT_GRACE_MS ?? 300);
const OTK_COUNT = 20;

function log(...args) {
  console.error(`[node-peer ${new Date().toISOString()}]`, ...args);
}

// Wall-clock microseconds since the epoch, with sub-millisecond resolution.
function nowUs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1000);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ── Identity (Ed25519 seed) ─────────────────────────────────────────────
const PKCS8_ED25519_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");

function identityFromSeed(seedHex) {
  if (typeof seedHex !== "string" || !/^[0-9a-fA-F]{64}$/.test(seedHex)) {
    throw new Error("seed must be 32 bytes of hex");
  }
  const seed = new Uint8Array(Buffer.from(seedHex, "hex"));
  const privateKey = createPrivateKey({
    key: Buffer.concat([PKCS8_ED25519_PREFIX, seed]),
    format: "der",
    type: "pkcs8",
  });
  const publicKey = new Uint8Array(Buffer.from(createPublicKey(privateKey).export({ format: "jwk" }).x, "base64url"));
  const did = "did:mesh:" + createHash("sha256").update(publicKey).digest("hex").slice(0, 32);
  const signBytes = (msg) => new Uint8Array(edSign(null, msg, privateKey));
  return { seed, publicKey, did, signBytes };
}

const b64url = (bytes) => Buffer.from(bytes).toString("base64url");

// Registration with the current protocol (AGT 5.0.0 registry): proof of
// possession = Ed25519 over utf8(public_key_b64url + proof_timestamp).
async function registerCurrent(registryUrl, identity, name) {
  const publicKeyB64 = b64url(identity.publicKey);
  const proofTimestamp = new Date().toISOString();
  const body = JSON.stringify({
    public_key: publicKeyB64,
    proof: b64url(identity.signBytes(new TextEncoder().encode(publicKeyB64 + proofTimestamp))),
    proof_timestamp: proofTimestamp,
    capabilities: [name],
    metadata: { display_name: name, agentmesh_kdf: "legacy-ff-salt" },
  });
  let resp;
  try {
    resp = await fetch(`${registryUrl}/v1/agents`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
      signal: AbortSignal.timeout(10_000),
    });
  } catch (e) {
    throw new Error(`registry ${registryUrl} unreachable: ${e?.cause?.message ?? e?.message ?? e}`);
  }
  const text = await resp.text();
  if (resp.status === 409) return "already registered";
  if (resp.status !== 200 && resp.status !== 201) {
    throw new Error(`registration failed: HTTP ${resp.status} ${text}`);
  }
  try {
    const j = JSON.parse(text);
    if (j.did && j.did !== identity.did) {
      throw new Error(`registry assigned ${j.did}, expected ${identity.did}`);
    }
  } catch (e) {
    if (!(e instanceof SyntaxError)) throw e;
  }
  return "registered";
}

// ── Request parsing: keep integers beyond 2^53 exact ────────────────────
function parseRequest(line) {
  if (typeof JSON.rawJSON !== "function") return JSON.parse(line);
  return JSON.parse(line, (key, value, context) => {
    if (typeof value === "number" && context && typeof context.source === "string" && !Number.isSafeInteger(value) && /^-?\d+$/.test(context.source)) {
      return JSON.rawJSON(context.source);
    }
    return value;
  });
}

// ── The peer ────────────────────────────────────────────────────────────
class Peer {
  client = null;
  identity = null;
  inbox = []; // {from, id, payload, t_us}
  waiters = new Set();
  heartbeat = null;
  // The last frames the SDK handed to its socket: {n, type, id, to, open}.
  sent = [];
  sentCount = 0;
  pendingAckId = null;
  socketEvents = []; // {kind: "error-frame"|"close", detail, code, at}
  closed = new WeakMap(); // WebSocket -> promise of its close event

  // A wsFactory around the global WebSocket: it only observes what the SDK
  // sends and receives (the message ids the SDK does not return, relay
  // error frames the SDK ignores, close codes).
  wsFactory = (url) => {
    const ws = new WebSocket(url);
    this.closed.set(ws, new Promise((resolve) => ws.addEventListener("close", resolve, { once: true })));
    const send = ws.send.bind(ws);
    ws.send = (data) => {
      const open = ws.readyState === WebSocket.OPEN;
      let frame = null;
      try {
        frame = JSON.parse(String(data));
      } catch {
        /* not JSON */
      }
      if (frame) {
        this.sent.push({ n: this.sentCount++, type: frame.type, id: frame.id, to: frame.to, open });
        if (this.sent.length > 256) this.sent.splice(0, this.sent.length - 256);
        // 4.0.0 acks a message right before handing it to onMessage (same
        // tick): this is how the peer learns the id of a received message.
        if (frame.type === "ack") this.pendingAckId = frame.id;
      }
      if (DEBUG) log(`send${open ? "" : " (socket not open: dropped)"}`, String(data).slice(0, 300));
      return send(data);
    };
    ws.addEventListener("message", (event) => {
      const text = String(event.data);
      if (DEBUG) log("recv", text.slice(0, 300));
      let frame = null;
      try {
        frame = JSON.parse(text);
      } catch {
        return;
      }
      if (frame && frame.type === "error") {
        // 4.0.0 ignores error frames silently.
        log(`relay error frame: ${frame.detail ?? text}`);
        this.socketEvents.push({ kind: "error-frame", detail: String(frame.detail ?? text), ws, at: Date.now() });
      }
    });
    ws.addEventListener("close", (event) => {
      log(`socket closed: code ${event.code}${event.reason ? ` reason ${event.reason}` : ""}`);
      this.socketEvents.push({ kind: "close", code: event.code, detail: event.reason, ws, at: Date.now() });
      if (this.socketEvents.length > 200) this.socketEvents.splice(0, 100);
    });
    return ws;
  };

  requireClient() {
    if (!this.client) throw new Error("not connected (send connect first)");
    return this.client;
  }

  deliver(from, payload) {
    const id = this.pendingAckId;
    this.pendingAckId = null;
    this.inbox.push({ from, id, payload, t_us: nowUs() });
    for (const w of this.waiters) w();
  }

  // Joins the relay with the SDK and checks the connection survives the
  // first moments (a relay that refuses the connect frame accepts the socket,
  // sends an error frame and closes; 4.0.0's connect() has already resolved).
  async join() {
    const client = this.requireClient();
    try {
      await client.connect();
    } catch (e) {
      throw new Error(`cannot reach the relay at ${client.options.relayUrl}/ws (${e instanceof Error ? e.message : e})`);
    }
    const ws = client.ws;
    const mark = Date.now();
    await sleep(CONNECT_GRACE_MS);
    const events = this.socketEvents.filter((e) => e.ws === ws && e.at >= mark - 1000);
    const closed = events.find((e) => e.kind === "close");
    if (closed || !client.isConnected) {
      const errors = events.filter((e) => e.kind === "error-frame").map((e) => e.detail);
      await client.disconnect(); // stop 4.0.0's auto-reconnect loop
      throw new Error(
        `relay closed the connection (code ${closed?.code ?? "?"})` + (errors.length ? `: ${errors.join("; ")}` : ""),
      );
    }
    this.startHeartbeat();
  }

  // Leaves the relay and waits for the socket's close event. 4.0.0's onclose
  // handler writes the client-wide `connected` flag, so a close event that
  // arrives after a newer socket opened would mark the new connection as
  // down (and, for a close code other than 1000, start an auto-reconnect).
  async leave() {
    const client = this.requireClient();
    const ws = client.ws;
    await client.disconnect();
    const closed = ws && this.closed.get(ws);
    if (closed) await Promise.race([closed, sleep(3000)]);
  }

  sentSince(mark) {
    return this.sent.filter((f) => f.n >= mark);
  }

  // One message through the SDK: opens the session first if there is none.
  async sendOne(to, payload) {
    const client = this.requireClient();
    // 4.0.0 has no outbox: frames sent while disconnected are dropped.
    if (!client.isConnected) {
      throw new Error("not connected to the relay (4.0.0 cannot queue while disconnected)");
    }
    if (!client.getSession(to)) {
      const mark = this.sentCount;
      await client.establishSessionWithPeer(to);
      const knock = this.sentSince(mark).find((f) => f.type === "knock" && f.to === to);
      if (!knock || !knock.open) {
        // The SDK stored the session although its KNOCK never left.
        client.closeSession(to);
        throw new Error("KNOCK could not be sent (relay connection lost)");
      }
    }
    const mark = this.sentCount;
    await client.send(to, payload);
    const frame = this.sentSince(mark).find((f) => f.type === "message" && f.to === to);
    if (!frame) throw new Error("the SDK sent no message frame");
    if (!frame.open) throw new Error(`message ${frame.id} dropped: socket not open`);
    return frame.id;
  }

  startHeartbeat() {
    if (this.heartbeat || !(HEARTBEAT_MS > 0)) return;
    // 4.0.0 never sends heartbeats on its own (it only offers sendHeartbeat()).
    this.heartbeat = setInterval(() => this.client?.sendHeartbeat(), HEARTBEAT_MS);
    this.heartbeat.unref();
  }

  stopHeartbeat() {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  async handle(req) {
    switch (req.cmd) {
      case "hello":
        return { runtime: `agent-governance-sdk-node ${SDK_VERSION} (node ${process.versions.node})`, features: [] };

      case "connect": {
        if (this.client) throw new Error("already connected");
        for (const f of ["relay", "registry", "name", "seed"]) {
          if (typeof req[f] !== "string") throw new Error(`missing string field "${f}"`);
        }
        if (req.state_dir) log(`state_dir ignored: 4.0.0's MeshClient keeps sessions in memory only`);
        const relayUrl = req.relay.replace(/\/+$/, "");
        const registryUrl = req.registry.replace(/\/+$/, "");
        const identity = identityFromSeed(req.seed);
        const keyManager = new X3DHKeyManager(identity.seed, identity.publicKey);
        const outcome = await registerCurrent(registryUrl, identity, req.name);
        log(`${identity.did}: ${outcome}`);
        const client = new MeshClient({
          relayUrl,
          registryUrl,
          keyManager,
          agentDid: identity.did,
          displayName: req.name,
          autoRegister: false,
          reconnectBaseDelayMs: 200,
          reconnectMaxDelayMs: 2000,
          wsFactory: this.wsFactory,
          registryClientOptions: {
            // 4.0.0's RegistryClient signs every request when given a signer:
            // Authorization: Ed25519-Timestamp <did> <ts> <b64url sig(ts)>.
            authSigner: { did: identity.did, sign: identity.signBytes },
          },
        });
        client.onMessage((from, payload) => this.deliver(from, payload));
        client.onError((kind, peer, detail) => log(`sdk error [${kind}] ${peer}: ${detail}`));
        client.onDisconnect((reason, code) => log(`sdk disconnect: ${reason} (code ${code})`));
        // Pre-keys: the SDK's key manager and registry client.
        const spk = keyManager.generateSignedPreKey();
        const otks = keyManager.generateOneTimePreKeys(OTK_COUNT);
        await client.getRegistry().uploadPrekeys(identity.did, keyManager.identityKey.publicKey, keyManager.identityKeyEd, spk, otks);
        this.client = client;
        this.identity = identity;
        try {
          await this.join();
        } catch (e) {
          this.client = null;
          throw e;
        }
        return { did: identity.did };
      }

      case "send": {
        if (typeof req.to !== "string") throw new Error('missing string field "to"');
        if (!("payload" in req)) throw new Error("missing payload");
        return { id: await this.sendOne(req.to, req.payload) };
      }

      case "send_many": {
        if (typeof req.to !== "string") throw new Error('missing string field "to"');
        const count = req.count ?? 1;
        const size = req.payload_bytes ?? 256;
        const interval = req.interval_ms ?? 0;
        if (!Number.isInteger(count) || count < 0) throw new Error("count must be a non-negative integer");
        if (!Number.isInteger(size) || !(interval >= 0)) throw new Error("bad payload_bytes / interval_ms");
        const start = performance.now();
        for (let seq = 0; seq < count; seq++) {
          if (seq > 0 && interval > 0) {
            const wait = start + seq * interval - performance.now();
            if (wait > 0) await sleep(wait);
          }
          const payload = { seq, t_us: nowUs(), pad: "" };
          payload.pad = "x".repeat(Math.max(0, size - Buffer.byteLength(JSON.stringify(payload))));
          await this.sendOne(req.to, payload);
        }
        return { sent: count };
      }

      case "recv": {
        const count = Number.isInteger(req.count) ? req.count : 1;
        const timeoutMs = Number.isFinite(req.timeout_ms) ? req.timeout_ms : 10_000;
        const deadline = Date.now() + timeoutMs;
        while (this.inbox.length < count) {
          const left = deadline - Date.now();
          if (left <= 0) break;
          await new Promise((resolve) => {
            const done = () => {
              clearTimeout(timer);
              this.waiters.delete(done);
              resolve();
            };
            const timer = setTimeout(done, left);
            this.waiters.add(done);
          });
        }
        return { messages: this.inbox.splice(0, count) };
      }

      case "drain":
        return { messages: this.inbox.splice(0) };

      case "disconnect": {
        this.stopHeartbeat();
        await this.leave();
        return {};
      }

      case "reconnect": {
        const client = this.requireClient();
        // Close a live socket ourselves first and wait for it (see leave()).
        if (client.ws) await this.leave();
        // 4.0.0's reconnect(): closes any socket, then connect + fetch_pending.
        await client.reconnect();
        // Same check as connect: the connection must survive the grace period.
        const ws = client.ws;
        await sleep(CONNECT_GRACE_MS);
        if (!client.isConnected || client.ws !== ws) {
          throw new Error("relay closed the connection right after reconnect");
        }
        this.startHeartbeat();
        return {};
      }

      case "close": {
        this.stopHeartbeat();
        if (this.client) await this.leave();
        this.client = null;
        return {};
      }

      default:
        throw new Error(`unknown cmd ${JSON.stringify(req.cmd)}`);
    }
  }
}

// ── Main loop: one response per request, in order ───────────────────────
const peer = new Peer();
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
let chain = Promise.resolve();

function respond(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

rl.on("line", (line) => {
  if (line.trim() === "") return;
  chain = chain.then(async () => {
    let req;
    try {
      req = parseRequest(line);
    } catch (e) {
      respond({ ok: false, error: `bad request: ${e.message}` });
      return;
    }
    try {
      const body = await peer.handle(req);
      respond({ ok: true, ...body });
    } catch (e) {
      log(`cmd ${req?.cmd} failed: ${e instanceof Error ? e.message : String(e)}`);
      respond({ ok: false, error: e instanceof Error ? e.message : String(e) });
    }
  });
});

rl.on("close", () => {
  chain = chain.then(async () => {
    peer.stopHeartbeat();
    try {
      if (peer.client) await peer.leave();
    } catch {
      /* exiting anyway */
    }
    process.exit(0);
  });
});

process.on("unhandledRejection", (e) => log("unhandled rejection:", e));
