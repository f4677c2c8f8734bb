"""Which worker pods are routable, followed by list + watch on the Kubernetes API (`PodWatcher`).

    list pods (label selector, namespace) --> reconcile the whole set --> watch from that resourceVersion
          ^                                                                  |
          +---- the watch ended: server timeout (= resync_s, so a periodic   |
                re-list), 410 Gone, a cut connection, any error (backoff) ---+

A pod is routable (`endpoint_of`) only while ALL hold: it is not terminating (no deletionTimestamp),
its phase is Running, its Ready condition is True, it has a pod IP, its role label names a role
(prefill/decode), and its gRPC port is known (annotation, else a container port named "grpc").
Everything else is dropped at once, so a pod that restarts with a new IP shows up under the new
address as soon as it is Ready again, and a cut watch loses nothing: the re-list replaces the set.
While the API server cannot be reached the last set stays (logged, counted in `errors`).

Only `pods: get, list, watch` in one namespace are used (the chart's Role). Pods are read as plain
JSON (`_preload_content=False`): no model objects, and `close()` can cut a blocked watch at once.
No torch here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("swaserve.router.k8s")

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class PodConventions:
    """How the chart labels worker pods (helm/swaserve). `role_label` takes "prefill" / "decode"."""

    role_label: str = "app.kubernetes.io/component"
    bucket_label: str = "swaserve.io/bucket"  # prefill length bucket; absent: serves every length
    port_annotation: str = "swaserve.io/grpc-port"  # else the container port named `port_name`
    port_name: str = "grpc"


@dataclass(frozen=True)
class PodEndpoint:
    """A routable worker pod."""

    name: str
    uid: str
    role: str  # "prefill" | "decode"
    addr: str  # podIP:grpcPort
    bucket: str = ""


def endpoint_of(pod: Mapping[str, Any], conv: PodConventions = PodConventions()) -> PodEndpoint | None:
    """The pod's endpoint if it is routable now, else None (see the module docstring)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return None
    if not any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    ):
        return None
    ip = status.get("podIP")
    labels = meta.get("labels") or {}
    role = labels.get(conv.role_label, "")
    port = grpc_port(pod, conv)
    if not ip or role not in ROLES or port is None:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return PodEndpoint(
        meta.get("name", ""), meta.get("uid", ""), role, f"{host}:{port}", labels.get(conv.bucket_label, "")
    )


def grpc_port(pod: Mapping[str, Any], conv: PodConventions = PodConventions()) -> int | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(conv.port_annotation)
    if raw is None:
        for c in (pod.get("spec") or {}).get("containers") or []:
            for p in c.get("ports") or []:
                if p.get("name") == conv.port_name:
                    raw = p.get("containerPort")
    try:
        port = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        port = None
    return port if port is not None and 0 < port < 65536 else None


class PodWatcher:
    """Follows the routable worker pods of `label_selector` in `namespace` on a background thread.

    `core` is a kubernetes.client.CoreV1Api. `synced` is set after the first successful list;
    `version` bumps whenever the set may have changed; `on_change()` is called after each change.
    """

    def __init__(
        self,
        core: Any,
        namespace: str,
        label_selector: str = "",
        conventions: PodConventions = PodConventions(),
        resync_s: float = 30.0,
        backoff_max_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if not namespace:
            raise ValueError("PodWatcher: a namespace is required")
        if resync_s < 1:
            raise ValueError("PodWatcher: resync_s must be >= 1")
        self.core, self.namespace, self.selector = core, namespace, label_selector
        self.conv, self.resync_s, self.backoff_max_s = conventions, resync_s, backoff_max_s
        self.on_change = on_change
        self._pods: dict[str, PodEndpoint] = {}  # uid -> endpoint, routable pods only
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._resp: Any = None  # the open watch response, cut by close()
        self.synced = threading.Event()
        self.version = 0
        self.lists = 0  # lists done (the first, every reconnect, every resync)
        self.events = 0
        self.errors = 0  # failed lists / watches
        self.api_ok = True
        self._thread = threading.Thread(target=self._run, name="router-k8s-pods", daemon=True)

    def start(self) -> PodWatcher:
        self._thread.start()
        return self

    def endpoints(self, role: str | None = None) -> list[PodEndpoint]:
        with self._lock:
            eps = [e for e in self._pods.values() if role is None or e.role == role]
        return sorted(eps, key=lambda e: (e.role, e.bucket, e.name, e.uid))

    def wait_synced(self, timeout: float) -> bool:
        return self.synced.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            _cut(resp)
        self._thread.join(timeout=5)

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = 0.1
                self._watch(rv)
            except Exception as e:  # noqa: BLE001 - any failure: keep the last set, re-list after a pause
                if self._stop.is_set():
                    return
                self.errors += 1
                if self.api_ok:
                    log.warning(
                        "k8s discovery: %s; keeping the last %d pods, re-listing", _brief(e), len(self._pods)
                    )
                self.api_ok = False
                self._stop.wait(backoff)
                backoff = min(self.backoff_max_s, backoff * 2)

    def _list(self) -> str:
        resp = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False, _request_timeout=(5, 30)
        )
        body = orjson.loads(resp.data)
        pods = {}
        for pod in body.get("items") or []:
            ep = endpoint_of(pod, self.conv)
            if ep is not None:
                pods[ep.uid] = ep
        with self._lock:
            changed = pods != self._pods
            if changed:
                _log_diff(self._pods, pods)
                self._pods = pods
                self.version += 1
        self.lists += 1
        if not self.api_ok:
            log.warning("k8s discovery: API server reachable again; %d routable pods", len(pods))
        self.api_ok = True
        self.synced.set()
        if changed:
            self._changed()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, rv: str) -> None:
        """Apply watch events until the server ends the watch (after resync_s) or it breaks."""
        resp = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, watch=True, resource_version=rv,
            timeout_seconds=int(self.resync_s), allow_watch_bookmarks=True,
            _preload_content=False, _request_timeout=(5, self.resync_s + 15),
        )  # fmt: skip
        self._resp = resp
        try:
            if self._stop.is_set():
                return
            for line in _lines(resp):
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old
                    log.info("k8s discovery: watch error %s; re-listing", obj.get("message", obj))
                    return
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.events += 1
                    self._apply(kind, obj)
        finally:
            self._resp = None
            resp.release_conn()

    def _apply(self, kind: str, pod: Mapping[str, Any]) -> None:
        uid = (pod.get("metadata") or {}).get("uid", "")
        ep = None if kind == "DELETED" else endpoint_of(pod, self.conv)
        with self._lock:
            old = self._pods.get(uid)
            if old == ep:
                return
            if ep is None and old is not None:
                del self._pods[uid]
                log.info("k8s discovery: %s %s (%s) left the routable set", old.role, old.name, old.addr)
            elif ep is not None:
                self._pods[uid] = ep
                log.info("k8s discovery: %s %s routable at %s", ep.role, ep.name, ep.addr)
            self.version += 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:  # noqa: BLE001 - a listener's bug must not stop discovery
                log.exception("k8s discovery: on_change failed")


def _lines(resp: Any) -> Iterator[bytes]:
    """The newline-delimited JSON events of a watch response, as they arrive."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _cut(resp: Any) -> None:
    try:
        resp.shutdown()  # urllib3 >= 2.3: unblocks a read in another thread
    except Exception:  # noqa: BLE001 - best effort on close
        pass


def _log_diff(old: Mapping[str, PodEndpoint], new: Mapping[str, PodEndpoint]) -> None:
    for uid in old.keys() - new.keys():
        log.info(
            "k8s discovery: %s %s (%s) left the routable set", old[uid].role, old[uid].name, old[uid].addr
        )
    for uid in new.keys() - old.keys():
        log.info("k8s discovery: %s %s routable at %s", new[uid].role, new[uid].name, new[uid].addr)


def _brief(e: BaseException) -> str:
    status = getattr(e, "status", None)
    text = f"{type(e).__name__} {status} {getattr(e, 'reason', '')}" if status else f"{type(e).__name__}: {e}"
    return text[:200]
