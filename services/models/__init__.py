"""Model management: configs (both key spellings), presets, checkpoints, random init, GGUF import,
tokenizers and the model store. Torch only where tensors are read or written; never the engine."""
