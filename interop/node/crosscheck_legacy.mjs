#!/usr/bin/env node
// Re-derives the legacy-KDF golden vectors (schema agentmesh-golden/1,
// top-level "kdf": "legacy-ff-salt") with the published npm package
// @microsoft/agent-governance-sdk 4.0.0: x3dh cases through its
// X3DHKeyManager, ratchet cases through its SecureChannel.createSender /
// createReceiver, with the recorded randomness injected.
//
//   node crosscheck_legacy.mjs PATH...     (files, or directories searched
//                                           recursively for *.json)
//
// One PASS / FAIL / SKIP line per case, then "N passed, M failed[, K skipped]".
// Exit status 1 when a case failed or none passed.
//
// Randomness: 4.0.0 draws every private key and nonce through
// `require("node:crypto").webcrypto.getRandomValues(new Uint8Array(n))`
// (x3dh.js and ratchet.js: X25519 key pairs of 32 bytes, AEAD nonces of 12).
// This script replaces that method while an SDK call runs and hands out the
// recorded values in order, checking the length of every draw and that every
// recorded value was drawn.

import * as nodeCrypto from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative, resolve } from "node:path";

const require = createRequire(import.meta.url);
const { X3DHKeyManager, SecureChannel } = require("@microsoft/agent-governance-sdk");
const SDK_VERSION = require("@microsoft/agent-governance-sdk/package.json").version;

const LEGACY = "legacy-ff-salt";
const FF_SALT = Buffer.alloc(32, 0xff);
const X3DH_INFO = Buffer.from("AgentMesh_X3DH_v1");

// ── bytes ───────────────────────────────────────────────────────────────
const hex = (b) => (b == null ? null : Buffer.from(b).toString("hex"));
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));
const utf8 = (s) => new Uint8Array(Buffer.from(s, "utf8"));
const concat = (...parts) => new Uint8Array(Buffer.concat(parts.map((p) => Buffer.from(p))));
const sha256 = (data) => new Uint8Array(nodeCrypto.createHash("sha256").update(data).digest());

// ── independent primitives (node:crypto), to check the recorded values ──
function x25519(privateKey, publicKey) {
  const priv = nodeCrypto.createPrivateKey({
    key: Buffer.concat([Buffer.from("302e020100300506032b656e04220420", "hex"), Buffer.from(privateKey)]),
    format: "der",
    type: "pkcs8",
  });
  const pub = nodeCrypto.createPublicKey({
    key: Buffer.concat([Buffer.from("302a300506032b656e032100", "hex"), Buffer.from(publicKey)]),
    format: "der",
    type: "spki",
  });
  return new Uint8Array(nodeCrypto.diffieHellman({ privateKey: priv, publicKey: pub }));
}

function ed25519Public(seed) {
  const priv = nodeCrypto.createPrivateKey({
    key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), Buffer.from(seed)]),
    format: "der",
    type: "pkcs8",
  });
  return new Uint8Array(Buffer.from(nodeCrypto.createPublicKey(priv).export({ format: "jwk" }).x, "base64url"));
}

const didOf = (edPublic) => "did:mesh:" + hex(sha256(edPublic)).slice(0, 32);

function legacyX3dhKdf(ikm) {
  return new Uint8Array(nodeCrypto.hkdfSync("sha256", ikm, FF_SALT, X3DH_INFO, 32));
}

const hmac01 = (chainKey) => new Uint8Array(nodeCrypto.createHmac("sha256", chainKey).update(Buffer.from([0x01])).digest());

function chachaOpen(key, data, aad) {
  const nonce = data.subarray(0, 12);
  const tag = data.subarray(data.length - 16);
  const ct = data.subarray(12, data.length - 16);
  const d = nodeCrypto.createDecipheriv("chacha20-poly1305", key, nonce, { authTagLength: 16 });
  d.setAAD(aad, { plaintextLength: ct.length });
  d.setAuthTag(tag);
  return new Uint8Array(Buffer.concat([d.update(ct), d.final()]));
}

function headerBytes(h) {
  const buf = new Uint8Array(40);
  buf.set(h.dhPublicKey, 0);
  const view = new DataView(buf.buffer);
  view.setUint32(32, h.previousChainLength, false);
  view.setUint32(36, h.messageNumber, false);
  return buf;
}

// ── randomness injection ────────────────────────────────────────────────
const webcrypto = nodeCrypto.webcrypto;
const realGetRandomValues = webcrypto.getRandomValues.bind(webcrypto);
let drawQueue = null; // [{label, bytes}] while an SDK call runs
let drawLog = null; // problems found while drawing
Object.defineProperty(webcrypto, "getRandomValues", {
  configurable: true,
  writable: true,
  value(buf) {
    if (drawQueue === null) return realGetRandomValues(buf);
    const next = drawQueue.shift();
    if (!next) {
      drawLog.push(`unexpected draw of ${buf.length} bytes`);
      return realGetRandomValues(buf);
    }
    if (!(buf instanceof Uint8Array) || buf.length !== next.bytes.length) {
      drawLog.push(`draw for ${next.label}: SDK asked for ${buf.length} bytes, recorded value has ${next.bytes.length}`);
      return realGetRandomValues(buf);
    }
    buf.set(next.bytes);
    return buf;
  },
});

// Runs fn with the given draws queued; returns {value, error, drawProblems}.
function withDraws(draws, fn) {
  drawQueue = draws.map((d) => ({ label: d[0], bytes: d[1] }));
  drawLog = [];
  let value;
  let error = null;
  try {
    value = fn();
  } catch (e) {
    error = e;
  }
  for (const left of drawQueue) drawLog.push(`recorded ${left.label} was never drawn`);
  const drawProblems = drawLog;
  drawQueue = null;
  drawLog = null;
  return { value, error, drawProblems };
}

// ── checking ────────────────────────────────────────────────────────────
class Case {
  problems = [];
  facts = [];
  eq(what, actual, expected) {
    const a = actual instanceof Uint8Array ? hex(actual) : actual;
    const e = expected instanceof Uint8Array ? hex(expected) : expected;
    if (JSON.stringify(a) !== JSON.stringify(e)) {
      this.problems.push(`${what}: got ${short(a)}, expected ${short(e)}`);
    }
  }
  ok(what, cond) {
    if (!cond) this.problems.push(what);
  }
  draws(where, r) {
    for (const p of r.drawProblems) this.problems.push(`${where}: ${p}`);
    if (r.error) throw new Error(`${where}: SDK threw: ${r.error.message}`);
    return r.value;
  }
}

function short(v) {
  const s = typeof v === "string" ? v : JSON.stringify(v);
  return s && s.length > 80 ? s.slice(0, 77) + "..." : s;
}

// Bob's key manager with his SPK (id 0) and, when used, OTKs 0..otk_id
// (4.0.0 numbers OTKs from 0; the unused ids get filler keys).
function bobKeyManager(c, x, name) {
  const km = new X3DHKeyManager(unhex(x.bob_ed25519_seed), unhex(x.bob_ed25519_public));
  c.eq("bob x25519 private (SDK ed25519ToX25519)", km.identityKey.privateKey, unhex(x.bob_x25519_private));
  c.eq("bob x25519 public (SDK)", km.identityKey.publicKey, unhex(x.bob_x25519_public));
  if (x.bob_spk_id !== 0) throw new Error(`bob_spk_id ${x.bob_spk_id}: 4.0.0's first signed pre-key has id 0`);
  const spk = c.draws("generateSignedPreKey", withDraws([["bob/spk", unhex(x.bob_spk_private)]], () => km.generateSignedPreKey()));
  c.eq("SPK id", spk.keyId, x.bob_spk_id);
  c.eq("SPK public (SDK)", spk.publicKey, unhex(x.bob_spk_public));
  c.eq("SPK signature (SDK Ed25519)", spk.signature, unhex(x.bob_spk_signature));
  if (x.bob_otk_id != null) {
    const draws = [];
    for (let id = 0; id < x.bob_otk_id; id++) {
      draws.push([`bob/otk-filler-${id}`, sha256(utf8(`agentmesh-golden/${name}/bob/otk-filler-${id}`))]);
    }
    draws.push(["bob/otk", unhex(x.bob_otk_private)]);
    const otks = c.draws("generateOneTimePreKeys", withDraws(draws, () => km.generateOneTimePreKeys(x.bob_otk_id + 1)));
    const otk = otks[otks.length - 1];
    c.eq("OTK id", otk.keyId, x.bob_otk_id);
    c.eq("OTK public (SDK)", otk.publicKey, unhex(x.bob_otk_public));
  }
  return km;
}

function aliceKeyManager(c, x) {
  const km = new X3DHKeyManager(unhex(x.alice_ed25519_seed), unhex(x.alice_ed25519_public));
  c.eq("alice x25519 private (SDK ed25519ToX25519)", km.identityKey.privateKey, unhex(x.alice_x25519_private));
  c.eq("alice x25519 public (SDK)", km.identityKey.publicKey, unhex(x.alice_x25519_public));
  return km;
}

// The bundle as a registry would serve it, from the recorded public values.
function bundleOf(x) {
  const bundle = {
    identityKey: unhex(x.bob_x25519_public),
    identityKeyEd: unhex(x.bob_ed25519_public),
    signedPreKey: unhex(x.bob_spk_public),
    signedPreKeySignature: unhex(x.bob_spk_signature),
    signedPreKeyId: x.bob_spk_id,
  };
  if (x.bob_otk_id != null) {
    bundle.oneTimePreKey = unhex(x.bob_otk_public);
    bundle.oneTimePreKeyId = x.bob_otk_id;
  }
  return bundle;
}

// Recorded values checked with node:crypto (not the SDK): keys from seeds,
// DH outputs, legacy KDF over them.
function checkRecordedX3dh(c, x) {
  c.eq("alice ed25519 public from seed (node:crypto)", ed25519Public(unhex(x.alice_ed25519_seed)), unhex(x.alice_ed25519_public));
  c.eq("bob ed25519 public from seed (node:crypto)", ed25519Public(unhex(x.bob_ed25519_seed)), unhex(x.bob_ed25519_public));
  const ek = unhex(x.alice_ephemeral_private);
  const dh = [
    x25519(unhex(x.alice_x25519_private), unhex(x.bob_spk_public)),
    x25519(ek, unhex(x.bob_x25519_public)),
    x25519(ek, unhex(x.bob_spk_public)),
  ];
  if (x.bob_otk_id != null) dh.push(x25519(ek, unhex(x.bob_otk_public)));
  for (let i = 0; i < 4; i++) {
    c.eq(`dh${i + 1} (node:crypto X25519)`, dh[i] ?? null, x[`dh${i + 1}`] == null ? null : unhex(x[`dh${i + 1}`]));
  }
  c.eq("shared_secret = HKDF(salt 0xFF*32, DH1||..) (node:crypto)", legacyX3dhKdf(concat(...dh)), unhex(x.shared_secret));
}

function checkX3dhCase(c, x) {
  checkRecordedX3dh(c, x);
  const alice = aliceKeyManager(c, x);
  const bob = bobKeyManager(c, x, x.name);
  c.eq("bob public bundle (SDK getPublicBundle)", bundleJson(bob.getPublicBundle(x.bob_otk_id ?? undefined)), bundleJson(bundleOf(x)));
  const init = c.draws(
    "initiate",
    withDraws([["alice/ek", unhex(x.alice_ephemeral_private)]], () => alice.initiate(bundleOf(x))),
  );
  c.eq("initiate: ephemeral public", init.ephemeralPublicKey, unhex(x.alice_ephemeral_public));
  c.eq("initiate: shared secret", init.sharedSecret, unhex(x.shared_secret));
  c.eq("initiate: associated data", init.associatedData, unhex(x.associated_data));
  c.eq("initiate: used OTK id", init.usedOneTimeKeyId ?? null, x.bob_otk_id);
  const resp = c.draws(
    "respond",
    withDraws([], () => bob.respond(unhex(x.alice_x25519_public), unhex(x.alice_ephemeral_public), x.bob_otk_id ?? undefined)),
  );
  c.eq("respond: shared secret", resp.sharedSecret, unhex(x.shared_secret));
  c.eq("respond: associated data", resp.associatedData, unhex(x.associated_data));
  if (x.bob_otk_id != null) c.ok("respond consumed the OTK", !bob.oneTimePreKeys.has(x.bob_otk_id));
  c.facts.push(x.bob_otk_id != null ? `OTK ${x.bob_otk_id}` : "no OTK");
}

function bundleJson(b) {
  return {
    identityKey: hex(b.identityKey),
    identityKeyEd: hex(b.identityKeyEd),
    signedPreKey: hex(b.signedPreKey),
    signedPreKeySignature: hex(b.signedPreKeySignature),
    signedPreKeyId: b.signedPreKeyId,
    oneTimePreKey: hex(b.oneTimePreKey ?? null),
    oneTimePreKeyId: b.oneTimePreKeyId ?? null,
  };
}

// ── ratchet ─────────────────────────────────────────────────────────────
function stateJson(s) {
  return {
    root_key: hex(s.rootKey),
    chain_key_send: hex(s.chainKeySend),
    chain_key_recv: hex(s.chainKeyRecv),
    dh_self_public: hex(s.dhSelfPublic),
    dh_remote_public: hex(s.dhRemotePublic),
    n_send: s.sendMessageNumber,
    n_recv: s.recvMessageNumber,
    pn: s.previousSendChainLength,
    skipped: [...s.skippedKeys.keys()],
  };
}

// Full snapshot (private key and skipped message keys too), to tell whether
// a failed decrypt changed anything.
function fullSnapshot(s) {
  return JSON.stringify({ ...stateJson(s), dh_self_private: hex(s.dhSelfPrivate), skipped: [...s.skippedKeys].map(([k, v]) => [k, hex(v)]) });
}

function checkState(c, what, channel, expected) {
  const got = stateJson(channel.ratchet.getState());
  for (const key of Object.keys(expected)) c.eq(`${what}.${key}`, got[key], expected[key]);
}

const ERROR_PATTERNS = {
  "too-many-skipped": /too many skipped/i,
  "bad-tag": /invalid tag|tag/i,
};

function checkRatchetCase(c, r, x) {
  c.facts.push(`from ${r.from_x3dh}`);
  const ad = utf8(`${r.alice_did}|${r.bob_did}`);
  c.eq("shared_secret = from_x3dh shared_secret", r.shared_secret, x.shared_secret);
  c.eq("bob_spk_private = from_x3dh", r.bob_spk_private, x.bob_spk_private);
  c.eq("bob_spk_public = from_x3dh", r.bob_spk_public, x.bob_spk_public);
  c.eq("alice_did from seed", didOf(unhex(x.alice_ed25519_public)), r.alice_did);
  c.eq("bob_did from seed", didOf(unhex(x.bob_ed25519_public)), r.bob_did);
  c.eq("associated_data = utf8(alice|bob) || IK_a || IK_b", hex(concat(ad, unhex(x.alice_x25519_public), unhex(x.bob_x25519_public))), r.associated_data);

  const aliceKm = aliceKeyManager(c, x);
  const bobKm = bobKeyManager(c, x, x.name);
  const [aliceCh, est] = c.draws(
    "createSender",
    withDraws(
      [
        ["alice/ek", unhex(x.alice_ephemeral_private)],
        ["alice/ratchet-0", unhex(r.alice_ratchet_0_private)],
      ],
      () => SecureChannel.createSender(aliceKm, bundleOf(x), ad),
    ),
  );
  c.eq("establishment ik", est.initiatorIdentityKey, unhex(x.alice_x25519_public));
  c.eq("establishment ek", est.ephemeralPublicKey, unhex(x.alice_ephemeral_public));
  c.eq("establishment otk", est.usedOneTimeKeyId ?? null, x.bob_otk_id);
  const bobCh = c.draws("createReceiver", withDraws([], () => SecureChannel.createReceiver(bobKm, est, ad)));
  c.eq("alice channel associated data", aliceCh.associatedData, unhex(r.associated_data));
  c.eq("bob channel associated data", bobCh.associatedData, unhex(r.associated_data));
  c.eq("bob initial root key = shared_secret (receiver init)", bobCh.ratchet.getState().rootKey, unhex(r.shared_secret));
  c.eq("alice ratchet-0 public", aliceCh.ratchet.getState().dhSelfPublic, unhex(r.alice_ratchet_0_public));
  c.eq("alice ratchet-0 private", aliceCh.ratchet.getState().dhSelfPrivate, unhex(r.alice_ratchet_0_private));
  if (r.initial_state) {
    checkState(c, "initial_state.alice", aliceCh, r.initial_state.alice);
    checkState(c, "initial_state.bob", bobCh, r.initial_state.bob);
  }

  const channels = { alice: aliceCh, bob: bobCh };
  const messages = new Map();
  let encrypts = 0;
  let decrypts = 0;
  for (const e of r.events) {
    const ch = channels[e.party];
    if (!ch) throw new Error(`event ${e.i}: unknown party ${e.party}`);
    const tag = `event ${e.i} (${e.party} ${e.op})`;
    const generated = (e.generated_ratchet_private ?? []).map((k, j) => [`${e.party} ratchet key ${j}`, unhex(k)]);
    if (e.op === "encrypt") {
      encrypts++;
      const before = ch.ratchet.getState();
      c.eq(`${tag} message_key = HMAC(send chain, 0x01)`, before.chainKeySend ? hmac01(before.chainKeySend) : null, unhex(e.message_key));
      const out = c.draws(tag, withDraws([...generated, [`${e.party} nonce`, unhex(e.nonce)]], () => ch.send(unhex(e.plaintext))));
      c.eq(`${tag} header`, { dh: hex(out.header.dhPublicKey), pn: out.header.previousChainLength, n: out.header.messageNumber }, e.header);
      c.eq(`${tag} header_bytes`, headerBytes(out.header), unhex(e.header_bytes));
      c.eq(`${tag} ciphertext`, out.ciphertext, unhex(e.ciphertext));
      // The recorded ciphertext opens with the recorded key and aad = AD || header_bytes.
      try {
        c.eq(`${tag} recorded ciphertext opened (node:crypto)`, chachaOpen(unhex(e.message_key), unhex(e.ciphertext), concat(unhex(r.associated_data), unhex(e.header_bytes))), unhex(e.plaintext));
      } catch (err) {
        c.problems.push(`${tag}: recorded ciphertext does not open with message_key and AD||header_bytes (${err.message})`);
      }
      messages.set(e.i, {
        header: { dhPublicKey: unhex(e.header.dh), previousChainLength: e.header.pn, messageNumber: e.header.n },
        ciphertext: unhex(e.ciphertext),
      });
    } else if (e.op === "decrypt") {
      decrypts++;
      const msg = messages.get(e.message);
      if (!msg) throw new Error(`${tag}: message ${e.message} is not an earlier encrypt event`);
      if (e.expect_error) {
        const before = fullSnapshot(ch.ratchet.getState());
        const res = withDraws(generated, () => ch.receive(msg));
        const changed = fullSnapshot(ch.ratchet.getState()) !== before;
        if (!res.error) {
          c.problems.push(`${tag}: expected error ${e.expect_error}, SDK decrypted it`);
        } else {
          const pattern = ERROR_PATTERNS[e.expect_error];
          if (pattern && !pattern.test(res.error.message)) {
            c.problems.push(`${tag}: expected ${e.expect_error}, SDK threw "${res.error.message}"`);
          }
          c.facts.push(`event ${e.i}: SDK threw "${res.error.message}", state ${changed ? "CHANGED" : "unchanged"}${res.drawProblems.length ? `, ${res.drawProblems.join("; ")}` : ""}`);
        }
        if (changed) c.problems.push(`${tag}: the failed decrypt changed the ratchet state`);
      } else {
        const pt = c.draws(tag, withDraws(generated, () => ch.receive(msg)));
        c.eq(`${tag} plaintext`, pt, unhex(e.plaintext));
      }
    } else {
      throw new Error(`event ${e.i}: unknown op ${e.op}`);
    }
    if (generated.length) {
      c.eq(`${tag} DH private after`, ch.ratchet.getState().dhSelfPrivate, generated[generated.length - 1][1]);
    }
    if (e.state_after) checkState(c, `${tag} state_after`, ch, e.state_after);
  }
  c.facts[0] = `${encrypts} encrypts, ${decrypts} decrypts, ${c.facts[0]}`;
}

// ── files ───────────────────────────────────────────────────────────────
function collect(path, out) {
  const st = statSync(path);
  if (st.isDirectory()) {
    for (const entry of readdirSync(path).sort()) {
      const p = join(path, entry);
      if (statSync(p).isDirectory() || entry.endsWith(".json")) collect(p, out);
    }
  } else {
    out.push(resolve(path));
  }
}

const fileCache = new Map();
function load(path) {
  if (!fileCache.has(path)) fileCache.set(path, JSON.parse(readFileSync(path, "utf8")));
  return fileCache.get(path);
}

// The x3dh case named `name` in an x3dh file of the same directory and kdf.
function findX3dh(ratchetPath, kdf, name) {
  const dir = dirname(ratchetPath);
  for (const entry of readdirSync(dir).sort()) {
    if (!entry.endsWith(".json")) continue;
    let doc;
    try {
      doc = load(join(dir, entry));
    } catch {
      continue;
    }
    if (doc.schema !== "agentmesh-golden/1" || doc.kind !== "x3dh" || doc.kdf !== kdf) continue;
    const found = (doc.cases ?? []).find((cs) => cs.name === name);
    if (found) return { x: found, file: entry };
  }
  return null;
}

const args = process.argv.slice(2);
if (args.length === 0) {
  console.error("usage: node crosscheck_legacy.mjs PATH...");
  process.exit(2);
}
const files = [];
for (const a of args) collect(a, files);

let passed = 0;
let failed = 0;
let skipped = 0;
const cwd = process.cwd();
console.log(`# @microsoft/agent-governance-sdk ${SDK_VERSION} (node ${process.versions.node})`);
for (const file of files) {
  const rel = relative(cwd, file) || file;
  let doc;
  try {
    doc = load(file);
  } catch (e) {
    console.log(`FAIL ${rel}: cannot read: ${e.message}`);
    failed++;
    continue;
  }
  if (doc.schema !== "agentmesh-golden/1") {
    console.log(`SKIP ${rel}: not agentmesh-golden/1`);
    skipped++;
    continue;
  }
  for (const cs of doc.cases ?? []) {
    const label = `${rel} ${doc.kind}/${cs.name}`;
    if (doc.kind !== "x3dh" && doc.kind !== "ratchet") {
      console.log(`SKIP ${label}: kind ${doc.kind} is not replayed`);
      skipped++;
      continue;
    }
    if (doc.kdf !== LEGACY) {
      console.log(`SKIP ${label}: kdf ${doc.kdf ?? "(none)"}, only ${LEGACY} is replayed`);
      skipped++;
      continue;
    }
    const c = new Case();
    try {
      if (doc.kind === "x3dh") {
        checkX3dhCase(c, cs);
      } else {
        const found = findX3dh(file, doc.kdf, cs.from_x3dh);
        if (!found) throw new Error(`from_x3dh ${cs.from_x3dh}: no x3dh case of that name with kdf ${doc.kdf} beside the file`);
        checkRatchetCase(c, cs, found.x);
        c.facts[0] += ` (${found.file})`;
      }
    } catch (e) {
      c.problems.push(e.message);
    }
    if (c.problems.length === 0) {
      console.log(`PASS ${label}: ${c.facts.join("; ")}`);
      passed++;
    } else {
      console.log(`FAIL ${label}: ${c.problems.length} mismatch(es)`);
      for (const p of c.problems.slice(0, 10)) console.log(`    ${p}`);
      if (c.problems.length > 10) console.log(`    ... ${c.problems.length - 10} more`);
      for (const f of c.facts) console.log(`    note: ${f}`);
      failed++;
    }
  }
}
console.log(`${passed} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
process.exit(failed === 0 && passed > 0 ? 0 : 1);
