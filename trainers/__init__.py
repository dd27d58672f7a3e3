"""Model builders and the distributed training engine (Ray Train + DeepSpeed), shared by the
LoRA, SAM and classifier recipes.

``config`` (EngineConfig, TrainStageConfig), ``tasks`` (the task registry), ``engine`` (the
per-rank loop and the ``TrainTask`` contract), ``launcher`` (``train(cfg)``: the driver),
``checkpoint``, ``optim``; ``diffusion/`` holds the Stable Diffusion LoRA and the sampler."""
