"""The Anima model stack: checkpoint loading, text encoding, the DiT + LLM adapter, the VAE and generation."""
