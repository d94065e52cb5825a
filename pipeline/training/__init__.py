"""Training: losses, the optimisation step (eager or CUDA graph), the schedule (early stopping,
plateau, time-based decay), the epoch loop with its resume file, and a fold's data and model."""
