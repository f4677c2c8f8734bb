"""KubeletStandIn: a STAND-IN for the kubelet, for tests against the real API server (tests/k8s/cluster.py).

No kubelet and no node can run here, so nothing would ever move a pod past Pending. This stand-in does,
through the API, what a kubelet's status updates would show; it runs no container:

    start(pod)       phase Running, a pod IP, the Ready condition (true or false)
    set_ready(pod)   the Ready condition flips (a readiness probe passing or failing)
    terminate(pod)   a graceful delete: the pod gets a deletionTimestamp and STAYS (a finalizer
                     the stand-in added at start plays the containers still shutting down) ...
    finish(pod)      ... until the "containers" stopped: the finalizer goes, the pod is deleted

Pods get IPs from 10.244.0.0/16 in order unless a test names one. `release()` drops every finalizer
it added, so that namespaces can be deleted.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

FINALIZER = "swaserve.test/kubelet-standin"  # holds a deleted pod in "terminating" until finish()


class KubeletStandIn:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self._ips = (f"10.244.{n // 250}.{n % 250 + 1}" for n in itertools.count(1))
        self._held: set[str] = set()  # pods carrying our finalizer

    def next_ip(self) -> str:
        return next(self._ips)

    # -- what the controllers made ------------------------------------------------------------
    def pods(self, label_selector: str = "") -> list[client.V1Pod]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=label_selector).items
        return sorted(items, key=lambda p: p.metadata.name)

    def wait_pods(self, label_selector: str, count: int, timeout: float = 20.0) -> list[client.V1Pod]:
        """The live (not terminating) pods of the selector, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            live = [p for p in self.pods(label_selector) if p.metadata.deletion_timestamp is None]
            if len(live) == count:
                return live
            if time.monotonic() > deadline:
                names = [p.metadata.name for p in live]
                raise TimeoutError(f"{label_selector!r}: {len(live)} live pods {names}, wanted {count}")
            time.sleep(0.1)

    # -- the kubelet's side of a pod's life ---------------------------------------------------
    def start(self, name: str, ip: str | None = None, ready: bool = True) -> str:
        """The pod runs on this stand-in: Running, `ip` (or the next one), Ready as given. Returns the IP."""
        ip = ip or self.next_ip()
        self.core.patch_namespaced_pod(name, self.namespace, {"metadata": {"finalizers": [FINALIZER]}})
        self._held.add(name)
        now = _now()
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                _condition("ContainersReady", ready, now),
                _condition("Ready", ready, now),
            ],
        }
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})
        return ip

    def start_pending(self, label_selector: str = "", ready: bool = True, count: int = 0) -> dict[str, str]:
        """Start every pod of the selector that is still Pending (once the controllers made `count`
        live pods of it, if given); name -> IP."""
        if count:
            self.wait_pods(label_selector, count)
        started = {}
        for p in self.pods(label_selector):
            if p.metadata.deletion_timestamp is None and (p.status.phase or "Pending") == "Pending":
                started[p.metadata.name] = self.start(p.metadata.name, ready=ready)
        return started

    def set_ready(self, name: str, ready: bool) -> None:
        now = _now()
        conds = [_condition("ContainersReady", ready, now), _condition("Ready", ready, now)]
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": {"conditions": conds}})

    def set_phase(self, name: str, phase: str) -> None:
        """E.g. "Failed" or "Succeeded": the containers exited for good (Ready goes false with it)."""
        now = _now()
        conds = [_condition("ContainersReady", False, now), _condition("Ready", False, now)]
        self.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": {"phase": phase, "conditions": conds}}
        )

    def terminate(self, name: str, grace_s: int = 30) -> None:
        """A graceful delete as `kubectl delete pod` sends it: the pod stays, with a deletionTimestamp."""
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=grace_s)

    def finish(self, name: str) -> None:
        """The terminating pod's containers stopped: drop the finalizer, the API server deletes it."""
        self._unhold(name)

    def release(self) -> None:
        for name in sorted(self._held):
            self._unhold(name)

    def _unhold(self, name: str) -> None:
        try:
            pod = self.core.read_namespaced_pod(name, self.namespace)
        except client.ApiException as e:
            if e.status == 404:
                self._held.discard(name)
                return
            raise
        rest = [f for f in (pod.metadata.finalizers or []) if f != FINALIZER]
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": pod.metadata.resource_version},
            {"op": "replace", "path": "/metadata/finalizers", "value": rest},
        ]
        self.core.patch_namespaced_pod(name, self.namespace, patch)
        self._held.discard(name)


def _condition(kind: str, ok: bool, now: str) -> dict[str, str]:
    return {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": now}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
