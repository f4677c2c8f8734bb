"""kv_spec: the dtype table against torch's own sizes, the kinds, a layer's bytes against real tensors,
and a payload's layers carrying the payload's window."""

from __future__ import annotations

import random

import pytest
import torch

from services.common.kv_payload import KVMeta
from services.common.kv_spec import (
    DTYPE_ITEMSIZE,
    KVLayerSpec,
    dtype_itemsize,
    dtype_name,
    kv_kind,
    torch_dtype,
)


@pytest.mark.parametrize("name", sorted(DTYPE_ITEMSIZE))
def test_dtype_table_matches_torch(name):
    t = torch_dtype(name)
    assert isinstance(t, torch.dtype) and dtype_name(t) == name
    assert dtype_itemsize(name) == torch.empty((), dtype=t).element_size()


@pytest.mark.parametrize("bad", ["int8", "fp32", "", "torch.float32"])
def test_unknown_dtype_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_itemsize(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        torch_dtype(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_name(torch.int8)


def test_kinds_and_bad_layers():
    assert kv_kind("full") == "full" and kv_kind("swa") == "swa"
    with pytest.raises(ValueError, match="kind must be one of"):
        kv_kind("local")
    with pytest.raises(ValueError, match="kind must be one of"):
        KVLayerSpec("local", 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        KVLayerSpec("full", 0, 8, 8)
    with pytest.raises(ValueError, match="no window"):
        KVLayerSpec("full", 1, 8, 8, window=4)


def test_bytes_per_token_equals_real_tensors():
    rng = random.Random(0)
    for _ in range(20):
        spec = KVLayerSpec(rng.choice(["full", "swa"]), rng.randint(1, 8), rng.randint(1, 64), rng.randint(1, 64))
        name = rng.choice(sorted(DTYPE_ITEMSIZE))
        n = rng.randint(1, 9)
        k = torch.empty(n, spec.kv_heads, spec.k_dim, dtype=torch_dtype(name))
        v = torch.empty(n, spec.kv_heads, spec.v_dim, dtype=torch_dtype(name))
        assert n * spec.bytes_per_token(name) == k.nbytes + v.nbytes


def test_a_payloads_swa_layers_carry_its_window():
    full, swa = KVLayerSpec("full", 4, 8, 8), KVLayerSpec("swa", 2, 8, 8)
    meta = KVMeta("r", 10, 6, "float32", (full, swa))
    assert meta.layers == (full, KVLayerSpec("swa", 2, 8, 8, window=6))
    assert meta == KVMeta("r", 10, 6, "float32", (full, KVLayerSpec("swa", 2, 8, 8, window=6)))
    assert meta.k_shape(1) == (6, 2, 8) and meta.k_shape(0) == (10, 4, 8)
