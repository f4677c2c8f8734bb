#!/usr/bin/env bash
# `make image`: build the swaserve container image without a daemon and without pulling anything,
# then smoke-run it. Steps, each timed:
#   1. tools      Debian's mmdebstrap buildah skopeo podman runc (installed when missing)
#   2. base       a Debian bookworm root filesystem (python3, python3-venv, tini, redis-server) made
#                 with mmdebstrap, cached as a tarball keyed on its inputs and imported with buildah
#                 as localhost/swaserve-base:<key>
#   3. wheels     every Python dependency as a wheel for CPython 3.11 (bookworm's python3), fetched
#                 on the host (torch's CPU wheel from local disk); cached, keyed on the requirements
#   4. project    the swaserve wheel, built from the working tree (what git would see) with its
#                 generated gRPC stubs
#   5. build      buildah build -f Containerfile (the image installs the wheels with pip --no-index)
#   6. smoke      podman run --network none: `swaserve --help`, then `swaserve model init` into a
#                 volume and `swaserve generate` from it, as the non-root user
#   7. archive    skopeo copy to a docker-archive tarball (docker load / ctr import)
#
# Usage: scripts/image/build.sh [--variant cpu|cuda] [--image NAME:TAG] [--no-smoke] [--no-archive]
#                               [--rebuild-base] [--prepare-only (stop once the build context is ready)]
# Environment (the same settings): VARIANT, IMAGE, SMOKE=0, ARCHIVE=0, REBUILD_BASE=1, PREPARE_ONLY=1,
#   SWASERVE_IMAGE_CACHE (default build/image/cache), SWASERVE_IMAGE_MIRROR (a Debian mirror URL for
#   mmdebstrap; default deb.debian.org with updates and security), SWASERVE_WHEELHOUSE (a directory
#   of extra wheels searched first: the CUDA torch wheel for VARIANT=cuda), SWASERVE_TORCH_VERSION
#   (VARIANT=cuda only: another torch than pyproject's pin, for a CUDA build that exists only there).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
trap 'echo "image: failed at scripts/image/build.sh line $LINENO: $BASH_COMMAND" >&2' ERR
PY=${PY:-$ROOT/.venv/bin/python}

VARIANT=${VARIANT:-cpu}
SMOKE=${SMOKE:-1}
ARCHIVE=${ARCHIVE:-1}
PREPARE_ONLY=${PREPARE_ONLY:-0}
REBUILD_BASE=${REBUILD_BASE:-0}
IMAGE=${IMAGE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --variant=*) VARIANT=${1#*=}; shift ;;
    --image) IMAGE=$2; shift 2 ;;
    --image=*) IMAGE=${1#*=}; shift ;;
    --no-smoke) SMOKE=0; shift ;;
    --no-archive) ARCHIVE=0; shift ;;
    --prepare-only) PREPARE_ONLY=1; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "image: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
case "$VARIANT" in cpu|cuda) ;; *) echo "image: VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; esac

OUT=$ROOT/build/image
CACHE=${SWASERVE_IMAGE_CACHE:-$OUT/cache}
CONTEXT=$OUT/context-$VARIANT  # per variant: a cpu and a cuda build may run side by side
VERSION=$("$PY" scripts/image/prepare.py project-version)
TORCH_PIN=$("$PY" scripts/image/prepare.py torch-version)
TORCH_VERSION=${SWASERVE_TORCH_VERSION:-$TORCH_PIN}
if [ "$TORCH_VERSION" != "$TORCH_PIN" ]; then
  [ "$VARIANT" = cuda ] || { echo "image: SWASERVE_TORCH_VERSION applies to VARIANT=cuda only" >&2; exit 2; }
  echo "image: warning: torch $TORCH_VERSION instead of pyproject's tested pin $TORCH_PIN" >&2
fi
IMAGE=${IMAGE:-localhost/swaserve:$VERSION-$VARIANT}
ARCH=$(uname -m)
mkdir -p "$CACHE" "$OUT"

T0=$(date +%s)
STEP_T=$T0
SUMMARY=()
step() { STEP_T=$(date +%s); echo; echo "==> image [$VARIANT] $*"; }
done_step() {  # done_step NAME DETAIL
  local dt=$(( $(date +%s) - STEP_T ))
  echo "    $1: ${dt}s${2:+ ($2)}"
  SUMMARY+=("$(printf '%-9s %4ss  %s' "$1" "$dt" "${2:-}")")
}
stamp() { local t0=$SECONDS line; while IFS= read -r line; do printf '    | %4ss %s\n' $((SECONDS - t0)) "$line"; done; }
human() { numfmt --to=iec-i --suffix=B --format=%.2f "$1" 2>/dev/null || echo "$1 bytes"; }

# ---- the CUDA wheel must be on disk before anything slow starts -------------------------------------
TORCH_WHEEL=""
if [ "$VARIANT" = cuda ]; then
  # "offline" = anything but PyPI: SWASERVE_WHEELHOUSE, then pip's configured find-links and file:// indexes
  search=()
  [ -n "${SWASERVE_WHEELHOUSE:-}" ] && search+=("$SWASERVE_WHEELHOUSE")
  while read -r url; do
    url=${url#file://}
    [ -d "$url" ] && search+=("$url")
    [ -d "${url%/simple}/files" ] && search+=("${url%/simple}/files")
  done < <("$PY" -m pip config list 2>/dev/null | grep -E '\.(find-links|extra-index-url|index-url)=' \
             | sed -E "s/^[^=]*='?//; s/'$//" | tr ' ' '\n' | grep -E '^(/|file://)' || true)
  if ! TORCH_WHEEL=$("$PY" scripts/image/prepare.py find-cuda-torch "$TORCH_VERSION" "${search[@]}"); then
    echo "image: refusing VARIANT=cuda: see above. VARIANT=cpu (the default) builds offline here." >&2
    exit 3
  fi
  echo "image: CUDA torch wheel: $TORCH_WHEEL"
fi

# ---- 1. tools ---------------------------------------------------------------------------------------
step "tools"
need=()
for tool in mmdebstrap buildah skopeo podman runc; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "    installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    mmdebstrap buildah umoci skopeo podman runc >/dev/null
fi
done_step tools "$(buildah --version | cut -d' ' -f1-3), $(podman --version)"

# ---- 2. base root filesystem ------------------------------------------------------------------------
step "base root filesystem (mmdebstrap bookworm)"
BASE_PACKAGES=python3,python3-venv,tini,redis-server
MIRROR=${SWASERVE_IMAGE_MIRROR:-}
MMDEBSTRAP_ARGS=(--variant=essential --include="$BASE_PACKAGES" --architectures="$(dpkg --print-architecture)"
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --aptopt='Acquire::Languages "none"')
BASE_KEY=$(printf '%s\n' bookworm "${MMDEBSTRAP_ARGS[@]}" "$MIRROR" "$(mmdebstrap --version)" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-$BASE_KEY.tar
BASE_IMAGE=localhost/swaserve-base:$BASE_KEY
base_state=cached
if [ "$REBUILD_BASE" = 1 ] || [ ! -s "$BASE_TAR" ]; then
  base_state=built
  echo "    mmdebstrap (~30-60 s): $BASE_PACKAGES"
  rm -f "$BASE_TAR.tmp"
  mmdebstrap --quiet --format=tar "${MMDEBSTRAP_ARGS[@]}" bookworm "$BASE_TAR.tmp" ${MIRROR:+"$MIRROR"}
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  buildah rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "    importing $BASE_TAR as $BASE_IMAGE"
  c=$(buildah from --quiet scratch)
  buildah add --quiet "$c" "$BASE_TAR" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/sh --label io.swaserve.base-key="$BASE_KEY" "$c"
  buildah commit --quiet --rm "$c" "$BASE_IMAGE" >/dev/null
  base_state="$base_state, imported"
fi
# the wheels are chosen for the base's own Python (markers such as python_full_version < "3.11.3" matter)
BASE_PYTHON=$(tar -xOf "$BASE_TAR" ./var/lib/dpkg/status \
  | awk '/^Package: python3[.][0-9]+-minimal$/{p=1} p&&/^Version:/&&!done{split($2, v, "-"); print v[1]; done=1}')
case "$BASE_PYTHON" in 3.11.*) ;; *) echo "image: the base has Python '$BASE_PYTHON', the wheels need 3.11" >&2; exit 1 ;; esac
done_step base "$base_state, $(human "$(stat -c %s "$BASE_TAR")") tar, Python $BASE_PYTHON, $BASE_IMAGE"

# ---- 3. dependency wheels ---------------------------------------------------------------------------
step "dependency wheels (CPython $BASE_PYTHON, $ARCH)"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/wheels/deps" "$CONTEXT/wheels/project"
REQ=$OUT/requirements-$VARIANT.txt
"$PY" scripts/image/prepare.py requirements "$VARIANT" "$REQ" ${TORCH_WHEEL:+--torch-wheel "$TORCH_WHEEL"}
WHEELS_KEY=$( { cat "$REQ"; echo "$ARCH $BASE_PYTHON"; if [ -n "$TORCH_WHEEL" ]; then sha256sum "$TORCH_WHEEL"; fi; } \
  | sha256sum | cut -c1-16)
WHEELS=$CACHE/wheels-$VARIANT-$WHEELS_KEY
wheels_state=cached
if [ ! -f "$WHEELS/.complete" ]; then
  wheels_state=downloaded
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  echo "    pip download -> $WHEELS"
  # bookworm: CPython 3.11, glibc 2.36; pip wants every manylinux tag that glibc accepts spelled out
  platforms=(--platform "manylinux2014_$ARCH" --platform "manylinux2010_$ARCH" --platform "manylinux1_$ARCH")
  for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_$ARCH"); done
  "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --dest "$WHEELS" \
    --python-version "$BASE_PYTHON" --implementation cp --abi cp311 "${platforms[@]}" \
    ${SWASERVE_WHEELHOUSE:+--find-links "$SWASERVE_WHEELHOUSE"} -r "$REQ" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  # pip evaluated markers for the host's Python; fill in what the base's Python needs besides
  for _ in 1 2 3 4 5; do
    mapfile -t extra < <("$PY" scripts/image/prepare.py missing "$WHEELS" "$REQ" "$BASE_PYTHON")
    [ ${#extra[@]} -eq 0 ] && break
    echo "    Python $BASE_PYTHON also needs: ${extra[*]}"
    "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --dest "$WHEELS" \
      --python-version "$BASE_PYTHON" --implementation cp --abi cp311 "${platforms[@]}" \
      ${SWASERVE_WHEELHOUSE:+--find-links "$SWASERVE_WHEELHOUSE"} "${extra[@]}" 2>&1 \
      | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  done
  [ ${#extra[@]} -eq 0 ] || { echo "image: still missing for Python $BASE_PYTHON: ${extra[*]}" >&2; exit 1; }
  touch "$WHEELS/.complete"
fi
# the context gets hard links (same filesystem) or copies; requirements name the torch wheel by file
cp -al "$WHEELS"/*.whl "$CONTEXT/wheels/deps/" 2>/dev/null || cp "$WHEELS"/*.whl "$CONTEXT/wheels/deps/"
# inside, torch is matched by version: the context holds only the variant's torch wheel
sed -E "s#^/.*/torch-[^/]*\.whl\$#torch==$TORCH_VERSION#" "$REQ" > "$CONTEXT/wheels/deps/requirements.txt"
DEPS_DIGEST=$WHEELS_KEY  # the wheelhouse is a function of its key (downloaded wheels never change)
done_step wheels "$wheels_state, $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

# ---- 4. the swaserve wheel --------------------------------------------------------------------------
step "swaserve wheel (working tree)"
SRC=$OUT/src-$VARIANT
rm -rf "$SRC" && mkdir -p "$SRC"
# what git sees: tracked and untracked-but-not-ignored files (no .venv, no build/), deleted ones skipped
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$SRC"
PY="$PY" bash "$SRC/scripts/gen_proto.sh"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --wheel-dir "$CONTEXT/wheels/project" "$SRC" 2>&1 | grep -v '^$' || true
ls "$CONTEXT"/wheels/project/swaserve-*.whl >/dev/null
PROJECT_DIGEST=$("$PY" scripts/image/prepare.py digest "$CONTEXT/wheels/project" | cut -c1-16)
done_step project "$(basename "$CONTEXT"/wheels/project/swaserve-*.whl)"

# ---- 5. buildah build -------------------------------------------------------------------------------
BUILD=(buildah build --isolation chroot --pull=never --layers
  -f "$ROOT/Containerfile" -t "$IMAGE"
  --build-arg BASE="$BASE_IMAGE" --build-arg VARIANT="$VARIANT" --build-arg TORCH_VERSION="$TORCH_VERSION"
  --build-arg VERSION="$VERSION" --build-arg DEPS_DIGEST="$DEPS_DIGEST" --build-arg PROJECT_DIGEST="$PROJECT_DIGEST"
  "$CONTEXT")
if [ "$PREPARE_ONLY" = 1 ]; then
  echo; echo "image: context ready in $CONTEXT; build it with:"; echo "  ${BUILD[*]}"
  printf '    %s\n' "${SUMMARY[@]}"
  exit 0
fi
step "buildah build -f Containerfile -> $IMAGE"
"${BUILD[@]}" 2>&1 | stamp || { echo "image: buildah build failed (above)" >&2; exit 1; }
SIZE=$(podman image inspect --format '{{.Size}}' "$IMAGE")
done_step build "$IMAGE, $(human "$SIZE")"

# ---- 6. smoke run -----------------------------------------------------------------------------------
RUN=(podman run --rm --network none --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
if [ "$SMOKE" = 1 ]; then
  step "smoke run (podman run --network none)"
  "${RUN[@]}" "$IMAGE" --help > "$OUT/smoke-help.txt"
  head -3 "$OUT/smoke-help.txt"
  VOL=swaserve-smoke-models-$$
  podman volume create "$VOL" >/dev/null
  trap 'podman volume rm -f "$VOL" >/dev/null 2>&1 || true' EXIT
  "${RUN[@]}" -v "$VOL:/models" "$IMAGE" model init --out /models/mimo-tiny --preset mimo-tiny --seed 0
  out=$("${RUN[@]}" -v "$VOL:/models:ro" "$IMAGE" \
    generate --model /models/mimo-tiny --prompt-ids "1 2 3 4" --max-tokens 8 --greedy --ids)
  echo "    generate (greedy, 8 tokens): $out"
  [ "$(echo "$out" | wc -w)" -eq 8 ] || { echo "image: smoke generate printed '$out', not 8 ids" >&2; exit 1; }
  done_step smoke "help, model init into a volume, generate from it"
fi

# ---- 7. docker-archive ------------------------------------------------------------------------------
if [ "$ARCHIVE" = 1 ]; then
  step "skopeo copy -> docker-archive"
  TARBALL=$OUT/swaserve-$VERSION-$VARIANT.docker.tar
  rm -f "$TARBALL"
  skopeo copy --quiet "containers-storage:$IMAGE" "docker-archive:$TARBALL:${IMAGE#localhost/}"
  done_step archive "$TARBALL, $(human "$(stat -c %s "$TARBALL")")"
fi

echo
echo "image [$VARIANT] $IMAGE: $(human "$SIZE") in $(( $(date +%s) - T0 ))s"
printf '    %s\n' "${SUMMARY[@]}"
