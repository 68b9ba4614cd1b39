#!/usr/bin/env bash
# Create (idempotently) a venv holding the reference Python package `agentmesh`
# (PyPI agent-governance-toolkit-core 5.0.0) and print its path on stdout.
# Location: $AGT_VENV, default <repo>/target/agt-venv. Needs only python3 (+ pip).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${AGT_VENV:-$repo/target/agt-venv}"
py="$venv/bin/python"
packages=("agent-governance-toolkit-core[api]==5.0.0" uvicorn websockets)

mkdir -p "$(dirname "$venv")"
# Several test binaries may ask for the venv at once: one installs, the others wait.
exec 9>"$venv.lock"
flock 9

if [ ! -x "$py" ]; then
    # Some distributions ship python3 without ensurepip: fall back to a venv
    # without pip and install into it with the host's pip below.
    python3 -m venv "$venv" >&2 || python3 -m venv --clear --without-pip "$venv" >&2
fi

installed() {
    "$py" - <<'PY' 2>/dev/null
import importlib.metadata as md
assert md.version("agent-governance-toolkit-core") == "5.0.0"
import agentmesh.encryption.channel, fastapi, uvicorn, websockets  # noqa: F401
PY
}

if ! installed; then
    if "$py" -m pip --version >/dev/null 2>&1; then
        pip=("$py" -m pip)
    else
        pip=(python3 -m pip --python "$py")  # pip >= 22.3
    fi
    "${pip[@]}" install --disable-pip-version-check "${packages[@]}" >&2
    installed || { echo "setup_venv.sh: agentmesh 5.0.0 not importable in $venv" >&2; exit 1; }
fi

echo "$venv"
