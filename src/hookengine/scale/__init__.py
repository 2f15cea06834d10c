"""Scale: fanning many independent models out over Ray (distributed training itself
runs on torch.distributed through accelerate and torchrun, not here)."""
