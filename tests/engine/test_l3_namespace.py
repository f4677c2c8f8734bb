"""The L3 key namespace: the digest of the KV geometry, dtype and page size is the same text as before
the one KVLayerSpec (issue 19), so GCache blocks written by earlier workers stay readable; and any
field the bytes depend on changes it."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.kv_spec import KVLayerSpec
from services.engine.engine import swa_window
from services.engine.l3_tier import namespace
from services.models.config import load_config
from services.models.presets import get_preset

# computed with the code before issue 19 (namespace(model, (kv_specs(cfg), window), dtype, page_size))
PINNED = [
    ("mimo-tiny", "bfloat16", 16, "mimo-tiny/1c547b13b578f389"),
    ("mimo-tiny", "float32", 4, "mimo-tiny/b152adafced3f049"),
    ("mimo-v2-flash", "bfloat16", 16, "mimo-v2-flash/adbd63a94653d3ea"),
    ("mimo-v2-flash", "float32", 4, "mimo-v2-flash/6cec6f687af989b3"),
    ("mimo-v2.5", "bfloat16", 16, "mimo-v2.5/b13313b27c480903"),
    ("mimo-v2.5-pro", "float32", 4, "mimo-v2.5-pro/b0550ef2465e2718"),
]


@pytest.mark.parametrize("preset, dtype, page_size, expected", PINNED)
def test_namespace_is_unchanged(preset, dtype, page_size, expected):
    cfg = load_config(get_preset(preset).config())
    assert namespace(preset, cfg.kv_specs, swa_window(cfg), dtype, page_size) == expected


def test_every_input_of_the_bytes_changes_the_namespace():
    cfg = load_config(get_preset("mimo-v2-flash").config())
    specs, window = list(cfg.kv_specs), swa_window(cfg)
    base = namespace("m", specs, window, "bfloat16", 16)
    variants = [
        namespace("m2", specs, window, "bfloat16", 16),
        namespace("m", specs, window + 1, "bfloat16", 16),
        namespace("m", specs, window, "float16", 16),
        namespace("m", specs, window, "bfloat16", 32),
        namespace("m", specs[:-1], window, "bfloat16", 16),
    ]
    for field in ("kv_heads", "k_dim", "v_dim"):
        changed = [dataclasses.replace(specs[0], **{field: getattr(specs[0], field) + 1}), *specs[1:]]
        variants.append(namespace("m", changed, window, "bfloat16", 16))
    full = specs[0]
    flipped = [full, KVLayerSpec("full", specs[1].kv_heads, specs[1].k_dim, specs[1].v_dim), *specs[2:]]
    variants.append(namespace("m", flipped, window, "bfloat16", 16))
    assert len({base, *variants}) == len(variants) + 1
