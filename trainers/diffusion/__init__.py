"""Stable Diffusion LoRA: model builders, training (joint and class modes) and the sampler."""
