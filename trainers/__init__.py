"""Model builders and the distributed training engine (Ray Train + DeepSpeed), shared by the
LoRA, SAM and classifier recipes; ``diffusion/`` holds the Stable Diffusion LoRA and the sampler."""
