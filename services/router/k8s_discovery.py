"""Workers discovered by watching pods (`--discovery kubernetes`), as a `WorkerPool`.

Kubernetes decides WHICH workers are routable; Redis still says how loaded they are:

    PodWatcher (k8s_pods.py)   routable pods: Ready, Running, an IP, not terminating
    RedisWorkerPool            the workers' records (load, capacity, labels) and the prefix index
            |
            v
    routable_records(role) = one record per routable pod, matched to a Redis record by address
                             (podIP:grpcPort, what a worker registers with POD_IP as its host);
                             a pod without a record is routable by address only (see below)

A Redis record whose pod is not routable is never routed to: a pod that is terminating, not Ready
or gone stops taking requests as soon as the watch says so, whatever its heartbeat still claims.
A routable pod with no Redis record (no --redis-url, Redis down since before the worker registered,
or its first heartbeat not yet read) gets a placeholder record: its labels carry `load: unknown`
and its load fields and capacity are zeros. The fits filter then prefers workers whose load is
known and falls back to these; a policy that reads `candidates(role)` gets them as `has_load=False`.

`mark_down(addr)` (the router could not reach it) hides a worker for `down_s` seconds.
`ready()`: the first pod list is in and at least one prefill and one decode worker are routable.
Needs only `pods: get, list, watch` in the namespace. No torch here.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any

from services.common.registry import WorkerRecord
from services.router.k8s_pods import PodEndpoint, PodWatcher
from services.router.policy import Candidate
from services.router.routing import candidate_from_record
from services.router.workers import Role, WorkerInfo

UNKNOWN_LOAD = {"load": "unknown"}


class KubernetesWorkerPool:
    def __init__(self, watcher: PodWatcher, model: str, loads: Any = None, down_s: float = 2.0) -> None:
        """`loads`: a RedisWorkerPool (records and loads), or None (address-only routing)."""
        self.watcher = watcher
        self.loads = loads
        self.model = model
        self.down_s = down_s
        self._down: dict[str, float] = {}  # addr -> monotonic time it comes back
        self._down_version = 0
        self._lock = threading.Lock()

    # -- WorkerPool ----------------------------------------------------------------------------
    def prefill_workers(self) -> list[WorkerInfo]:
        return self._infos("prefill")

    def decode_workers(self) -> list[WorkerInfo]:
        return self._infos("decode")

    def mark_down(self, addr: str) -> None:
        with self._lock:
            self._down[addr] = time.monotonic() + self.down_s
            self._down_version += 1

    def routable_records(self, role: Role) -> list[WorkerRecord]:
        """One record per routable pod of `role` not marked down: its Redis record, or a placeholder."""
        held = {r.addr: r for r in self.loads.records(role)} if self.loads is not None else {}
        down = self._down_now()
        out = []
        for ep in self.watcher.endpoints(role):
            if ep.addr in down:
                continue
            rec = held.get(ep.addr)
            out.append(self._placeholder(ep) if rec is None else _with_bucket(rec, ep.bucket))
        return out

    def candidates(self, role: Role) -> list[Candidate]:
        """The routable workers as the policy sees them: placeholders with has_load=False."""
        out = []
        for r in self.routable_records(role):
            c = candidate_from_record(r)
            out.append(dataclasses.replace(c, has_load=False) if r.labels.get("load") == "unknown" else c)
        return out

    def records(self, role: Role | None = None) -> list[WorkerRecord]:
        roles: tuple[Role, ...] = ("prefill", "decode") if role is None else (role,)
        return [r for x in roles for r in self.routable_records(x)]

    @property
    def version(self) -> int:
        """Bumps whenever routable_records() may have changed (pods, Redis records, marks)."""
        self._down_now()  # an expired mark is a change
        loads = int(getattr(self.loads, "version", 0)) if self.loads is not None else 0
        return self.watcher.version + loads + self._down_version

    # -- state for /ready and /metrics ---------------------------------------------------------
    def ready(self) -> bool:
        return (
            self.watcher.synced.is_set()
            and bool(self.watcher.endpoints("prefill"))
            and bool(self.watcher.endpoints("decode"))
        )

    @property
    def synced(self) -> bool:
        return self.watcher.synced.is_set()

    @property
    def redis_errors(self) -> int:
        return int(getattr(self.loads, "redis_errors", 0))

    @property
    def redis_ok(self) -> bool:
        return bool(getattr(self.loads, "redis_ok", True))

    def close(self) -> None:
        self.watcher.close()
        if self.loads is not None:
            self.loads.close()

    # -- helpers -------------------------------------------------------------------------------
    def _infos(self, role: Role) -> list[WorkerInfo]:
        return [WorkerInfo(r.addr, role, r.model) for r in self.routable_records(role)]

    def _placeholder(self, ep: PodEndpoint) -> WorkerRecord:
        labels = {**UNKNOWN_LOAD, "pod": ep.name} | ({"bucket": ep.bucket} if ep.bucket else {})
        return WorkerRecord(role=ep.role, addr=ep.addr, model=self.model, capacity_tokens=0, labels=labels)

    def _down_now(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            expired = [a for a, t in self._down.items() if t <= now]
            for a in expired:
                del self._down[a]
            if expired:
                self._down_version += 1
            return set(self._down)


def _with_bucket(rec: WorkerRecord, bucket: str) -> WorkerRecord:
    """The pod's bucket label where the worker's record has none (the chart labels the pool)."""
    if not bucket or rec.labels.get("bucket"):
        return rec
    return dataclasses.replace(rec, labels={**rec.labels, "bucket": bucket})


# -- from the command line ---------------------------------------------------------------------------
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_k8s_args(p: Any) -> None:
    """The router's --k8s-* flags (used with --discovery kubernetes)."""
    p.add_argument(
        "--k8s-namespace", default="",
        help="namespace of the worker pods (default: $POD_NAMESPACE, else the pod's own namespace)",
    )  # fmt: skip
    p.add_argument(
        "--k8s-label-selector", default="app.kubernetes.io/name=swaserve",
        help="label selector of the worker pods (the role is read from app.kubernetes.io/component)",
    )  # fmt: skip
    p.add_argument(
        "--k8s-kubeconfig", default="", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)"
    )
    p.add_argument(
        "--k8s-resync", type=float, default=30.0, help="seconds between full re-lists of the pods (>= 1)"
    )


def k8s_namespace(flag: str) -> str:
    if flag:
        return flag
    env = os.environ.get("POD_NAMESPACE", "")
    if env:
        return env
    try:
        return Path(SA_NAMESPACE).read_text().strip()
    except OSError:
        raise SystemExit(
            "--discovery kubernetes: no --k8s-namespace, no $POD_NAMESPACE and not running in a pod"
        ) from None


def api_client(kubeconfig: str = "") -> Any:
    """A kubernetes ApiClient: the kubeconfig given, else the pod's service account, else $KUBECONFIG."""
    from kubernetes import client, config

    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise SystemExit(f"--k8s-kubeconfig {kubeconfig}: no such file")
        return config.new_client_from_config(config_file=kubeconfig)
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    except config.ConfigException:
        try:
            return config.new_client_from_config()
        except (config.ConfigException, OSError) as e:
            raise SystemExit(
                f"--discovery kubernetes: no in-cluster config and no kubeconfig ({e})"
            ) from None


def kubernetes_pool(args: Any, model: str, loads: Any = None) -> KubernetesWorkerPool:
    """The pool of `--discovery kubernetes`: pods watched with the flags' selector, loads from `loads`."""
    from kubernetes import client

    if args.k8s_resync < 1:
        raise SystemExit("--k8s-resync must be >= 1 second")
    core = client.CoreV1Api(api_client(args.k8s_kubeconfig))
    watcher = PodWatcher(
        core, k8s_namespace(args.k8s_namespace), args.k8s_label_selector, resync_s=args.k8s_resync
    )
    return KubernetesWorkerPool(watcher.start(), model, loads=loads)
