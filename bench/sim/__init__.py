"""Simulated workers for cluster-scale benchmarks (docs/bench-sim.md).

A simulated worker serves the real APIs (gRPC prefill / decode, or the HTTP API other routers
expect), keeps the engine's real radix cache, KV pools and scheduler as bookkeeping (no tensors),
and takes its time from a cost model (cost_model.py). Everything it reports is labelled simulated.
"""
