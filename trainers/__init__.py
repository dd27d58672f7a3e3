"""Model builders and the distributed training engine (Ray Train + DeepSpeed)."""
