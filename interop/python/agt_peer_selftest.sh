#!/usr/bin/env bash
# Self-test of interop/python/agt_peer.py (the AGT Python peer).
#
#   interop/python/agt_peer_selftest.sh                       # AGT reference relay + registry, started here
#   interop/python/agt_peer_selftest.sh --server meshwire     # `meshwire serve` (cargo run), started here
#   interop/python/agt_peer_selftest.sh --relay ws://H:P --registry http://H:P   # servers already running
#
# The same can be given as AGT_SELFTEST_SERVER / AGT_SELFTEST_RELAY /
# AGT_SELFTEST_REGISTRY. Steps:
#   1. frames: offline, replays the TypeScript capture
#      /work/shared/vectors/ts-main/mesh-session.json (AGT_SELFTEST_VECTOR;
#      skipped when absent) through the peer's code with the recorded
#      randomness, ids and clock, and requires byte-identical frames.
#   2. live: two agt_peer.py processes driven over the line protocol: connect
#      both; A sends 20 messages to B; B replies 20; B disconnects, A sends 5,
#      B reconnects and gets them from the relay's store; no duplicates.
# Exits non-zero on any mismatch. Logs of servers and peers: $AGT_SELFTEST_LOGS
# (default: a temporary directory, kept on failure).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
server="${AGT_SELFTEST_SERVER:-agt}"
relay="${AGT_SELFTEST_RELAY:-}"
registry="${AGT_SELFTEST_REGISTRY:-}"
vector="${AGT_SELFTEST_VECTOR:-/work/shared/vectors/ts-main/mesh-session.json}"

while [ $# -gt 0 ]; do
    case "$1" in
        --server) server="$2"; shift 2 ;;
        --relay) relay="$2"; shift 2 ;;
        --registry) registry="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if { [ -n "$relay" ] && [ -z "$registry" ]; } || { [ -z "$relay" ] && [ -n "$registry" ]; }; then
    echo "give both --relay and --registry" >&2
    exit 2
fi

venv="$(bash "$here/setup_venv.sh")"
py="$venv/bin/python"
logs="${AGT_SELFTEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/agt-peer-selftest.XXXXXX")}"
mkdir -p "$logs"
pids=()
ok=0
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$ok" = 1 ] && [ -z "${AGT_SELFTEST_LOGS:-}" ]; then
        rm -rf "$logs"
    else
        echo "logs kept in $logs" >&2
    fi
}
trap cleanup EXIT

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() {  # url seconds
    local deadline=$((SECONDS + $2))
    until "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            echo "server at $1 did not come up" >&2
            return 1
        fi
        sleep 0.2
    done
}

echo "== step 1: frames against the TypeScript capture" >&2
if [ -f "$vector" ]; then
    AGT_PEER_LOG=warning "$py" - "$here/agt_peer.py" "$vector" <<'PY'
import asyncio, importlib.util, json, secrets, sys, uuid

spec = importlib.util.spec_from_file_location("agt_peer", sys.argv[1])
peer_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_mod)
from agentmesh.encryption.x3dh import OneTimePreKey, SignedPreKey, X25519KeyPair

case = json.load(open(sys.argv[2]))["cases"][0]
failures = []

def check(what, got, want):
    if got != want:
        failures.append(what)
        print(f"FAIL {what}\n  got  {got}\n  want {want}", file=sys.stderr)

# Recorded clock, ids and randomness.
peer_mod.iso_now = lambda: case["fixed_time"]
ids = iter(case["uuids"])
peer_mod.uuid.uuid4 = lambda: uuid.UUID(next(ids))
draws = [r for r in case["random_inputs"] if not r["role"].endswith(("/spk",)) and "/otk" not in r["role"]]
draw_iter = iter(draws)
def token_bytes(n):
    r = next(draw_iter)
    value = bytes.fromhex(r["value"])
    assert len(value) == n, (r["role"], n)
    return value
secrets.token_bytes = token_bytes

frames = {f["seq"]: f for f in case["frames"]}
http_log = {(r["client"], r["method"]): r for r in case["http_requests"]}

def make(party):
    p = case[party]
    me = peer_mod.Identity(bytes.fromhex(p["ed25519_seed"]))
    assert me.did == p["did"]
    km = me.km
    km.signed_pre_key = SignedPreKey(
        key_pair=X25519KeyPair(bytes.fromhex(p["spk_private"]), bytes.fromhex(p["spk_public"])),
        signature=bytes.fromhex(p["spk_signature"]), key_id=p["spk_id"])
    km.one_time_pre_keys = {
        o["key_id"]: OneTimePreKey(X25519KeyPair(bytes.fromhex(o["private"]), bytes.fromhex(o["public"])), o["key_id"])
        for o in p["otks"]}
    peer = peer_mod.Peer()
    peer.me, peer.registry, peer.name = me, case["registry_url"], party
    return peer

def take(peer):
    out = list(peer.outbox)
    peer.outbox.clear()
    return out

async def run():
    alice, bob = make("alice"), make("bob")
    me = alice.me
    # Registry requests: body (with our capabilities/metadata) and Authorization.
    sent = []
    def fake_http(method, url, body, headers):
        sent.append((method, url, body, headers))
        if method == "GET":
            return 200, http_log[("alice", "GET")]["response_body_json"]
        return 201, "{}"
    peer_mod.http = fake_http
    alice._register(me)
    want = http_log[("alice", "POST")]
    check("POST /v1/agents body", sent[0][2], want["body_json"].replace(
        '"capabilities":[],"metadata":{}',
        '"capabilities":["alice"],"metadata":{"display_name":"alice","agentmesh_kdf":"spec"}'))
    check("POST /v1/agents url", sent[0][1], want["url"])
    check("Authorization header", sent[0][3]["authorization"], want["headers"]["authorization"])
    alice._upload_prekeys(me)
    want = http_log[("alice", "PUT")]
    check("PUT prekeys url", sent[1][1], want["url"])
    check("PUT prekeys body", sent[1][2], want["body_json"])
    # Connect frame as _connection_loop builds it.
    ts = peer_mod.iso_now()
    connect = peer_mod.frame_text(v=1, type="connect", **{"from": me.did}, public_key=peer_mod.b64std(me.public),
                                  timestamp=ts, signature=peer_mod.b64std(me.sign(ts.encode())))
    check("connect frame", connect, frames[0]["frame_json"])
    check("fetch_pending frame", peer_mod.frame_text(v=1, type="fetch_pending", **{"from": me.did}), frames[1]["frame_json"])

    # Alice opens the session and sends two messages.
    r1 = await alice.cmd_send({"to": bob.me.did, "payload": {"text": "hello bob"}})
    r2 = await alice.cmd_send({"to": bob.me.did, "payload": {"n": 1, "items": [1, 2, 3], "unicode": "✓ 🚀"}})
    check("GET prekeys url", sent[2][1], http_log[("alice", "GET")]["url"])
    out = take(alice)
    check("alice knock + messages", out, [frames[i]["frame_json"] for i in (4, 5, 6)])
    # Bob takes them as the AGT relay would deliver them (json.dumps re-serialized).
    for i in (4, 5, 6):
        bob.on_text(json.dumps(json.loads(frames[i]["frame_json"])), 1)
    out = take(bob)
    extra_ack = peer_mod.frame_text(v=1, type="ack", id=case["uuids"][0])
    if extra_ack in out:
        out.remove(extra_ack)  # ours: the knock is acked, TypeScript does not
    check("bob knock_accept + acks", out, [frames[i]["frame_json"] for i in (7, 8, 9)])
    got = [js for js in (peer_mod.js_json(m["payload"]) for m in bob.inbox)]
    check("bob received", got, [r["payload_json"] for r in case["received"] if r["receiver"] == "bob"])
    await bob.cmd_send({"to": alice.me.did, "payload": {"reply": "hi alice"}})
    out = take(bob)
    check("bob reply", out, [frames[10]["frame_json"]])
    alice.on_text(frames[7]["frame_json"], 2)
    alice.on_text(json.dumps(json.loads(frames[10]["frame_json"])), 3)
    out = take(alice)
    extra_ack = peer_mod.frame_text(v=1, type="ack", id=case["uuids"][3])
    if extra_ack in out:
        out.remove(extra_ack)  # ours: the knock_accept is acked
    check("alice ack", out, [frames[11]["frame_json"]])
    check("alice received", [peer_mod.js_json(m["payload"]) for m in alice.inbox],
          [r["payload_json"] for r in case["received"] if r["receiver"] == "alice"])
    check("randomness used up", next(draw_iter, None), None)

asyncio.run(run())
if failures:
    print(f"frames: {len(failures)} mismatches", file=sys.stderr)
    sys.exit(1)
print("frames: PASS (connect, fetch_pending, registry bodies and Authorization, knock, message, knock_accept, ack byte-identical to the TypeScript capture)", file=sys.stderr)
PY
else
    echo "frames: SKIP ($vector not found)" >&2
fi

echo "== step 2: live, two peers" >&2
if [ -n "$relay" ]; then
    server="external"
else
    case "$server" in
        agt)
            rport="$(free_port)"
            gport="$(free_port)"
            "$py" -m agentmesh.relay --port "$rport" --log-level warning >"$logs/agt-relay.log" 2>&1 &
            pids+=($!)
            "$py" -m agentmesh.registry --port "$gport" --log-level warning >"$logs/agt-registry.log" 2>&1 &
            pids+=($!)
            relay="ws://127.0.0.1:$rport"
            registry="http://127.0.0.1:$gport"
            wait_http "http://127.0.0.1:$rport/health" 30
            wait_http "http://127.0.0.1:$gport/health" 30
            ;;
        meshwire)
            (cd "$repo" && cargo build -q -p meshwire-cli) >&2
            bin="${CARGO_TARGET_DIR:-$repo/target}/debug/meshwire"
            port="$(free_port)"
            "$bin" serve --listen "127.0.0.1:$port" >"$logs/meshwire-serve.log" 2>&1 &
            pids+=($!)
            relay="ws://127.0.0.1:$port"
            registry="http://127.0.0.1:$port"
            wait_http "http://127.0.0.1:$port/health" 60
            ;;
        *) echo "unknown server $server (agt or meshwire)" >&2; exit 2 ;;
    esac
fi
echo "relay $relay, registry $registry (server: ${server})" >&2

"$py" - "$py" "$here/agt_peer.py" "$relay" "$registry" "$logs" <<'PY'
import json, os, queue, subprocess, sys, threading, time

py, peer_script, relay, registry, logs = sys.argv[1:6]

class Peer:
    def __init__(self, name):
        self.name = name
        self.log = open(os.path.join(logs, f"peer-{name}.log"), "wb")
        self.proc = subprocess.Popen([py, peer_script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def call(self, timeout=60, **req):
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise SystemExit(f"{self.name}: peer exited")
        resp = json.loads(line)
        if not resp.get("ok"):
            raise SystemExit(f"{self.name}: {req['cmd']} failed: {resp.get('error')}")
        return resp

    def stop(self):
        self.proc.stdin.close()
        try:
            extra = self.proc.stdout.read()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise SystemExit(f"{self.name}: did not exit after stdin closed")
        return self.proc.returncode

def payloads(tag, count):
    base = [
        {"text": "hello", "tag": tag},
        {"unicode": "✓ 🚀 ünïcödé 中文 \u2028 line sep \u2029 para sep", "tag": tag},
        {"nested": {"a": [1, 2, {"b": [None, True, False, {"c": "deep"}]}], "empty": {}, "list": []}},
        {"big": "x" * 65536 + "✓"},
        {"numbers": [0, -1, 1.5, 1e21, 1e-7, 2**53 + 1, 12345678901234567890, -0.5]},
        {"escapes": "quote \" backslash \\ tab \t newline \n nul \u0000 del \u007f"},
        {"lone_surrogate": "\ud800"},
        ["array", "top", "level"],
        "a bare string",
        42,
        None,
        {"10": "index keys", "2": "first", "z": "last"},
    ]
    out = []
    for i in range(count):
        p = base[i % len(base)]
        out.append({"i": i, "tag": tag, "body": p} if i >= len(base) else p)
    return out

def expect(receiver, sender, sent, timeout_ms=30000):
    got = receiver.call(cmd="recv", count=len(sent), timeout_ms=timeout_ms, timeout=timeout_ms / 1000 + 30)["messages"]
    ok = True
    if len(got) != len(sent):
        print(f"FAIL {receiver.name}: got {len(got)} of {len(sent)} messages", file=sys.stderr)
        ok = False
    for k, ((mid, payload), m) in enumerate(zip(sent, got)):
        if m["from"] != sender.did or m["id"] != mid or m["payload"] != payload or not isinstance(m.get("t_us"), int):
            print(f"FAIL {receiver.name} message {k}: got {json.dumps(m)[:300]} want id {mid} payload {json.dumps(payload)[:300]}",
                  file=sys.stderr)
            ok = False
    if not ok:
        raise SystemExit(1)
    print(f"  {receiver.name} received {len(got)} from {sender.name}, in order and equal", file=sys.stderr)

a, b = Peer("a"), Peer("b")
try:
    for p in (a, b):
        hello = p.call(cmd="hello")
        assert hello["runtime"] == "agentmesh-python 5.0.0 (meshwire interop peer)", hello
        assert hello["features"] == [], hello
        p.did = p.call(cmd="connect", relay=relay, registry=registry, name=f"selftest-{p.name}",
                       seed=os.urandom(32).hex())["did"]
        print(f"  {p.name} connected as {p.did}", file=sys.stderr)

    sent = [(a.call(cmd="send", to=b.did, payload=pl)["id"], pl) for pl in payloads("a->b", 20)]
    expect(b, a, sent)
    sent = [(b.call(cmd="send", to=a.did, payload=pl)["id"], pl) for pl in payloads("b->a", 20)]
    expect(a, b, sent)

    b.call(cmd="disconnect")
    sent = [(a.call(cmd="send", to=b.did, payload=pl)["id"], pl) for pl in payloads("offline", 5)]
    time.sleep(1.0)  # let them reach the relay's store while B is away
    leak = b.call(cmd="drain")["messages"]
    if leak:
        raise SystemExit(f"FAIL b got {len(leak)} messages while disconnected")
    b.call(cmd="reconnect")
    expect(b, a, sent)
    time.sleep(1.5)
    dup = b.call(cmd="drain")["messages"] + a.call(cmd="drain")["messages"]
    if dup:
        raise SystemExit(f"FAIL unexpected extra messages (duplicates?): {json.dumps(dup)[:300]}")
    print("  no duplicates after reconnect", file=sys.stderr)
    sent = [(b.call(cmd="send", to=a.did, payload=pl)["id"], pl) for pl in payloads("after", 3)]
    expect(a, b, sent)

    for p in (a, b):
        p.call(cmd="close")
finally:
    codes = [p.stop() for p in (a, b)]
if any(codes):
    raise SystemExit(f"FAIL peer exit codes {codes}")
print("live: PASS", file=sys.stderr)
PY
ok=1
echo "agt_peer self-test: PASS (server: $server, relay $relay, registry $registry)" >&2
