"""Losses and the optimisation step (eager or CUDA graph)."""
