"""Trace replay: send a workload trace's requests at their times to an OpenAI-compatible endpoint.

traces (read Mooncake / Azure files) -> plan (slice, scale) -> prompts (tokens per hash id)
-> runner + client (open-loop schedule, streamed requests) -> figures + report; ideal is the
trace's infinite-cache hit rate. Entry point: bench.replay.main (`swaserve bench replay`).
"""
