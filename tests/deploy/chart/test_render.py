"""The chart renders (helm-python-sdk, Helm v4), lints clean, every object is valid for a current
Kubernetes (kubernetes-validate --strict), the examples match their golden renders, and each template
says what the services need: real `swaserve <service>` flags, probes, labels the router's pod
discovery selects on, and clear failures for values that cannot work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from services.router.k8s_pods import PodConventions, endpoint_of
from swaserve.cli import SERVICES
from tests.deploy.chart.chart_render import (
    CHART,
    EXAMPLES,
    KUBE_VERSION,
    Rendered,
    golden_path,
    render,
    render_example,
)

CRDS = {"ServiceMonitor", "PodMonitor"}  # the Prometheus operator's: no schema in kubernetes-validate


def container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    cs = obj["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def flags(c: dict[str, Any]) -> dict[str, str]:
    """--name=value args as a dict (bare flags map to "")."""
    out = {}
    for a in c["args"][1:]:
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out[k] = v
    return out


@pytest.mark.parametrize("kube", [None, "v1.20.2"])
def test_lint_strict_is_clean(kube: str | None) -> None:
    report = helm.lint(str(CHART), strict=True, kube_version=kube)
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_golden_render(example: str) -> None:
    golden = golden_path(CHART / "examples" / f"{example}.yaml")
    assert render_example(example).text() == golden.read_text(), (
        f"{golden.name} differs: review, then python -m tests.deploy.chart.chart_render --write-golden"
    )


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_every_object_is_valid_for_current_kubernetes(example: str) -> None:
    objs = render_example(example).objects
    checked = 0
    for o in objs:
        if o["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {e.message}")
        checked += 1
    assert checked >= 6


def test_strict_validation_catches_an_unknown_field() -> None:  # the check above could fail
    o = render_example("minimal").get("Service", "demo-swaserve-router")
    bad = {**o, "spec": {**o["spec"], "selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_current_api_versions_when_the_cluster_has_them() -> None:
    r = render_example("minimal")
    assert r.get("PodDisruptionBudget", "demo-swaserve-router")["apiVersion"] == "policy/v1"
    assert r.get("HorizontalPodAutoscaler", "demo-swaserve-router")["apiVersion"] == "autoscaling/v2"


ENV_SAMPLES = {  # what Kubernetes substitutes for $(VAR) in args
    "$(REDIS_URL)": "redis://:pw@demo-swaserve-redis:6379/0",
    "$(POD_IP)": "10.0.0.7",
    "$(POD_NAME)": "demo-swaserve-decode-abc",
    "$(POD_NAMESPACE)": "swaserve",
    "$(NODE_NAME)": "gpu-node-1",
}


def parse_service_args(args: list[str]) -> Any:
    """The container's args through the service's own argparse parser (exits 2 on a bad flag)."""
    import importlib

    for var, sample in ENV_SAMPLES.items():
        args = [a.replace(var, sample) for a in args]
    module = importlib.import_module(SERVICES[args[0]][0])
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args(args[1:])
    return module.parse_args(args[1:])


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_every_command_parses_with_the_services_own_flags(example: str) -> None:
    r = render_example(example)
    for o in r.of_kind("Deployment") + r.of_kind("DaemonSet"):
        c = container(o)
        assert "command" not in c, "the image's entrypoint (tini -- swaserve) runs the args"
        assert c["args"][0] in SERVICES
        parsed = parse_service_args(c["args"])
        assert parsed.redis_url.startswith("redis://"), o["metadata"]["name"]
        if c["args"][0] in ("prefill", "decode"):
            assert parsed.advertise_host == "10.0.0.7" and parsed.port == 7000


def test_a_wrong_flag_would_be_caught() -> None:  # the check above could fail
    with pytest.raises(SystemExit):
        parse_service_args(["gcache", "--memory-bytes=lots"])


def test_pools_are_one_deployment_each_deep_merged_over_defaults() -> None:
    r = render_example("gpu-buckets")
    pools = {
        d["metadata"]["labels"]["swaserve.io/bucket"]: d
        for d in r.of_kind("Deployment")
        if "swaserve.io/bucket" in d["metadata"]["labels"]
    }
    assert sorted(pools) == ["long", "medium", "short"]
    short, long = pools["short"], pools["long"]
    fs, fl = flags(container(short)), flags(container(long))
    assert fs["--bucket"] == "short" and fl["--bucket"] == "long"
    # the pool's own keys win, the rest comes from prefill.defaults (maps merged, not replaced)
    assert fs["--max-running"] == "64" and fs["--chunk-size"] == "512"
    assert (
        fl["--chunk-size"] == "4096" and fl["--max-total-tokens"] == "2097152" and fl["--max-running"] == "4"
    )
    assert (
        fs["--max-total-tokens"] == "524288" and fs["--dtype"] == "bfloat16" and fl["--dtype"] == "bfloat16"
    )
    assert short["spec"]["replicas"] == 4 and long["spec"]["replicas"] == 1
    assert container(long)["resources"]["requests"]["memory"] == "128Gi"
    assert container(short)["resources"]["requests"]["memory"] == "64Gi"
    assert container(short)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the range is a pod label outside the selector; the bucket name is in both
    tpl = long["spec"]["template"]["metadata"]["labels"]
    assert (tpl["swaserve.io/min-tokens"], tpl["swaserve.io/max-tokens"]) == ("262144", "1048576")
    sel = long["spec"]["selector"]["matchLabels"]
    assert sel["swaserve.io/bucket"] == "long" and "swaserve.io/min-tokens" not in sel
    router = flags(container(r.get("Deployment", "demo-swaserve-router")))
    assert router["--length-buckets"] == "short:65536,medium:262144,long:1048576"


def test_a_zero_in_a_pool_replaces_the_default() -> None:
    """mergeOverwrite would keep the default for 0 / false; the chart's own deep merge does not."""
    r = render({"prefill": {"defaults": {"replicas": 3, "kvEvents": True}, "pools": [
        {"name": "a", "minTokens": 0, "maxTokens": 100, "replicas": 0, "kvEvents": False}]}})  # fmt: skip
    d = r.get("Deployment", "demo-swaserve-prefill-a")
    assert d["spec"]["replicas"] == 0
    assert "--no-kv-events" in container(d)["args"]


def test_worker_pods_are_what_the_routers_discovery_selects() -> None:
    r = render_example("gpu-buckets")
    conv = PodConventions()
    for name, role, bucket in (
        ("demo-swaserve-prefill-medium", "prefill", "medium"),
        ("demo-swaserve-decode", "decode", ""),
    ):
        tpl = r.get("Deployment", name)["spec"]["template"]
        pod = {  # as the kubelet would report it once Ready
            "metadata": {"name": "p", "uid": "u", **tpl["metadata"]},
            "spec": tpl["spec"],
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        ep = endpoint_of(pod, conv)
        assert ep is not None and (ep.role, ep.bucket, ep.addr) == (role, bucket, "10.0.0.7:7000")
        assert tpl["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"


def test_router_probes_rbac_and_counts() -> None:
    r = render_example("minimal")
    d = r.get("Deployment", "demo-swaserve-router")
    c = container(d)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    assert "replicas" not in d["spec"]  # the HPA owns the count
    hpa = r.get("HorizontalPodAutoscaler", "demo-swaserve-router")
    assert hpa["spec"]["minReplicas"] >= 2
    assert r.get("PodDisruptionBudget", "demo-swaserve-router")["spec"]["minAvailable"] == 1
    role = r.get("Role", "demo-swaserve-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == "demo-swaserve-router"
    assert not r.of_kind("ClusterRole")
    for o in r.of_kind("Deployment"):  # only the router talks to the API server
        if o["metadata"]["name"] != "demo-swaserve-router":
            assert o["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    no_hpa = render({"router": {"hpa": {"enabled": False}, "replicas": 3}})
    assert no_hpa.get("Deployment", "demo-swaserve-router")["spec"]["replicas"] == 3
    assert not no_hpa.of_kind("HorizontalPodAutoscaler")


def test_gcache_daemonset_drains_on_gpu_nodes() -> None:
    r = render_example("gpu-buckets")
    ds = r.get("DaemonSet", "demo-swaserve-gcache")
    spec = ds["spec"]["template"]["spec"]
    f = flags(container(ds))
    assert f["--memory-bytes"] == "64G" and f["--disk-bytes"] == "1T" and f["--disk-dir"] == "/disk"
    assert f["--node-id"] == "gcache-$(NODE_NAME)" and f["--data-port"] == "7601"
    assert spec["terminationGracePeriodSeconds"] >= 60 * float(f["--drain-grace"])
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v} == {
        "disk": "/mnt/nvme/swaserve-gcache"
    }
    prefill = flags(container(r.get("Deployment", "demo-swaserve-prefill-short")))
    assert prefill["--gcache-redis-url"] == "$(REDIS_URL)" and int(prefill["--host-kv-tokens"]) > 0
    assert not render_example("minimal").of_kind("DaemonSet")


def test_redis_password_in_a_secret_or_external_url() -> None:
    r = render_example("minimal")
    env = {e["name"]: e for e in container(r.get("Deployment", "demo-swaserve-router"))["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "demo-swaserve-redis",
        "key": "redis-password",
    }
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@demo-swaserve-redis:6379/0"
    sts = r.get("StatefulSet", "demo-swaserve-redis")
    assert "$(REDIS_PASSWORD)" in container(sts)["args"]
    generated = render().get("Secret", "demo-swaserve-redis")["data"]["redis-password"]
    assert generated and generated != render().get("Secret", "demo-swaserve-redis")["data"]["redis-password"]
    ext = render_example("external-redis")
    assert not ext.of_kind("StatefulSet") and not ext.of_kind("Secret") and not ext.of_kind("Role")
    env = {e["name"]: e for e in container(ext.get("Deployment", "demo-swaserve-decode"))["env"]}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "redis-credentials", "key": "url"}
    assert flags(container(ext.get("Deployment", "demo-swaserve-router")))["--discovery"] == "redis"


def test_models_are_mounted_never_downloaded() -> None:
    gpu = render_example("gpu-buckets")
    d = gpu.get("Deployment", "demo-swaserve-decode")
    assert flags(container(d))["--model"] == "/models/MiMo-V2-Flash"
    vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert vol["persistentVolumeClaim"] == {"claimName": "mimo-checkpoints", "readOnly": True}
    assert "initContainers" not in d["spec"]["template"]["spec"]
    assert (
        flags(container(gpu.get("Deployment", "demo-swaserve-router")))["--served-model-name"]
        == "mimo-v2-flash"
    )
    tiny = render_example("minimal").get("Deployment", "demo-swaserve-router")["spec"]["template"]["spec"]
    init = tiny["initContainers"][0]
    assert init["args"][:2] == ["model", "init"] and "/models/mimo-tiny" in init["args"]


def test_dashboards_configmaps_from_files(tmp_path: Any) -> None:
    import shutil

    copy = tmp_path / "swaserve"
    shutil.copytree(CHART, copy)
    (copy / "dashboards" / "Router_Overview.json").write_text('{"title": "router"}')
    with helm.Chart.load(str(copy)) as c:
        out = Rendered(
            c.render({"monitoring": {"dashboards": {"enabled": True}}}, name="demo", namespace="x")
        )
    cm = out.get("ConfigMap", "demo-swaserve-dashboard-router-overview")
    assert cm["data"] == {"Router_Overview.json": '{"title": "router"}'}
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    # the shipped ones (swaserve dashboards generate): one ConfigMap each, the JSON as committed
    shipped = {p.name: p.read_text() for p in (Path(CHART) / "dashboards").glob("*.json")}
    cms = render({"monitoring": {"dashboards": {"enabled": True}}}).of_kind("ConfigMap")
    assert len(shipped) == 5 and {k: v for cm in cms for k, v in cm["data"].items()} == {
        k: v.rstrip("\n") for k, v in shipped.items()
    }


def pools(*ranges: tuple[str, int, int]) -> dict[str, Any]:
    return {"prefill": {"pools": [{"name": n, "minTokens": a, "maxTokens": b} for n, a, b in ranges]}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            pools(("a", 0, 100), ("b", 150, 200)),
            "prefill.pools[1] (b): minTokens 150 leaves a gap after the previous pool, which ends at 100; set minTokens: 100",
        ),
        (
            pools(("a", 0, 100), ("b", 50, 200)),
            "prefill.pools[1] (b): minTokens 50 overlaps the previous pool, which ends at 100",
        ),
        (pools(("a", 10, 100)), "prefill.pools[0] (a): minTokens is 10, the first pool must start at 0"),
        (
            pools(("a", 0, 100), ("b", 100, 100)),
            "prefill.pools[1] (b): maxTokens 100 must be above minTokens 100",
        ),
        (pools(("a", 0, 100), ("a", 100, 200)), 'prefill.pools[1]: the name "a" is used twice'),
        ({"encoder": {"enabled": True}}, "encoder service is not built yet"),
        ({"models": {"source": "pvc", "name": "m"}}, "set models.pvc.claimName"),
        ({"models": {"name": "llama"}}, "a builtin model is mimo-tiny or smollm2"),
        ({"redis": {"enabled": False}}, "set redis.external.url"),
        ({"gcache": {"enabled": True}}, "needs engine.hostKvTokens > 0"),
    ],
)
def test_values_that_cannot_work_fail_clearly(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as e:
        render(values)
    assert message in str(e.value), str(e.value)


def test_contiguous_pools_render() -> None:
    r = render(pools(("s", 0, 100), ("m", 100, 1000), ("l", 1000, 5000)))
    assert [d["metadata"]["name"] for d in r.of_kind("Deployment") if "prefill" in d["metadata"]["name"]] == [
        "demo-swaserve-prefill-s", "demo-swaserve-prefill-m", "demo-swaserve-prefill-l"
    ]  # fmt: skip
