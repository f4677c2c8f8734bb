"""ProcessKubeletStandIn: a STAND-IN for the kubelet that runs each pod's containers as local processes.

tests/k8s/kubelet_standin.py only patches pod status; this one runs what the pod spec says, so that a
helm-installed release serves requests on loopback. It watches (polls) the pods of one namespace and,
for each new pod:

    IP         the pod gets its own loopback address 127.A.0.n (all of 127/8 is the host's `lo`), set
               as status.podIP at once, before the init containers run, as a kubelet does
    env        the container's env in order: value with $(VAR) expansion over the names before it,
               fieldRef (metadata.name/namespace/uid/labels/annotations, spec.nodeName,
               spec.serviceAccountName, status.podIP/hostIP), secretKeyRef and configMapKeyRef read
               from the API (an optional key may be missing), envFrom; then command/args are expanded
    image      no image runs: the image's entrypoint, ENV and WORKDIR come from `images`
               (repository -> ImageConfig, e.g. `swaserve` -> the venv's `swaserve` script); a
               container with its own `command` runs that program from the host's PATH
    volumes    emptyDir is a folder of the pod's; hostPath the host's folder; secret / configMap
               volumes are written as files. There is no mount namespace: a mountPath that appears
               in an arg, an env value or workingDir is rewritten to the folder standing in for it
    network    there is no network namespace either: the wildcard address 0.0.0.0 in an arg or env
               value (`--host=0.0.0.0`) is rewritten to the pod's IP, so that pods bind the same
               ports side by side
    identity   a pod that mounts its service account token (automountServiceAccountToken not false)
               gets KUBECONFIG: a kubeconfig holding a TokenRequest token bound to the pod, so the
               pod talks to the API server as its service account (its Role applies)
    order      init containers one after another, each to exit 0; then every container at once
    probes     startupProbe, then readinessProbe (httpGet / tcpSocket / exec) every `probe_period_s`
               (not periodSeconds: tests wait less); the Ready condition follows failureThreshold
               and successThreshold. Liveness probes are not run, and no container is restarted: a
               container that exits leaves the pod not Ready (`exits` records it)
    deletion   a finalizer of the stand-in holds a deleted pod until its processes stopped:
               SIGTERM to each container's process group, SIGKILL after the grace period (capped
               at `max_grace_s`), then the finalizer goes and the API server removes the pod

`stop()` stops every process and drops the finalizers. Logs: <workdir>/<pod>/logs/<container>.log.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.k8s.pod_spec import ImageConfig, MountMap, expand, field_value, port_number, swaserve_image

FINALIZER = "swaserve.test/process-kubelet-standin"


# -- the stand-in --------------------------------------------------------------------------------------
class ProcessKubeletStandIn:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        workdir: Path,
        images: Mapping[str, ImageConfig] | None = None,
        probe_period_s: float = 0.5,
        max_grace_s: float = 10.0,
        poll_s: float = 0.25,
    ) -> None:
        self.api, self.core, self.namespace = api, client.CoreV1Api(api), namespace
        self.workdir = workdir
        self.images = dict(images or {"swaserve": swaserve_image()})
        self.probe_period_s, self.max_grace_s, self.poll_s = probe_period_s, max_grace_s, poll_s
        self._net = f"127.{random.randint(64, 250)}.0"
        self._next_host = 1
        self.runs: dict[str, PodRun] = {}  # uid -> run
        self.errors: list[str] = []  # what went wrong, for the test's message
        self.exits: list[str] = []  # containers that exited while their pod was not being deleted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-kubelet", daemon=True)

    def start(self) -> ProcessKubeletStandIn:
        self._thread.start()
        atexit.register(self._kill_all)  # a test run that dies skips stop(): no process outlives it
        return self

    def _kill_all(self) -> None:
        for run in list(self.runs.values()):
            for p in run.live_procs():
                _signal_group(p, signal.SIGKILL)

    def pids(self) -> list[int]:
        """Every process the stand-in started and has not seen exit."""
        return [p.pid for run in list(self.runs.values()) for p in run.live_procs()]

    def pod_ip(self, name: str) -> str:
        for run in self.runs.values():
            if run.name == name:
                return run.ip
        raise KeyError(name)

    def logs(self, name_prefix: str = "", tail: int = 20) -> str:
        parts = []
        for log in sorted(self.workdir.glob(f"{name_prefix}*/logs/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {log.parent.parent.name}/{log.stem}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        runs = list(self.runs.values())
        for run in runs:
            run.request_stop()
        for run in runs:
            run.join(timeout=self.max_grace_s + 15)
        atexit.unregister(self._kill_all)

    def next_ip(self) -> str:
        self._next_host += 1
        if self._next_host > 254:
            raise RuntimeError("the stand-in ran out of loopback addresses")
        return f"{self._net}.{self._next_host}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reconcile()
            except Exception as e:  # noqa: BLE001 - the loop goes on; the test sees errors
                self.errors.append(f"reconcile: {type(e).__name__}: {e}")
            self._stop.wait(self.poll_s)

    def _reconcile(self) -> None:
        pods: list[dict[str, Any]] = self.api.sanitize_for_serialization(
            self.core.list_namespaced_pod(self.namespace).items
        )
        seen = set()
        for pod in pods:
            meta = pod["metadata"]
            seen.add(meta["uid"])
            run = self.runs.get(meta["uid"])
            if meta.get("deletionTimestamp"):
                if run is not None:
                    run.request_stop(meta.get("deletionGracePeriodSeconds"))
                continue
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            if run is None and phase == "Pending" and self._hold(meta):
                run = PodRun(self, pod, self.next_ip())
                self.runs[meta["uid"]] = run
                run.start()
        for uid, run in self.runs.items():
            if uid not in seen:
                run.request_stop(0)  # gone without a graceful delete

    def _hold(self, meta: dict[str, Any]) -> bool:
        finalizers = [*(meta.get("finalizers") or []), FINALIZER]
        try:
            self.core.patch_namespaced_pod(
                meta["name"], self.namespace, {"metadata": {"finalizers": finalizers}}
            )
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise
        return True


class PodRun(threading.Thread):
    """One pod's life on the stand-in: init containers, containers, probes, termination."""

    def __init__(self, kubelet: ProcessKubeletStandIn, pod: dict[str, Any], ip: str) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.k, self.pod, self.ip = kubelet, pod, ip
        self.name: str = pod["metadata"]["name"]
        self.dir = kubelet.workdir / self.name
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = threading.Event()
        self._grace: float = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.started_at = _now()

    # -- public ------------------------------------------------------------------------------------
    def request_stop(self, grace_s: float | None = None) -> None:
        if grace_s is not None and not self._stopping.is_set():
            self._grace = float(grace_s)
        self._stopping.set()

    def live_procs(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in list(self.procs.values()) if p.poll() is None]

    # -- the life ----------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._status("Pending", initialized=False, ready=False)
            volumes = self._volumes()
            kubeconfig = self._service_account()
            for c in self.pod["spec"].get("initContainers") or []:
                proc = self._spawn(c, volumes, kubeconfig)
                while proc.poll() is None and not self._stopping.wait(0.1):
                    pass
                if self._stopping.is_set():
                    return
                if proc.returncode != 0:
                    self.k.errors.append(f"{self.name}: init container {c['name']} exited {proc.returncode}")
                    self._status("Failed", initialized=False, ready=False)
                    return
            for c in self.pod["spec"]["containers"]:
                self._spawn(c, volumes, kubeconfig)
            self._status("Running", initialized=True, ready=False)
            self._probe_loop()
        except Exception as e:  # noqa: BLE001 - recorded; the pod stays not Ready
            self.k.errors.append(f"{self.name}: {type(e).__name__}: {e}")
        finally:
            self._stopping.wait()
            self._terminate()
            self._release()

    def _probe_loop(self) -> None:
        containers = self.pod["spec"]["containers"]
        started = {c["name"]: "startupProbe" not in c for c in containers}
        ready = dict.fromkeys(started, False)
        streak = dict.fromkeys(started, 0)  # > 0: successes in a row, < 0: failures in a row
        was_ready, exited = False, False
        while not self._stopping.is_set():
            for c in containers:
                name = c["name"]
                if self.procs[name].poll() is not None:
                    if not exited:
                        self.k.exits.append(f"{self.name}/{name}: exit {self.procs[name].returncode}")
                    exited, ready[name] = True, False
                    continue
                if not started[name]:
                    started[name] = self._probe(c, c["startupProbe"])
                    continue
                probe = c.get("readinessProbe")
                if probe is None:
                    ready[name] = True
                    continue
                ok = self._probe(c, probe)
                streak[name] = max(streak[name], 0) + 1 if ok else min(streak[name], 0) - 1
                if ok and streak[name] >= int(probe.get("successThreshold", 1)):
                    ready[name] = True
                elif not ok and -streak[name] >= int(probe.get("failureThreshold", 3)):
                    ready[name] = False
            now_ready = all(ready.values())
            if now_ready != was_ready:
                self._status("Running", initialized=True, ready=now_ready)
                was_ready = now_ready
            self._stopping.wait(self.k.probe_period_s)

    def _probe(self, container: dict[str, Any], probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            host, port = get.get("host") or self.ip, port_number(container, get["port"])
            try:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("GET", get.get("path", "/"))
                status = conn.getresponse().status
                conn.close()
            except OSError:
                return False
            return 200 <= status < 400
        if "tcpSocket" in probe:
            try:
                socket.create_connection(
                    (self.ip, port_number(container, probe["tcpSocket"]["port"])), timeout
                ).close()
            except OSError:
                return False
            return True
        if "exec" in probe:
            try:
                r = subprocess.run(probe["exec"]["command"], capture_output=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                return False
            return r.returncode == 0
        raise ValueError(f"{self.name}: probe {sorted(probe)} is not supported by the stand-in")

    # -- containers --------------------------------------------------------------------------------
    def _spawn(
        self, c: dict[str, Any], volumes: dict[str, Path], kubeconfig: Path | None
    ) -> subprocess.Popen[bytes]:
        mounts = MountMap({m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts") or []}, self.ip)
        image = self._image(c)
        env = self._env(c)
        if c.get("command"):
            argv = [expand(a, env) for a in c["command"] + (c.get("args") or [])]
            exe = shutil.which(argv[0])
            if exe is None:
                raise RuntimeError(f"container {c['name']}: {argv[0]!r} is not on this host's PATH")
            argv[0] = exe
        else:
            argv = [*image.entrypoint, *[expand(a, env) for a in (c.get("args") or image.cmd)]]
        argv = [argv[0], *(mounts.rewrite(a) for a in argv[1:])]
        full = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        full |= {k: mounts.rewrite(v) for k, v in {**image.env, **env}.items()}
        if kubeconfig is not None:
            full["KUBECONFIG"] = str(kubeconfig)
        cwd = mounts.rewrite(c.get("workingDir") or image.workdir or "/")
        if not Path(cwd).is_dir():
            cwd = str(self.dir)
        log = self.dir / "logs" / f"{c['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"# {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv, env=full, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[c["name"]] = proc
        return proc

    def _image(self, c: dict[str, Any]) -> ImageConfig:
        repo = re.split(r"[:@]", c["image"].rsplit("/", 1)[-1])[0]
        if repo in self.k.images:
            return self.k.images[repo]
        if c.get("command"):
            return ImageConfig(())
        raise RuntimeError(
            f"container {c['name']}: image {c['image']!r} has no command and no known entrypoint"
        )

    def _env(self, c: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in c.get("envFrom") or []:
            data = self._data(src.get("secretRef") or src.get("configMapRef"), "secretRef" in src)
            env |= {src.get("prefix", "") + k: v for k, v in data.items()}
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            src = e["valueFrom"]
            if "fieldRef" in src:
                env[e["name"]] = field_value(self.pod, src["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                ref = src.get("secretKeyRef") or src["configMapKeyRef"]
                data = self._data(ref, "secretKeyRef" in src)
                if ref["key"] in data:
                    env[e["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise RuntimeError(f"env {e['name']}: key {ref['key']!r} not in {ref['name']}")
            else:
                raise ValueError(f"env {e['name']}: {sorted(src)} is not supported by the stand-in")
        return env

    def _data(self, ref: dict[str, Any], secret: bool) -> dict[str, str]:
        try:
            if secret:
                raw = self.k.core.read_namespaced_secret(ref["name"], self.k.namespace).data or {}
                return {k: base64.b64decode(v).decode() for k, v in raw.items()}
            return dict(self.k.core.read_namespaced_config_map(ref["name"], self.k.namespace).data or {})
        except client.ApiException as e:
            if e.status == 404 and ref.get("optional"):
                return {}
            raise

    def _volumes(self) -> dict[str, Path]:
        out = {}
        for v in self.pod["spec"].get("volumes") or []:
            name = v["name"]
            if "hostPath" in v:
                out[name] = Path(v["hostPath"]["path"])
                continue
            d = self.dir / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            if "secret" in v or "configMap" in v:
                secret = "secret" in v
                ref = v["secret"] if secret else v["configMap"]
                ref = {"name": ref.get("secretName") or ref.get("name"), "optional": ref.get("optional")}
                for k, val in self._data(ref, secret).items():
                    (d / k).write_text(val)
            elif "emptyDir" not in v:
                raise ValueError(f"{self.name}: volume {name} ({sorted(v)}) is not supported by the stand-in")
            out[name] = d
        return out

    def _service_account(self) -> Path | None:
        """A kubeconfig with a token for the pod's service account, bound to the pod (TokenRequest)."""
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        sa = spec.get("serviceAccountName") or "default"
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=3600,
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.name, uid=self.pod["metadata"]["uid"]
                ),
            )
        )
        made = self.k.core.create_namespaced_service_account_token(sa, self.k.namespace, req)
        token = self.k.api.sanitize_for_serialization(made)["status"]["token"]
        conf = self.k.api.configuration
        path = self.dir / "serviceaccount" / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: sa\n"
            f"clusters: [{{name: c, cluster: {{server: '{conf.host}', certificate-authority: '{conf.ssl_ca_cert}'}}}}]\n"
            f"users: [{{name: {sa}, user: {{token: '{token}'}}}}]\n"
            f"contexts: [{{name: sa, context: {{cluster: c, user: {sa}, namespace: {self.k.namespace}}}}}]\n"
        )
        return path

    # -- status and the end ------------------------------------------------------------------------
    def _status(self, phase: str, initialized: bool, ready: bool) -> None:
        now = _now()
        status = {
            "phase": phase,
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1",
            "startTime": self.started_at,
            "conditions": [
                _condition("PodScheduled", True, now),
                _condition("Initialized", initialized, now),
                _condition("ContainersReady", ready, now),
                _condition("Ready", ready, now),
            ],
        }
        self.pod["status"] = status
        try:
            self.k.core.patch_namespaced_pod_status(self.name, self.k.namespace, {"status": status})
        except client.ApiException as e:
            if e.status != 404:
                raise

    def _terminate(self) -> None:
        procs = self.live_procs()
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + min(self._grace, self.k.max_grace_s)
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=10)

    def _release(self) -> None:
        """Drop the stand-in's finalizer (a test-and-replace patch, retried while the pod changes)."""
        for _ in range(20):
            try:
                pod = self.k.api.sanitize_for_serialization(
                    self.k.core.read_namespaced_pod(self.name, self.k.namespace)
                )
                rest = [f for f in (pod["metadata"].get("finalizers") or []) if f != FINALIZER]
                patch: list[dict[str, Any]] = [
                    {
                        "op": "test",
                        "path": "/metadata/resourceVersion",
                        "value": pod["metadata"]["resourceVersion"],
                    },
                    {"op": "replace", "path": "/metadata/finalizers", "value": rest},
                ]
                self.k.core.patch_namespaced_pod(self.name, self.k.namespace, patch)
                return
            except client.ApiException as e:
                if e.status == 404:
                    return
                if e.status not in (409, 422):
                    raise
                time.sleep(0.1)
        self.k.errors.append(f"{self.name}: the finalizer could not be removed")


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _condition(kind: str, ok: bool, now: str) -> dict[str, str]:
    return {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": now}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
