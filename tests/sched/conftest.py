"""Scheduler tests: one torch thread each (other suites run next to these)."""

import torch

torch.set_num_threads(1)
