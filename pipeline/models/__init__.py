"""The architectures of the studies, their checkpoints and their complexity."""
