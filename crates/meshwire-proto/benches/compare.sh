#!/usr/bin/env bash
# Compare meshwire's secure channel with the Python reference (agentmesh 5.0.0),
# for both crypto providers, in one run:
#
#   1. interop/python/bench_reference.py in the venv of interop/python/setup_venv.sh;
#   2. cargo bench -p meshwire-proto --bench channel, default provider (RustCrypto);
#   3. the same with --features aws-lc-rs;
#      the Python benchmark runs again after each cargo bench, and the report
#      takes each Python metric's best run (so a busy machine during one run
#      does not flatter the Rust ratios);
#   4. a markdown report from criterion's estimates (mean point estimates),
#      printed and written to $CARGO_TARGET_DIR/compare.md.
#
# Usage: crates/meshwire-proto/benches/compare.sh [criterion options...]
#   default criterion options: --warm-up-time 1 --measurement-time 3
# Environment:
#   CARGO_TARGET_DIR   default <repo>/target/bench (so the main target dir stays unlocked)
#   PY_SECONDS         timed seconds per Python benchmark (default 3)
#   SKIP_PYTHON=1      reuse $CARGO_TARGET_DIR/python-bench.jsonl from an earlier run
#   SKIP_RUST=1        only re-tabulate the existing criterion results
#   PROVIDERS          default "rustcrypto aws-lc-rs"
#   BENCH_NICE         if set (e.g. -10, needs root for < 0), run the measurements under
#                      `nice -n $BENCH_NICE`; builds always run at normal priority
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/bench}"
mkdir -p "$CARGO_TARGET_DIR"
criterion_dir="$CARGO_TARGET_DIR/criterion"
py_json="$CARGO_TARGET_DIR/python-bench.jsonl"
report="$CARGO_TARGET_DIR/compare.md"
providers="${PROVIDERS:-rustcrypto aws-lc-rs}"
if [ "$#" -gt 0 ]; then crit_args=("$@"); else crit_args=(--warm-up-time 1 --measurement-time 3); fi

log() { printf '== %s\n' "$*" >&2; }
nice_cmd=()
if [ -n "${BENCH_NICE:-}" ]; then nice_cmd=(nice -n "$BENCH_NICE"); fi

load_start="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"

run_python() {
    [ "${SKIP_PYTHON:-0}" = 1 ] && return 0
    log "Python reference benchmark (agentmesh 5.0.0)"
    "${nice_cmd[@]}" "$venv/bin/python" interop/python/bench_reference.py --seconds "${PY_SECONDS:-3}" \
        | tee -a "$py_json" >&2
}
if [ "${SKIP_PYTHON:-0}" != 1 ]; then
    venv="$(bash interop/python/setup_venv.sh)"
    : > "$py_json"
fi
run_python

if [ "${SKIP_RUST:-0}" != 1 ]; then
    for provider in $providers; do
        # Drop this provider's old results so a renamed or removed benchmark
        # cannot leave a stale estimate behind.
        for group in handshake message pingpong primitive; do
            rm -rf "${criterion_dir:?}/$group/$provider"
        done
        case "$provider" in
            rustcrypto) features=() ;;
            aws-lc-rs) features=(--features aws-lc-rs) ;;
            *) echo "compare.sh: unknown provider $provider" >&2; exit 2 ;;
        esac
        log "cargo bench -p meshwire-proto --bench channel ${features[*]} -- ${crit_args[*]}"
        cargo bench -p meshwire-proto --bench channel "${features[@]}" --no-run >&2
        "${nice_cmd[@]}" cargo bench -p meshwire-proto --bench channel "${features[@]}" -- "${crit_args[@]}" >&2
        run_python
    done
fi

load_end="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
export COMPARE_ENV="$(nproc) x ${cpu:-unknown CPU}; $(rustc --version); criterion args: ${crit_args[*]}${BENCH_NICE:+; nice $BENCH_NICE}; load average at start $load_start, at end $load_end"

log "report: $report"
python3 - "$criterion_dir" "$py_json" "$report" "$providers" <<'PY'
import json
import os
import sys

criterion_dir, py_json, report_path, providers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()

# full_id -> mean point estimate (ns per iteration), from every new/ result.
mean_ns = {}
for root, _dirs, files in os.walk(criterion_dir):
    if os.path.basename(root) != "new" or "benchmark.json" not in files or "estimates.json" not in files:
        continue
    with open(os.path.join(root, "benchmark.json")) as f:
        full_id = json.load(f)["full_id"]
    with open(os.path.join(root, "estimates.json")) as f:
        mean_ns[full_id] = json.load(f)["mean"]["point_estimate"]

py_runs = []
try:
    with open(py_json) as f:
        py_runs = [json.loads(line) for line in f if line.strip()]
except (OSError, ValueError):
    pass
# Best run per metric (highest rate).
py = {}
for run in py_runs:
    for k, v in run.items():
        py[k] = max(py[k], v) if isinstance(v, (int, float)) and k in py else v

def ns(op, p):
    return mean_ns.get(op.replace("{p}", p))

def rate(t):
    return None if t is None else 1e9 / t

def fmt_rate(r):
    if r is None:
        return "n/a"
    return f"{r:,.0f}" if r >= 100 else f"{r:,.1f}"

def fmt_ns(t):
    if t is None:
        return "n/a"
    if t >= 1e6:
        return f"{t / 1e6:,.2f} ms"
    if t >= 1e3:
        return f"{t / 1e3:,.2f} µs"
    return f"{t:,.0f} ns"

def fmt_ratio(a, b):
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.2f}x"

def fmt_mib(t, size):
    return "n/a" if t is None else f"{size / t * 1e9 / 2**20:,.0f} MiB/s"

P = [p for p in ("rustcrypto", "aws-lc-rs") if p in providers] or providers
fast = "aws-lc-rs" if "aws-lc-rs" in P else P[0]
out = []
w = out.append

w("# meshwire-proto vs Python reference (agentmesh)\n")
w(f"Python: {py.get('producer', 'n/a')}, best of {len(py_runs)} run(s) per metric. "
  "Rust: criterion mean point estimates, "
  f"providers {', '.join(P)}. Rates are operations per second "
  "(message rows: one encrypt + one decrypt; ping-pong: messages).\n")
w(f"Environment: {os.environ.get('COMPARE_ENV', 'n/a')}.\n")

ops = [
    ("handshake (X3DH initiate + respond)", "handshake/{p}", "handshakes_per_s", None),
    ("message 64 B", "message/{p}/64", "msg_64_per_s", 64),
    ("message 1 KiB", "message/{p}/1024", "msg_1k_per_s", 1024),
    ("message 64 KiB", "message/{p}/65536", "msg_64k_per_s", 65536),
    ("ping-pong (per message, 64 B)", "pingpong/{p}", "pingpong_per_s", None),
]
header = ["operation"] + [f"{p} ops/s" for p in P] + ["python ops/s"] + [f"ratio {p}/python" for p in reversed(P)]
w("## Protocol operations\n")
w("| " + " | ".join(header) + " |")
w("|" + "---|" * len(header))
for label, op, pykey, size in ops:
    rates = {p: rate(ns(op, p)) for p in P}
    pyr = py.get(pykey)
    row = [label] + [fmt_rate(rates[p]) for p in P] + [fmt_rate(pyr)]
    row += [fmt_ratio(rates[p], pyr) for p in reversed(P)]
    w("| " + " | ".join(row) + " |")
for p in P:
    t = ns("message/{p}/65536", p)
    w(f"\n64 KiB throughput, {p}: {fmt_mib(t, 65536)} (python "
      f"{py['msg_64k_bytes_per_s'] / 2**20:,.0f} MiB/s)." if "msg_64k_bytes_per_s" in py and t else "")
w("")

prims = [
    ("x25519 DH", "x25519"), ("x25519 base (keygen)", "x25519_base"),
    ("Ed25519 verify (incl. key decompression)", "ed25519_verify"),
    ("HMAC chain step (2 HMACs)", "chain_step"), ("HKDF ratchet (64 B out)", "hkdf/64"),
    ("HKDF X3DH (160 B ikm, 32 B out)", "hkdf/x3dh"),
    ("OsRng 12 B (nonce)", "osrng/12"), ("OsRng 32 B (key)", "osrng/32"),
] + [(f"{kind} {size} B", f"{kind}/{size}") for size in (64, 1024, 65536) for kind in ("seal", "open")]
w("## Primitives (time per call)\n")
w("| primitive | " + " | ".join(P) + " |")
w("|---|" + "---|" * len(P))
for label, key in prims:
    w(f"| {label} | " + " | ".join(fmt_ns(ns(f"primitive/{{p}}/{key}", p)) for p in P) + " |")
w("")

def prim(p, key):
    return ns(f"primitive/{{p}}/{key}", p)

def total(p, terms):
    s = 0.0
    for count, key in terms:
        t = prim(p, key)
        if t is None:
            return None
        s += count * t
    return s

# Terms in (count, primitive) form. "core" follows the issue's accounting,
# "+ rest" adds the HKDFs, the RNG draws and the chain steps.
models = [
    ("handshake", "handshake/{p}",
     [(1, "x25519_base"), (8, "x25519"), (1, "ed25519_verify")],
     [(2, "hkdf/x3dh"), (1, "osrng/32")],
     "initiator: 1 base + 4 DH + 1 verify; responder: 4 DH"),
    ("ping-pong message", "pingpong/{p}",
     [(1, "x25519_base"), (2, "x25519"), (2, "hkdf/64"), (2, "chain_step"), (1, "seal/64"), (1, "open/64")],
     [(1, "osrng/12"), (1, "osrng/32")],
     "1 base + 2 DH + 2 HKDF + 2 chain steps + seal + open"),
    ("message 64 B", "message/{p}/64",
     [(2, "chain_step"), (1, "seal/64"), (1, "open/64")], [(1, "osrng/12")],
     "2 chain steps + seal + open"),
    ("message 1 KiB", "message/{p}/1024",
     [(2, "chain_step"), (1, "seal/1024"), (1, "open/1024")], [(1, "osrng/12")],
     "2 chain steps + seal + open"),
    ("message 64 KiB", "message/{p}/65536",
     [(1, "seal/65536"), (1, "open/65536")], [(2, "chain_step"), (1, "osrng/12")],
     "AEAD seal + open only"),
]
w("## Measured vs sum of primitive costs\n")
w("`core` is the issue's accounting; `all` adds the HKDFs / RNG draws / chain steps listed. "
  "Overhead = measured / sum - 1.\n")
w("| operation | provider | core terms | sum core | sum all | measured | overhead vs core | overhead vs all |")
w("|---|---|---|---|---|---|---|---|")
for label, op, core, rest, descr in models:
    for p in P:
        m = ns(op, p)
        sc = total(p, core)
        sa = total(p, core + rest)
        oc = "n/a" if None in (m, sc) else f"{(m / sc - 1) * 100:+.1f}%"
        oa = "n/a" if None in (m, sa) else f"{(m / sa - 1) * 100:+.1f}%"
        w(f"| {label} | {p} | {descr} | {fmt_ns(sc)} | {fmt_ns(sa)} | {fmt_ns(m)} | {oc} | {oa} |")
w("")

w(f"## Targets (fast provider: {fast})\n")
w("| target | value | met |")
w("|---|---|---|")
def target(label, value, ok):
    w(f"| {label} | {value} | {'n/a' if ok is None else ('yes' if ok else 'NO')} |")
for label, op, pykey, need in [
    ("message 64 B >= 5x python", "message/{p}/64", "msg_64_per_s", 5.0),
    ("message 1 KiB >= 5x python", "message/{p}/1024", "msg_1k_per_s", 5.0),
    ("handshake >= 1.3x python", "handshake/{p}", "handshakes_per_s", 1.3),
    ("ping-pong >= 1.3x python", "pingpong/{p}", "pingpong_per_s", 1.3),
]:
    r, pyr = rate(ns(op, fast)), py.get(pykey)
    ok = None if r is None or not pyr else r / pyr >= need
    target(label, fmt_ratio(r, pyr), ok)
for label, op, core in [
    ("handshake within 10% of sum of primitives", "handshake/{p}", models[0][2]),
    ("ping-pong within 10% of sum of primitives", "pingpong/{p}", models[1][2]),
    ("64 KiB within 10% of AEAD seal+open", "message/{p}/65536", models[4][2]),
]:
    m, s = ns(op, fast), total(fast, core)
    ok = None if None in (m, s) else m <= 1.10 * s
    target(label, "n/a" if ok is None else f"{(m / s - 1) * 100:+.1f}%", ok)

w("\n## Python runs\n")
for run in py_runs:
    w(f"- `{json.dumps(run)}`")
text = "\n".join(out) + "\n"
with open(report_path, "w") as f:
    f.write(text)
sys.stdout.write(text)
PY
