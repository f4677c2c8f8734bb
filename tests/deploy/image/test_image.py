"""The container image, built for real (scripts/image/build.sh: mmdebstrap base, buildah build) and run
with podman, without network, as the non-root user: the CLI and every service's flags, a checkpoint
written into a volume by one container and read by another, greedy tokens equal to the host's,
`swaserve up` answering an OpenAI request inside the container and stopping on SIGTERM, and the
docker-archive tarball.

Marker `image`: a build from nothing takes ~4-7 minutes on 2 cores (about 1 min for the base root
filesystem, 2 min for the install layer, see docs/deploy-image.md), so `make test` leaves it out;
`make test-all` or `pytest -m image tests/deploy/image` runs it. A warm build is seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.netutil import free_port, port_open
from tests.waiting import wait_for

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[3]
BUILD_SH = ROOT / "scripts" / "image" / "build.sh"
SWASERVE = ROOT / ".venv" / "bin" / "swaserve"
PODMAN_RUN = [
    "podman", "run", "--rm", "--network", "none", "--runtime", "runc",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
]  # fmt: skip
UID = "10001"


def sh(argv: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{argv} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
        )
    return r


@pytest.fixture(scope="module")
def image() -> str:
    """The image of this working tree (cached layers make a rebuild of unchanged code take seconds)."""
    name = "localhost/swaserve:test-cpu"
    r = subprocess.run(
        ["bash", str(BUILD_SH), "--variant", "cpu", "--image", name, "--no-smoke", "--no-archive"],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert r.returncode == 0, f"build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    print(r.stdout[-1200:])  # the step timings, shown with -s
    return name


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"swaserve-test-{uuid.uuid4().hex[:10]}"
    sh(["podman", "volume", "create", name])
    yield name
    sh(["podman", "volume", "rm", "-f", name], check=False)


def test_config_is_non_root_with_volumes_and_entrypoint(image: str) -> None:
    cfg = json.loads(sh(["podman", "image", "inspect", image]).stdout)[0]["Config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert set(cfg["Volumes"]) == {"/models", "/var/lib/swaserve"}
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--", "swaserve"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["SWASERVE_HOME"] == "/var/lib/swaserve" and env["SWASERVE_VARIANT"] == "cpu"
    assert cfg["Labels"]["io.swaserve.variant"] == "cpu"


def test_help_lists_every_service(image: str) -> None:
    out = sh([*PODMAN_RUN, image, "--help"]).stdout
    for cmd in ("up", "generate", "model", "router", "prefill", "decode", "gcache"):
        assert cmd in out, cmd


@pytest.mark.parametrize("service", ["router", "prefill", "decode", "gcache"])
def test_each_service_takes_its_own_flags(image: str, service: str) -> None:
    out = sh([*PODMAN_RUN, image, service, "--help"]).stdout
    assert "--redis-url" in out and "--port" in out
    bad = sh([*PODMAN_RUN, image, service, "--no-such-flag"], check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr  # the module's own argparse refused it


def test_runs_as_the_service_user_and_cannot_write_the_install(image: str) -> None:
    probe = "id -u; touch /opt/swaserve/x 2>/dev/null && echo writable || echo read-only; touch $SWASERVE_HOME/x && echo home-ok"
    out = sh([*PODMAN_RUN, "--entrypoint", "sh", image, "-c", probe]).stdout.split()
    assert out == [UID, "read-only", "home-ok"]


def test_generate_from_a_model_volume_matches_the_host(image: str, volume: str, tmp_path: Path) -> None:
    """One container writes the seeded tiny MiMo checkpoint into a volume, another reads it (volume and
    root filesystem read-only) and decodes greedily with no network: the ids equal the host engine's
    on the host's checkpoint, and the checkpoint's bytes equal the host's."""
    sh([*PODMAN_RUN, "-v", f"{volume}:/models", image, "model", "init", "--out", "/models/mimo-tiny"])
    gen = ["generate", "--prompt-ids", "1 2 3 4 5", "--max-tokens", "12", "--greedy", "--ids"]
    # the reader also runs with a read-only root filesystem (readOnlyRootFilesystem in a pod)
    reader = [*PODMAN_RUN, "--read-only", "-v", f"{volume}:/models:ro", image]
    in_image = sh([*reader, *gen, "--model", "/models/mimo-tiny"])
    sh([str(SWASERVE), "model", "init", "--out", str(tmp_path / "mimo-tiny")])
    on_host = sh([str(SWASERVE), *gen, "--model", str(tmp_path / "mimo-tiny")])
    ids = in_image.stdout.split()
    assert len(ids) == 12 and all(t.isdigit() for t in ids)
    assert ids == on_host.stdout.split()
    # the same bytes on both sides: the checkpoint is a function of preset and seed alone
    listing = "cd /models/mimo-tiny && sha256sum *.safetensors config.json"
    got = sh([*PODMAN_RUN, "-v", f"{volume}:/models:ro", "--entrypoint", "sh", image, "-c", listing]).stdout
    host = sh(["sh", "-c", f"cd {tmp_path / 'mimo-tiny'} && sha256sum *.safetensors config.json"]).stdout
    assert got == host


def test_up_serves_a_completion_inside_and_stops_on_sigterm(image: str, volume: str) -> None:
    """`swaserve up` (redis-server from the image, prefill, decode, router) answers an OpenAI request on
    the container's loopback; `podman stop` sends SIGTERM through tini and everything exits cleanly."""
    name = f"swaserve-up-{uuid.uuid4().hex[:8]}"
    run = [a for a in PODMAN_RUN if a != "--rm"]
    sh(
        [
            *run,
            "-d",
            "--name",
            name,
            "-v",
            f"{volume}:/models",
            image,
            "up",
            "--model",
            "mimo-tiny",
            "--port",
            "8000",
        ]
    )
    try:
        assert wait_for(
            lambda: "swaserve is up" in sh(["podman", "logs", name], check=False).stdout, 300, 1.0
        ), sh(["podman", "logs", name], check=False).stdout[-3000:]
        body = json.dumps({"model": "mimo-tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0})
        client = (
            "import json, sys, urllib.request as u\n"
            "req = u.Request('http://127.0.0.1:8000/v1/completions', data=sys.argv[1].encode(),"
            " headers={'Content-Type': 'application/json'})\n"
            "print(u.urlopen(req, timeout=120).read().decode())\n"
        )
        reply = json.loads(sh(["podman", "exec", name, "python3", "-c", client, body], timeout=180).stdout)
        assert reply["object"] == "text_completion"
        assert reply["usage"]["completion_tokens"] == 5
        t0 = time.monotonic()
        sh(["podman", "stop", "-t", "60", name], timeout=120)
        stopped_in = time.monotonic() - t0
        state = json.loads(sh(["podman", "inspect", name]).stdout)[0]["State"]
        assert state["ExitCode"] == 0, (state, sh(["podman", "logs", name], check=False).stdout[-2000:])
        assert stopped_in < 55  # SIGTERM reached `swaserve up`: no SIGKILL after the 60 s grace
        assert "stopped" in sh(["podman", "logs", name]).stdout
    finally:
        sh(["podman", "rm", "-f", "-v", name], check=False)


def test_docker_archive_is_loadable(image: str, tmp_path: Path) -> None:
    """What `docker load` / `ctr import` read: manifest.json naming the tag, its config and its layers."""
    tarball = tmp_path / "swaserve.docker.tar"
    sh(
        [
            "skopeo",
            "copy",
            "--quiet",
            f"containers-storage:{image}",
            f"docker-archive:{tarball}:swaserve:test-cpu",
        ]
    )
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        (entry,) = manifest
        # a short name is normalised as docker would: `image: swaserve:test-cpu` in a pod finds it
        assert entry["RepoTags"] == ["docker.io/library/swaserve:test-cpu"]
        assert entry["Config"] in names and all(layer in names for layer in entry["Layers"])
        config = json.load(tar.extractfile(entry["Config"]))  # type: ignore[arg-type]
    assert config["config"]["User"] == f"{UID}:{UID}"
    assert len(entry["Layers"]) >= 3  # base, user, dependencies, swaserve
    inspected = json.loads(sh(["skopeo", "inspect", f"docker-archive:{tarball}"]).stdout)
    assert inspected["Labels"]["io.swaserve.variant"] == "cpu"
    assert os.path.getsize(tarball) > 500e6


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A real OCI registry on loopback: Debian's docker-registry (distribution 2.8), its binary unpacked
    from the .deb into the image cache (no service installed or started), storage in tmp_path."""
    tools = ROOT / "build" / "image" / "cache" / "docker-registry"
    binary = tools / "usr" / "bin" / "docker-registry"
    if not binary.exists():
        tools.mkdir(parents=True, exist_ok=True)
        sh(["apt-get", "download", "docker-registry"], timeout=300)  # into the cwd, then unpacked
        (deb,) = Path.cwd().glob("docker-registry_*.deb")
        try:
            sh(["dpkg-deb", "-x", str(deb), str(tools)])
        finally:
            deb.unlink()
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(
        [str(binary), "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert wait_for(lambda: port_open("127.0.0.1", port), 20), "docker-registry did not listen"
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_push_to_a_registry_and_pull_back(image: str, registry: str) -> None:
    """`skopeo copy` to a registry (what docs/deploy-image.md tells users to do), then pull and run it."""
    remote = f"{registry}/team/swaserve:test-cpu"
    sh(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"containers-storage:{image}",
            f"docker://{remote}",
        ]
    )
    inspected = json.loads(sh(["skopeo", "inspect", "--tls-verify=false", f"docker://{remote}"]).stdout)
    assert inspected["RepoTags"] == ["test-cpu"]
    assert inspected["Labels"]["io.swaserve.variant"] == "cpu"
    sh(["podman", "rmi", "-f", remote], check=False)
    try:
        sh(["podman", "pull", "--quiet", "--tls-verify=false", remote])
        assert sh([*PODMAN_RUN, remote, "--version"]).stdout.startswith("swaserve ")
    finally:
        sh(["podman", "rmi", "-f", remote], check=False)
