#!/usr/bin/env bash
# Builds the Python package into a fresh virtual environment and runs its tests against the
# workspace's agent (what `.ci/run` and the test command in README.md run).
#
#   python/run-tests.sh [pytest arguments...]
#
# The venv lives in <target>/pyenv (ignored by git, rebuilt on every run); the extension is
# built by maturin through pip with cargo's dev profile, into the workspace's target
# directory (CARGO_TARGET_DIR if set), so it shares what `cargo build` already compiled.
# PIP_INDEX_URL / PIP_FIND_LINKS are honoured as usual for maturin, numpy and pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
export CARGO_TARGET_DIR="$target"
python="${PYTHON:-python3}"

started=$SECONDS
agent="${NENCACHE_AGENT_BIN:-$target/debug/nencache-agent}"
if [ -z "${NENCACHE_AGENT_BIN:-}" ]; then
    # Cheap when it is up to date; the tests need the agent of this tree.
    cargo build --quiet -p nencache-agent --bin nencache-agent --bin nencache
fi
export NENCACHE_AGENT_BIN="$agent"
# No __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1

venv="$target/pyenv"
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install numpy pytest redis
# Optional suites: NENCACHE_TEST_REQUIREMENTS names a requirements file to add (for example
# python/tests/lmcache-requirements.txt, for the tests that drive LMCache's own code).
if [ -n "${NENCACHE_TEST_REQUIREMENTS:-}" ]; then
    "${pip[@]}" install -r "$NENCACHE_TEST_REQUIREMENTS"
fi
# A debug build: the tests need no optimized code, and it reuses the workspace's dev
# artifacts (pip's default for maturin is a release build).
MATURIN_PEP517_ARGS="--profile dev" "${pip[@]}" install "$root/python"
echo "python/run-tests.sh: package built and installed in $((SECONDS - started)) s"

# From outside python/, so that `import nencache` is the installed package.
cd "$target"
"$venv/bin/python" -m pytest -p no:cacheprovider "$root/python/tests" "$@"
