"""KV buffers as tensors: the device and host stores, page bytes for L2/L3, layer-wise restore,
and KV export/install for the prefill -> decode transfer."""
