#!/usr/bin/env bash
# A two-instance meshwire cluster on one nats-server, from the shell, as an
# operator would run it: nats-server with JetStream on loopback (stopped by
# PID), two `meshwire serve --nats` instances, and two CLI agents on
# different instances. Bob listens on instance 2; Alice sends through
# instance 1; the message must reach Bob live, across the instances.
#
#   bash interop/cluster_smoke.sh [MESHWIRE_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/debug/meshwire}"
nats_bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
if [ ! -x "$nats_bin" ]; then
  echo "SKIPPED cluster smoke: no nats-server (apt-get install nats-server)"
  exit 0
fi
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
[ -n "${KEEP_SMOKE:-}" ] && trap - EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 100); do
    if python3 -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "not ready: $1" >&2
  return 1
}

nats_port="$(free_port)"
"$nats_bin" -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port" >"$work/nats.log" 2>&1 &
pids+=($!)
echo "nats-server $("$nats_bin" --version) on 127.0.0.1:$nats_port (pid ${pids[0]}), JetStream in $work/nats"

ports=()
for i in 1 2; do
  port="$(free_port)"
  ports+=("$port")
  "$bin" serve --listen "127.0.0.1:$port" --nats "nats://127.0.0.1:$nats_port" >"$work/serve$i.log" 2>&1 &
  pids+=($!)
done
for port in "${ports[@]}"; do wait_http "http://127.0.0.1:${ports[0]}/readyz" && wait_http "http://127.0.0.1:$port/readyz"; done
echo "meshwire serve --nats on 127.0.0.1:${ports[0]} and 127.0.0.1:${ports[1]}"

agent() { # NAME PORT ARGS...
  local name="$1" port="$2"; shift 2
  mkdir -p "$work/$name"
  "$bin" "$@" --name "$name" --identity "$work/$name/identity.json" --state "$work/$name/state" \
    --relay "ws://127.0.0.1:$port/ws" --registry "http://127.0.0.1:$port"
}

# Bob, on instance 2, prints one message and exits.
agent bob "${ports[1]}" listen --json --count 1 >"$work/bob.out" 2>"$work/bob.err" &
bob=$!
pids+=($bob)
for _ in $(seq 1 100); do
  if agent probe "${ports[0]}" find bob >/dev/null 2>&1; then break; fi
  sleep 0.1
done
text="hello across instances $$"
agent alice "${ports[0]}" send --to bob --wait-receipt "$text"
for _ in $(seq 1 100); do
  if ! kill -0 "$bob" 2>/dev/null; then break; fi
  sleep 0.1
done
if ! grep -q "\"text\":\"$text\"" "$work/bob.out"; then
  echo "FAILED: bob did not print the message" >&2
  cat "$work/bob.out" "$work/bob.err" "$work"/serve*.log >&2
  exit 1
fi
echo "bob (instance 2) got alice's message (instance 1), with an end-to-end receipt: $(cat "$work/bob.out")"
