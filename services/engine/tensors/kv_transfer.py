"""Moving one request's KV out of (prefill) and into (decode) the engine's pools.

Only what the next query needs leaves: every position of full-attention layers, the last `window`
positions of SWA layers (services/common/kv_payload.py has the byte formula).
"""

from __future__ import annotations

import torch

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_spec import dtype_name
from services.engine.kv.req_pages import ReqPages
from services.engine.tensors.kv_store import KVStore


def payload_meta(store: KVStore, rid: str, num_tokens: int, window: int) -> KVMeta:
    return KVMeta(rid=rid, num_tokens=num_tokens, window=window, dtype=dtype_name(store.dtype), layers=tuple(store.specs))


@torch.inference_mode()
def export_kv(store: KVStore, pages: ReqPages, rid: str) -> KVPayload:
    """Copy a request's KV for [0, pages.kv_len) out of the pools (full: all, SWA: the window)."""
    meta = payload_meta(store, rid, pages.kv_len, pages.window)
    full_slots, swa_slots = pages.read_slots()
    device = store.k[0].device if store.k else torch.device("cpu")
    idx = {"full": torch.tensor(full_slots, device=device), "swa": torch.tensor(swa_slots, device=device)}
    ks, vs = [], []
    for i, spec in enumerate(store.specs):
        ks.append(store.k[i].index_select(0, idx[spec.kind]).cpu().contiguous())
        vs.append(store.v[i].index_select(0, idx[spec.kind]).cpu().contiguous())
    return KVPayload(meta, ks, vs)


@torch.inference_mode()
def install_kv(store: KVStore, pages: ReqPages, payload: KVPayload) -> None:
    """Allocate pages for the payload's tokens and write its KV in. Raises OutOfPages, changing nothing."""
    meta = payload.meta
    expected = payload_meta(store, meta.rid, meta.num_tokens, pages.window)
    if meta.layers != expected.layers or meta.window != pages.window:
        raise ValueError(f"KV for {meta.rid} has another model's geometry or window")
    full_slots, swa_slots = pages.install(meta.num_tokens)
    device = store.k[0].device if store.k else torch.device("cpu")
    idx = {"full": torch.tensor(full_slots, device=device), "swa": torch.tensor(swa_slots, device=device)}
    for i, spec in enumerate(store.specs):
        store.k[i].index_copy_(0, idx[spec.kind], payload.k[i].to(device=device, dtype=store.dtype))
        store.v[i].index_copy_(0, idx[spec.kind], payload.v[i].to(device=device, dtype=store.dtype))
