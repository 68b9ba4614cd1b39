// Drives Node peers (peer.mjs) over the interop line protocol against a
// running relay + registry and checks Node <-> Node messaging:
// KNOCK + messages both ways, offline delivery (to a peer that has a session
// and to a peer contacted for the first time while offline), and `send` while
// disconnected reporting ok:false.
//
//   node selftest.mjs --relay ws://127.0.0.1:P --registry http://127.0.0.1:Q
//
// Exit status 0 when every check passed.

import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { isDeepStrictEqual } from "node:util";

const args = process.argv.slice(2);
const opt = (name) => {
  const i = args.indexOf(name);
  if (i < 0 || i + 1 >= args.length) throw new Error(`missing ${name}`);
  return args[i + 1];
};
const relay = opt("--relay");
const registry = opt("--registry");
const peerPath = fileURLToPath(new URL("./peer.mjs", import.meta.url));
const run = `${process.pid}-${Date.now()}`; // fresh identities per run

class PeerProc {
  constructor(name) {
    this.name = name;
    this.proc = spawn(process.execPath, [peerPath], { stdio: ["pipe", "pipe", "pipe"] });
    this.lines = createInterface({ input: this.proc.stdout });
    this.queue = [];
    this.lines.on("line", (l) => this.queue.shift()?.(l));
    createInterface({ input: this.proc.stderr }).on("line", (l) => {
      if (process.env.SELFTEST_VERBOSE) console.error(`  [${name}] ${l}`);
    });
  }
  request(obj, timeoutMs = 30_000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no response to ${obj.cmd}`)), timeoutMs);
      this.queue.push((line) => {
        clearTimeout(timer);
        resolve(JSON.parse(line));
      });
      this.proc.stdin.write(JSON.stringify(obj) + "\n");
    });
  }
  async ok(obj, timeoutMs) {
    const r = await this.request(obj, timeoutMs);
    if (!r.ok) throw new Error(`${this.name} ${obj.cmd}: ${r.error}`);
    return r;
  }
  end() {
    this.proc.stdin.end();
    return new Promise((r) => this.proc.on("exit", r));
  }
}

let failures = 0;
function check(what, cond, detail = "") {
  const show = detail && (!cond || detail.length <= 100);
  console.log(`${cond ? "ok  " : "FAIL"} ${what}${show ? ` (${detail})` : ""}`);
  if (!cond) failures++;
}

const seed = (name) => createHash("sha256").update(`meshwire-node-selftest/${run}/${name}`).digest("hex");

async function expectMessages(peer, from, sentIds, payloads, timeoutMs = 10_000) {
  const r = await peer.ok({ cmd: "recv", count: payloads.length, timeout_ms: timeoutMs }, timeoutMs + 5000);
  const got = r.messages;
  const good =
    got.length === payloads.length &&
    got.every((m, i) => m.from === from && m.id === sentIds[i] && isDeepStrictEqual(m.payload, payloads[i]) && Number.isInteger(m.t_us));
  return { good, got };
}

const peers = [];
try {
  const a = new PeerProc("a");
  const b = new PeerProc("b");
  const c = new PeerProc("c");
  peers.push(a, b, c);

  const hello = await a.ok({ cmd: "hello" });
  check("hello", typeof hello.runtime === "string" && Array.isArray(hello.features), hello.runtime);

  const connect = (p) => p.ok({ cmd: "connect", relay, registry, name: `node-selftest-${p.name}`, seed: seed(p.name) });
  const aDid = (await connect(a)).did;
  const bDid = (await connect(b)).did;
  const cDid = (await connect(c)).did;
  check("connect a, b, c", [aDid, bDid, cDid].every((d) => /^did:mesh:[0-9a-f]{32}$/.test(d)), `${aDid} ${bDid} ${cDid}`);

  // a -> b: session set-up (bundle fetch, X3DH, KNOCK) + two messages.
  const p1 = [{ text: "hello b" }, { n: 1, items: [1, 2, 3], unicode: "✓ 🚀", nested: { ok: true, none: null } }];
  const ids1 = [];
  for (const payload of p1) ids1.push((await a.ok({ cmd: "send", to: bDid, payload })).id);
  let r = await expectMessages(b, aDid, ids1, p1);
  check("a -> b: KNOCK + 2 messages", r.good, JSON.stringify(r.got).slice(0, 300));

  // b -> a on the responder side of the session; a -> b again (ratchet steps).
  const p2 = [{ reply: "hi a" }, "a string payload", 42, null, [1, "two"]];
  const ids2 = [];
  for (const payload of p2) ids2.push((await b.ok({ cmd: "send", to: aDid, payload })).id);
  r = await expectMessages(a, bDid, ids2, p2);
  check("b -> a: 5 messages (string, number, null, array payloads)", r.good, JSON.stringify(r.got).slice(0, 300));
  const big = { blob: "x".repeat(64 * 1024) };
  const bigId = (await a.ok({ cmd: "send", to: bDid, payload: big })).id;
  r = await expectMessages(b, aDid, [bigId], [big]);
  check("a -> b: 64 KiB payload after a DH ratchet step", r.good);

  // Offline delivery to a peer with a session.
  await b.ok({ cmd: "disconnect" });
  const p3 = [{ offline: 1 }, { offline: 2 }];
  const ids3 = [];
  for (const payload of p3) ids3.push((await a.ok({ cmd: "send", to: bDid, payload })).id);
  r = await b.ok({ cmd: "drain" });
  check("b receives nothing while disconnected", r.messages.length === 0);
  await b.ok({ cmd: "reconnect" });
  r = await expectMessages(b, aDid, ids3, p3);
  check("offline delivery a -> b on reconnect", r.good, JSON.stringify(r.got).slice(0, 300));

  // First contact while the addressee is offline: KNOCK and message are stored.
  await c.ok({ cmd: "disconnect" });
  const p4 = [{ first: "contact while offline" }];
  const ids4 = [(await a.ok({ cmd: "send", to: cDid, payload: p4[0] })).id];
  await c.ok({ cmd: "reconnect" });
  r = await expectMessages(c, aDid, ids4, p4);
  check("offline first contact a -> c (stored KNOCK + message)", r.good, JSON.stringify(r.got).slice(0, 300));
  const p5 = [{ from: "c" }];
  const ids5 = [(await c.ok({ cmd: "send", to: aDid, payload: p5[0] })).id];
  r = await expectMessages(a, cDid, ids5, p5);
  check("c -> a reply", r.good, JSON.stringify(r.got).slice(0, 300));

  // send while disconnected: 4.0.0 cannot queue, the peer must say so.
  await a.ok({ cmd: "disconnect" });
  const refused = await a.request({ cmd: "send", to: bDid, payload: { lost: true } });
  check("send while disconnected reports ok:false", refused.ok === false, refused.error);
  await a.ok({ cmd: "reconnect" });
  const p6 = [{ after: "reconnect" }];
  const ids6 = [(await a.ok({ cmd: "send", to: bDid, payload: p6[0] })).id];
  r = await expectMessages(b, aDid, ids6, p6);
  check("a -> b after a's reconnect", r.good, JSON.stringify(r.got).slice(0, 300));
  const ids7 = [(await b.ok({ cmd: "send", to: aDid, payload: { last: true } })).id];
  r = await expectMessages(a, bDid, ids7, [{ last: true }]);
  check("b -> a after a's reconnect", r.good, JSON.stringify(r.got).slice(0, 300));

  // Integers beyond 2^53: informational (4.0.0 hands the receiver a parsed
  // JS value, so the receiver cannot keep the digits).
  const line = `{"cmd":"send","to":"${bDid}","payload":{"big":12345678901234567891}}\n`;
  const bigReply = await new Promise((resolve) => {
    a.queue.push((l) => resolve(JSON.parse(l)));
    a.proc.stdin.write(line);
  });
  if (bigReply.ok) {
    const got = await b.ok({ cmd: "recv", count: 1, timeout_ms: 5000 });
    const text = JSON.stringify(got.messages[0]?.payload);
    console.log(`info integer beyond 2^53 sent as 12345678901234567891, receiver reports ${text}`);
  }

  for (const p of [a, b, c]) await p.ok({ cmd: "close" });
} catch (e) {
  console.log(`FAIL ${e.message}`);
  failures++;
} finally {
  await Promise.all(peers.map((p) => p.end()));
}
console.log(failures === 0 ? "selftest passed" : `selftest FAILED (${failures})`);
process.exit(failures === 0 ? 0 : 1);
