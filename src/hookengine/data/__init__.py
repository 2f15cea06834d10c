"""Datasets with hooks on every level, and aspect-ratio bucketing."""
