#!/usr/bin/env bash
# The meshwire wheel: build it (maturin, release), install it into a fresh
# venv with the reference agentmesh package, run the pytest suite against the
# Rust binaries it needs, then the wheel-versus-agentmesh benchmark.
#
#   bash crates/meshwire-py/ci.sh
#
# Environment: CARGO_TARGET_DIR (default <repo>/target), MESHWIRE_PY_VENV
# (default $CARGO_TARGET_DIR/py-ci-venv), MESHWIRE_PY_WHEELS (where the wheel is
# built, default $CARGO_TARGET_DIR/wheels; separate ones let two runs share a
# target dir), BENCH_SECONDS (default 3).
# Needs python3 (>= 3.9, with venv) and the registries (PyPI, crates.io).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
venv="${MESHWIRE_PY_VENV:-$CARGO_TARGET_DIR/py-ci-venv}"
wheels="${MESHWIRE_PY_WHEELS:-$CARGO_TARGET_DIR/wheels}"
pip_flags=(--disable-pip-version-check --no-input -q)

step() { printf '\n== %s\n' "$*"; }

step "fresh venv: $venv"
python3 --version
python3 -m venv --clear "$venv"
py="$venv/bin/python"
"$py" -m pip install "${pip_flags[@]}" "maturin>=1.7,<2"
"$venv/bin/maturin" --version

step "wheel: maturin build --release"
mkdir -p "$wheels"
rm -f "$wheels"/meshwire-*.whl
"$venv/bin/maturin" build --release -m crates/meshwire-py/Cargo.toml -o "$wheels"
shopt -s nullglob
built=("$wheels"/meshwire-*.whl)
shopt -u nullglob
if [ "${#built[@]}" -ne 1 ]; then
    echo "expected one meshwire wheel in $wheels, found ${#built[@]}" >&2
    exit 1
fi
wheel="${built[0]}"
echo "$wheel"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for needed in ("meshwire/__init__.pyi", "meshwire/py.typed", "meshwire/__init__.py", "meshwire/sync.py"):
    assert needed in names, f"{needed} missing from the wheel: {sorted(names)}"
assert any(n.startswith("meshwire/meshwire") and n.endswith(".so") for n in names), sorted(names)
print("wheel contents ok:", ", ".join(sorted(n for n in names if n.startswith("meshwire/"))))
PY

step "install the wheel and the test dependencies"
"$py" -m pip install "${pip_flags[@]}" "$wheel" "agent-governance-toolkit-core[api]==5.0.0" uvicorn websockets pytest mypy
"$py" -c "import meshwire, agentmesh.encryption.channel; print('meshwire', meshwire.__version__, 'from', meshwire.__file__)"

step "type stubs match the module (mypy stubtest)"
"$py" -m mypy.stubtest meshwire --allowlist crates/meshwire-py/stubtest-allowlist.txt

step "Rust binaries for the tests (meshwire serve, the echo example)"
cargo build -p meshwire-cli
cargo build -p meshwire --example echo
export MESHWIRE_BIN="${MESHWIRE_BIN:-$CARGO_TARGET_DIR/debug/meshwire}"
export MESHWIRE_ECHO_BIN="${MESHWIRE_ECHO_BIN:-$CARGO_TARGET_DIR/debug/examples/echo}"

step "pytest"
status=0
(cd crates/meshwire-py && PYTHONDONTWRITEBYTECODE=1 "$py" -m pytest -p no:cacheprovider -ra tests) || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
elif [ "$status" -ne 0 ]; then
    echo "pytest failed with exit code $status" >&2
    exit "$status"
fi

step "benchmark: wheel versus agentmesh 5.0.0"
mkdir -p "$CARGO_TARGET_DIR/bench"
"$py" crates/meshwire-py/bench/bench_wheel.py --seconds "${BENCH_SECONDS:-3}" \
    --json "$CARGO_TARGET_DIR/bench/bench_wheel.json"
