#!/usr/bin/env node
// Re-records mesh-session cases (schema agentmesh-golden/1, kind
// "mesh-session", top-level "kdf": "legacy-ff-salt") with two MeshClients of
// the published npm package @microsoft/agent-governance-sdk 4.0.0, and
// compares what they do with what the case recorded, byte for byte.
//
//   node record_session.mjs [--out DIR] PATH...   (files, or directories
//                                                  searched recursively)
//
// For each case the script plays the relay and the registry:
// - each client is a 4.0.0 MeshClient with a fake WebSocket
//   (options.wsFactory) and a fake fetch (registryClientOptions.fetchImpl,
//   no authSigner, so no Authorization header, as 4.0.0 sends it);
// - the client actions are read from the case: a frame a client sent on its
//   own initiative becomes the call that makes it (connect: connect();
//   knock: establishSessionWithPeer(); message: send() of plaintext_json;
//   heartbeat: sendHeartbeat(); disconnect: disconnect()), a delivery
//   becomes ws.onmessage() with the delivered text (a client's frame or one
//   of relay_frames);
// - options from the case: plaintext_peers -> plaintextPeers, knock_policy
//   and knock_verdicts -> an onKnock handler;
// - the fake registry answers each request with the recorded response;
// - randomness: every getRandomValues draw of a client (X25519 keys 32
//   bytes, nonces 12) gets that client's next recorded random_inputs value
//   (length checked); crypto.randomUUID returns the recorded uuids in order;
//   Date is fixed at fixed_time.
// Everything the clients do is recorded in the schema's shape (frames with
// emitted_while_handling_seq, http_requests, received, closes) and compared
// with the case: every frame text, registry request (method, URL, headers,
// body), message handed to onMessage, and WebSocket close (code, reason);
// every recorded random value and uuid must be drawn, and nothing more.
// With --out DIR, the 4.0.0 recordings are written to DIR/<file name>.
//
// One PASS / FAIL / SKIP line per case, then "N passed, M failed[, K skipped]".
// Exit status 1 when a case failed or none passed.

import * as nodeCrypto from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { basename, join, relative, resolve } from "node:path";

const require = createRequire(import.meta.url);
const { MeshClient, X3DHKeyManager } = require("@microsoft/agent-governance-sdk");
const SDK_VERSION = require("@microsoft/agent-governance-sdk/package.json").version;
const LEGACY = "legacy-ff-salt";
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

// ── injected inputs ─────────────────────────────────────────────────────
const webcrypto = nodeCrypto.webcrypto;
const realGetRandomValues = webcrypto.getRandomValues.bind(webcrypto);
const realRandomUUID = webcrypto.randomUUID.bind(webcrypto);
let run = null; // the case being replayed
Object.defineProperty(webcrypto, "getRandomValues", {
  configurable: true,
  writable: true,
  value(buf) {
    if (run === null) return realGetRandomValues(buf);
    const who = run.current;
    const queue = who ? run.draws[who] : null;
    const next = queue?.shift();
    if (!next) {
      run.problems.push(`${who ?? "no client"} drew ${buf.length} random bytes beyond the recorded ones`);
      return realGetRandomValues(buf);
    }
    if (buf.length !== next.bytes.length) {
      run.problems.push(`${next.role}: the SDK drew ${buf.length} bytes, the recorded value has ${next.bytes.length}`);
      return realGetRandomValues(buf);
    }
    buf.set(next.bytes);
    return buf;
  },
});
Object.defineProperty(webcrypto, "randomUUID", {
  configurable: true,
  writable: true,
  value() {
    if (run === null) return realRandomUUID();
    const id = run.uuids.shift();
    if (id === undefined) {
      run.problems.push("a uuid was drawn beyond the recorded ones");
      return realRandomUUID();
    }
    return id;
  },
});
if (globalThis.crypto !== webcrypto && globalThis.crypto) {
  // Node exposes webcrypto as the global crypto; keep both patched.
  globalThis.crypto.randomUUID = webcrypto.randomUUID;
}
const RealDate = Date;
let fixedNow = 0;
globalThis.Date = class FixedDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(fixedNow);
    else super(...args);
  }
  static now() {
    return fixedNow;
  }
};

// ── the fake socket and registry ────────────────────────────────────────
class FakeSocket {
  constructor(url, who) {
    this.url = url;
    this.who = who;
    this.readyState = 0;
    this.onopen = this.onclose = this.onmessage = this.onerror = null;
    // connect() sets its handlers right after the factory returns.
    queueMicrotask(() => {
      this.readyState = 1;
      this.onopen?.();
    });
    run.sockets[who] = this;
  }
  send(text) {
    run.record.frame(this.who, String(text));
  }
  close(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    run.record.close(this.who, code, reason);
    setImmediate(() => this.onclose?.({ code, reason }));
  }
}

function fakeFetch(who) {
  return async (url, init) => {
    const headers = { ...(init.headers ?? {}) };
    const body = init.body === undefined ? null : String(init.body);
    const recorded = run.httpQueue[who].shift();
    run.record.http(who, init.method, url, headers, body, recorded);
    const status = recorded?.response_status ?? 599;
    const text = recorded?.response_body_json ?? "";
    return { ok: status >= 200 && status < 300, status, text: async () => text, json: async () => JSON.parse(text) };
  };
}

const settle = async () => {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
};

// ── one case ────────────────────────────────────────────────────────────
async function replay(c) {
  const problems = [];
  const parties = ["alice", "bob"];
  const seqBase = new Map(); // delivered seq -> text
  for (const f of c.frames) seqBase.set(f.seq, f.frame_json);
  for (const f of c.relay_frames ?? []) seqBase.set(f.seq, f.frame_json);
  const draws = {};
  for (const p of parties) {
    draws[p] = c.random_inputs
      .filter((r) => r.role.startsWith(`${p}/`))
      .map((r) => ({ role: r.role, bytes: unhex(r.value) }));
  }
  const httpQueue = {};
  for (const p of parties) httpQueue[p] = c.http_requests.filter((h) => h.client === p);
  const out = { frames: [], http_requests: [], received: [], closes: [] };
  let t = 0;
  run = {
    current: null,
    delivering: null,
    draws,
    uuids: [...(c.uuids ?? [])],
    problems,
    errors: [],
    decided: new Set(),
    sockets: {},
    httpQueue,
    record: {
      frame(who, text) {
        let type = null;
        try {
          type = JSON.parse(text).type;
        } catch {
          /* recorded as is */
        }
        const f = { t: t++, sender: who, type, frame_json: text };
        if (run.delivering && run.delivering.to === who) f.emitted_while_handling_seq = run.delivering.seq;
        out.frames.push(f);
      },
      http(who, method, url, headers, body, recorded) {
        out.http_requests.push({
          t: t++,
          client: who,
          method,
          url,
          headers,
          body_json: body,
          response_status: recorded?.response_status ?? null,
          response_body_json: recorded?.response_body_json ?? null,
        });
      },
      close(who, code, reason) {
        out.closes.push({ t: t++, client: who, code, reason });
      },
    },
  };
  fixedNow = RealDate.parse(c.fixed_time);

  // The clients.
  const clients = {};
  const dids = {};
  for (const p of parties) dids[p] = c[p].did;
  for (const p of parties) {
    const spec = c[p];
    const km = new X3DHKeyManager(unhex(spec.ed25519_seed), unhex(spec.ed25519_public));
    const client = new MeshClient({
      relayUrl: c.relay_url ?? "http://relay.test:8080",
      registryUrl: c.registry_url ?? "http://registry.test:8082",
      keyManager: km,
      agentDid: spec.did,
      oneTimePrekeyCount: spec.one_time_prekey_count ?? spec.otks.length,
      plaintextPeers: spec.plaintext_peers ?? [],
      autoReconnect: false,
      wsFactory: (url) => new FakeSocket(url, p),
      registryClientOptions: { fetchImpl: fakeFetch(p), maxRetries: 0 },
    });
    client.onMessage((from, payload, isPlaintext) => {
      out.received.push({ t: t++, receiver: p, from, payload_json: JSON.stringify(payload), is_plaintext: isPlaintext });
    });
    const verdicts = (c.knock_verdicts ?? []).filter((v) => v.client === p);
    if (spec.knock_policy !== undefined || verdicts.length > 0) {
      const policy = spec.knock_policy ?? "accept";
      // 4.0.0 hands the handler (from, intent): the KNOCK being decided is
      // the one being delivered.
      client.onKnock(async () => {
        const id = run.delivering?.knockId;
        run.decided.add(id);
        const v = verdicts.find((x) => x.knock_id === id)?.verdict ?? policy;
        if (v !== "accept" && v !== "reject") throw new Error(`unknown verdict ${v}`);
        return v === "accept";
      });
    }
    client.onError((kind, peer, detail) => {
      run.errors.push(`${p}: ${kind} ${peer}: ${detail}`);
    });
    clients[p] = client;
  }

  // The steps, in recorded order.
  const steps = [];
  for (const f of c.frames) if (f.emitted_while_handling_seq == null) steps.push({ t: f.t, own: f });
  for (const d of c.deliveries) steps.push({ t: d.t, delivery: d });
  steps.sort((a, b) => a.t - b.t);
  for (const step of steps) {
    if (step.own) {
      const f = step.own;
      const who = f.sender;
      const client = clients[who];
      if (!client) throw new Error(`frame ${f.seq}: unknown client ${who}`);
      const frame = JSON.parse(f.frame_json);
      run.current = who;
      switch (f.type) {
        case "connect":
          await client.connect();
          break;
        case "fetch_pending":
          break; // connect() sends it
        case "knock":
          await client.establishSessionWithPeer(frame.to);
          break;
        case "message": {
          const text = f.plaintext_json ?? (frame.plaintext ? Buffer.from(frame.ciphertext, "base64").toString("utf8") : null);
          if (text == null) throw new Error(`message frame ${f.seq} has no plaintext_json`);
          const payload = JSON.parse(text);
          if (JSON.stringify(payload) !== text) {
            throw new Error(`message frame ${f.seq}: ${text} is not what JSON.stringify writes, 4.0.0 cannot send it`);
          }
          await client.send(frame.to, payload);
          break;
        }
        case "heartbeat":
          client.sendHeartbeat();
          break;
        case "disconnect":
          await client.disconnect();
          break;
        default:
          throw new Error(`no replay for a ${f.type} frame (seq ${f.seq}) sent on a client's own initiative`);
      }
      await settle();
      run.current = null;
    } else {
      const d = step.delivery;
      const text = seqBase.get(d.frame_seq);
      if (text === undefined) throw new Error(`delivery of unknown frame ${d.frame_seq}`);
      const sock = run.sockets[d.to];
      if (!sock || sock.readyState !== 1) throw new Error(`delivery of frame ${d.frame_seq} to ${d.to}, whose socket is not open`);
      let knockId = null;
      try {
        const parsed = JSON.parse(text);
        if (parsed.type === "knock") knockId = parsed.id;
      } catch {
        /* delivered as is */
      }
      run.current = d.to;
      run.delivering = { seq: d.frame_seq, to: d.to, knockId };
      sock.onmessage({ data: text });
      await settle();
      run.delivering = null;
      run.current = null;
    }
  }
  for (const p of parties) {
    for (const left of run.draws[p]) problems.push(`recorded ${left.role} was never drawn`);
    for (const left of run.httpQueue[p]) problems.push(`recorded ${left.method} ${left.url} of ${p} was never made`);
  }
  if (run.uuids.length) problems.push(`${run.uuids.length} recorded uuid(s) never drawn`);
  for (const v of c.knock_verdicts ?? []) {
    if (!run.decided.has(v.knock_id)) problems.push(`knock_verdicts: ${v.client} was never asked to decide KNOCK ${v.knock_id}`);
  }
  const errors = run.errors;
  run = null;

  // Compare.
  const eq = (what, a, b) => {
    const sa = JSON.stringify(a);
    const sb = JSON.stringify(b);
    if (sa !== sb) problems.push(`${what}:\n    4.0.0   ${sa}\n    case    ${sb}`);
  };
  const recordedFrames = [...c.frames].sort((a, b) => a.t - b.t);
  eq("frame count", out.frames.length, recordedFrames.length);
  for (let i = 0; i < Math.max(out.frames.length, recordedFrames.length); i++) {
    const a = out.frames[i];
    const b = recordedFrames[i];
    const pick = (f) => f && [f.sender, f.frame_json, f.emitted_while_handling_seq ?? null];
    if (JSON.stringify(pick(a)) !== JSON.stringify(pick(b))) {
      eq(`frame ${b?.seq ?? "(extra)"} (${b?.sender} ${b?.type})`, pick(a), pick(b));
      break;
    }
  }
  const pickHttp = (h) => [h.client, h.method, h.url, h.headers ?? {}, h.body_json ?? null];
  eq("registry requests", out.http_requests.map(pickHttp), c.http_requests.map(pickHttp));
  const pickRecv = (r) => [r.receiver, r.from, r.payload_json, r.is_plaintext ?? false];
  eq(
    "messages handed to onMessage",
    out.received.map(pickRecv),
    c.received.map((r) => [r.receiver, r.from, r.payload_json, r.is_plaintext ?? false]),
  );
  if (c.closes !== undefined) {
    const pickClose = (x) => [x.client, x.code, x.reason];
    eq("WebSocket closes", out.closes.map(pickClose), c.closes.map(pickClose));
  }
  return { problems, errors, recording: out };
}

// ── files ───────────────────────────────────────────────────────────────
function collect(path, out) {
  if (statSync(path).isDirectory()) {
    for (const entry of readdirSync(path).sort()) {
      const p = join(path, entry);
      if (statSync(p).isDirectory() || entry.endsWith(".json")) collect(p, out);
    }
  } else {
    out.push(path);
  }
}

async function main() {
  const args = process.argv.slice(2);
  let outDir = null;
  const paths = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--out") outDir = args[++i];
    else paths.push(args[i]);
  }
  if (paths.length === 0) {
    console.error("usage: node record_session.mjs [--out DIR] PATH...");
    process.exit(2);
  }
  const files = [];
  for (const p of paths) collect(resolve(p), files);
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const file of files) {
    const doc = JSON.parse(readFileSync(file, "utf8"));
    if (doc.kind !== "mesh-session") continue;
    const label = relative(process.cwd(), file);
    const recorded = [];
    for (const c of doc.cases) {
      if (doc.kdf !== LEGACY) {
        console.log(`SKIP ${label} ${c.name}: kdf ${doc.kdf ?? "spec"}; npm SDK ${SDK_VERSION} has only the legacy KDF (and no connect proof)`);
        skipped++;
        continue;
      }
      let result;
      try {
        result = await replay(c);
      } catch (e) {
        run = null;
        result = { problems: [`replay stopped: ${e.message}`], errors: [] };
      }
      if (result.problems.length === 0) {
        console.log(`PASS ${label} ${c.name}: ${c.frames.length} frames, ${c.http_requests.length} registry requests, ${c.received.length} messages${c.closes ? `, ${c.closes.length} closes` : ""} identical from npm SDK ${SDK_VERSION}`);
        passed++;
      } else {
        console.log(`FAIL ${label} ${c.name}:\n  ${result.problems.join("\n  ")}`);
        if (result.errors.length) console.log(`  SDK errors: ${result.errors.join("; ")}`);
        failed++;
      }
      if (result.recording) recorded.push({ name: c.name, ...result.recording });
    }
    if (outDir && recorded.length) {
      mkdirSync(outDir, { recursive: true });
      const target = join(outDir, basename(file));
      writeFileSync(
        target,
        JSON.stringify({ schema: doc.schema, kind: doc.kind, producer: `npm @microsoft/agent-governance-sdk ${SDK_VERSION} (record_session.mjs)`, kdf: doc.kdf, cases: recorded }, null, 2) + "\n",
      );
    }
  }
  console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
  process.exit(failed > 0 || passed === 0 ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
