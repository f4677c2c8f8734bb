"""KV transports, prefill -> decode: a small base class plus a registry keyed by name.

    sender = make_sender("grpc" | "shm" | "torch", timeout=60.0)
    sender.send("decode-host:port", payload) -> TransferResult   # or raises KVTransferError
    add_kv_receiver(decode_grpc_server, on_payload)              # the decode worker's side

Importing this package registers the three built-in transports (docs/kv-transfer.md).
"""

from services.common.kv_transport import grpc_stream, shm, torch_dist  # noqa: F401  (register)
from services.common.kv_transport.base import (
    GRPC_OPTIONS,
    KVReceiver,
    KVReceiverService,
    KVSender,
    KVTransferError,
    OnPayload,
    TransferResult,
    add_kv_receiver,
    make_sender,
    register_transport,
    transport_names,
)

__all__ = [
    "GRPC_OPTIONS",
    "KVReceiver",
    "KVReceiverService",
    "KVSender",
    "KVTransferError",
    "OnPayload",
    "TransferResult",
    "add_kv_receiver",
    "make_sender",
    "register_transport",
    "transport_names",
]
