"""The router's worker channels with the internal token and TLS (services/common/grpc_auth.py).

workers.WorkerClients makes plaintext channels; this is it with the one channel factory every
service uses, so the router's calls carry what the workers' servers require.
"""

from __future__ import annotations

import grpc.aio

from services.common.grpc_auth import internal_aio_channel
from services.router.workers import CHANNEL_OPTIONS, WorkerClients


class SecuredWorkerClients(WorkerClients):
    def _channel(self, addr: str) -> grpc.aio.Channel:
        channel = self._channels.get(addr)
        if channel is None:
            channel = internal_aio_channel(addr, CHANNEL_OPTIONS)
            self._channels[addr] = channel
        return channel
