"""The reference PyTorch LLaVA-Rad: trunk, projector, decoder, prompt, checkpoints."""
