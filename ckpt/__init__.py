"""Checkpoint I/O and Hugging Face layouts: safetensors reading, atomic checkpoint writes, HF config and tensor names."""
