#!/usr/bin/env bash
# Node <-> Node self-test of the @microsoft/agent-governance-sdk 4.0.0 peer.
#
#   interop/node/selftest.sh            # against the AGT 5.0.0 relay + registry (default)
#   interop/node/selftest.sh meshwire   # against `meshwire serve --allow-unauthenticated-did`
#
# Starts the servers on free local ports, runs selftest.mjs (three peers:
# KNOCK + messages both ways, offline delivery, send while disconnected),
# stops the servers, and exits non-zero when a check failed.
# Needs node >= 20 and npm; the AGT mode needs python3 (the venv is created
# by interop/python/setup_venv.sh if missing), the meshwire mode cargo.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mode="${1:-agt}"

if [ ! -d "$here/node_modules/@microsoft/agent-governance-sdk" ]; then
    (cd "$here" && npm ci --no-audit --no-fund >&2)
fi

logs="$(mktemp -d "${TMPDIR:-/tmp}/meshwire-node-selftest.XXXXXX")"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

free_port() {
    node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

wait_http() { # url
    node -e '
const url = process.argv[1];
const deadline = Date.now() + 60000;
(async () => {
  for (;;) {
    try { const r = await fetch(url); if (r.ok) return; } catch {}
    if (Date.now() > deadline) { console.error(`no answer from ${url}`); process.exit(1); }
    await new Promise((r) => setTimeout(r, 200));
  }
})();' "$1"
}

case "$mode" in
agt)
    venv="$(bash "$repo/interop/python/setup_venv.sh")"
    relay_port="$(free_port)"
    registry_port="$(free_port)"
    AGENTMESH_RELAY_ALLOW_UNAUTHED_DID=1 "$venv/bin/python" -m agentmesh.relay \
        --host 127.0.0.1 --port "$relay_port" >"$logs/relay.log" 2>&1 &
    pids+=($!)
    "$venv/bin/python" -m agentmesh.registry \
        --host 127.0.0.1 --port "$registry_port" >"$logs/registry.log" 2>&1 &
    pids+=($!)
    relay="ws://127.0.0.1:$relay_port"
    registry="http://127.0.0.1:$registry_port"
    wait_http "http://127.0.0.1:$relay_port/health"
    wait_http "$registry/health"
    ;;
meshwire)
    (cd "$repo" && cargo build -q -p meshwire-cli >&2)
    bin="${CARGO_TARGET_DIR:-$repo/target}/debug/meshwire"
    port="$(free_port)"
    "$bin" serve --listen "127.0.0.1:$port" --allow-unauthenticated-did >"$logs/meshwire.log" 2>&1 &
    pids+=($!)
    relay="ws://127.0.0.1:$port"
    registry="http://127.0.0.1:$port"
    wait_http "http://127.0.0.1:$port/health"
    ;;
*)
    echo "usage: $0 [agt|meshwire]" >&2
    exit 2
    ;;
esac

echo "# mode $mode: relay $relay, registry $registry (server logs, kept on failure: $logs)"
status=0
node "$here/selftest.mjs" --relay "$relay" --registry "$registry" || status=$?
if [ "$status" -ne 0 ]; then
    for f in "$logs"/*.log; do
        echo "--- tail of $f" >&2
        tail -n 30 "$f" >&2
    done
else
    rm -rf "$logs"
fi
exit "$status"
