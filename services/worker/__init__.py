"""Hosting an engine in a process: the loop thread, engine flags, the serving lifecycle (gRPC,
registration, KV events, L3) and the loop's metrics; used by services/prefill and services/decode."""
