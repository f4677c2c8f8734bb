"""The torch layers: attention (dense and paged backends), MoE, rotary embeddings, the decoder
(`CausalLM`), checkpoint loading into it, and the runner that feeds it a scheduled step."""
