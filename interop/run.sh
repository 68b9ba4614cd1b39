#!/usr/bin/env bash
# The interop matrix: installs what the peers need, builds the Rust peer and
# runs interop/run.py (arguments are passed through, e.g. --figures).
# The wheel peer uses the venv made by crates/meshwire-py/ci.sh
# (target/py-ci-venv); without it, pass --peers rust,node,agt-python.
set -euo pipefail
cd "$(dirname "$0")/.."
AGT_VENV="$(bash interop/python/setup_venv.sh)"
export AGT_VENV
if [ ! -d interop/node/node_modules/@microsoft/agent-governance-sdk ]; then
    (cd interop/node && npm ci --no-audit --no-fund)
fi
cargo build -q -p meshwire-cli
exec python3 interop/run.py "$@"
