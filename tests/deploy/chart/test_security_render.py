"""The chart's security values (docs/security.md), rendered without a cluster: API keys on by
default, the internal token in every swaserve container, TLS mounted everywhere it is asked, and
the router's flags parsed by the router's own parser."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from services.router.main import parse_args
from tests.deploy.chart.chart_render import Rendered, render

GCACHE = {"gcache": {"enabled": True}, "prefill": {"defaults": {"engine": {"hostKvTokens": 4096}}}}


def swaserve_containers(r: Rendered) -> dict[str, dict[str, Any]]:
    """Every container running a swaserve service (not init containers, not Redis), by object name."""
    out = {}
    for o in r.objects:
        if o["kind"] in ("Deployment", "DaemonSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                if c["args"][0] in ("router", "prefill", "decode", "gcache"):
                    out[o["metadata"]["name"]] = c
    return out


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in c.get("env", [])}


def router_args(r: Rendered) -> list[str]:
    return list(
        r.get("Deployment", "demo-swaserve-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    )


def test_defaults_keys_in_redis_and_a_generated_token_everywhere() -> None:
    r = render(GCACHE)
    args = router_args(r)
    assert "--api-keys-redis" in args and "--api-key-refresh=1" in args
    parsed = parse_args([a.replace("$(REDIS_URL)", "redis://r:6379/0") for a in args[1:]])
    assert (
        parsed.api_keys_redis == "" and parsed.redis_url == "redis://r:6379/0"
    )  # keys in --redis-url's Redis
    secret = r.get("Secret", "demo-swaserve-internal-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    assert token != base64.b64decode(
        render(GCACHE).get("Secret", "demo-swaserve-internal-token")["data"]["token"]
    )
    containers = swaserve_containers(r)
    assert set(containers) == {"demo-swaserve-router", "demo-swaserve-prefill-all", "demo-swaserve-decode",
                               "demo-swaserve-gcache"}  # fmt: skip
    for name, c in containers.items():
        ref = env_of(c)["SWASERVE_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "demo-swaserve-internal-token", "key": "token"}, name
        assert "SWASERVE_TLS_CERT" not in env_of(c)


def test_off_means_no_flags_no_secret_no_env() -> None:
    r = render({"security": {"apiKeys": {"enabled": False}, "internalToken": {"enabled": False}}})
    assert not [a for a in router_args(r) if a.startswith("--api-key")]
    assert "Secret/demo-swaserve-internal-token" not in r.names()
    assert all("SWASERVE_INTERNAL_TOKEN" not in env_of(c) for c in swaserve_containers(r).values())


def test_key_file_secret_and_tls_secret_are_mounted() -> None:
    r = render({**GCACHE, "security": {
        "apiKeys": {"store": "secret", "existingSecret": "my-keys", "refreshSeconds": 5},
        "internalToken": {"existingSecret": "my-token", "existingSecretKey": "t"},
        "internalTls": {"existingSecret": "my-tls", "serverName": "internal.example"},
    }})  # fmt: skip
    args = router_args(r)
    assert "--api-keys=/etc/swaserve/api-keys/keys.json" in args and "--api-key-refresh=5" in args
    assert parse_args([a.replace("$(REDIS_URL)", "redis://r/0") for a in args[1:]]).api_keys == (
        "/etc/swaserve/api-keys/keys.json"
    )
    assert "Secret/demo-swaserve-internal-token" not in r.names()
    pod = r.get("Deployment", "demo-swaserve-router")["spec"]["template"]["spec"]
    assert {"name": "api-keys", "secret": {"secretName": "my-keys", "defaultMode": 0o440}} in pod["volumes"]
    for name, c in swaserve_containers(r).items():
        env = env_of(c)
        assert env["SWASERVE_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-token", "key": "t"}
        assert env["SWASERVE_TLS_CERT"]["value"] == "/etc/swaserve/tls/tls.crt", name
        assert env["SWASERVE_TLS_CA"]["value"] == "/etc/swaserve/tls/ca.crt"
        assert env["SWASERVE_TLS_SERVER_NAME"]["value"] == "internal.example"
        assert {"name": "internal-tls", "mountPath": "/etc/swaserve/tls", "readOnly": True} in c[
            "volumeMounts"
        ]
    for o in r.objects:
        if o["kind"] in ("Deployment", "DaemonSet") and o["metadata"]["name"] != "demo-swaserve-redis":
            vols = {v["name"]: v for v in o["spec"]["template"]["spec"]["volumes"]}
            assert vols["internal-tls"]["secret"]["secretName"] == "my-tls", o["metadata"]["name"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"security": {"apiKeys": {"store": "secret"}}}, "set security.apiKeys.existingSecret"),
        ({"security": {"apiKeys": {"store": "file"}}}, "store"),
        ({"security": {"apiKeys": {"refreshSeconds": 0}}}, "refreshSeconds"),
        ({"security": {"internalTls": {"secret": "x"}}}, "secret"),
    ],
)
def test_values_that_cannot_work_fail_clearly(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render(values)
