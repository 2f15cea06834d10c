"""Schedulers: learning rates, optimizer groups, layers, models, routines, LoRA."""
