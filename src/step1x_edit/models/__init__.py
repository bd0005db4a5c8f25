"""Torch modules and weight loading: connector, DiT, VAE, Qwen2.5-VL conditioner. Knows nothing of HTTP."""
