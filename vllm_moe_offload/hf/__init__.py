"""Hugging Face checkpoints without vLLM: routing read with transformers, tiny models."""
