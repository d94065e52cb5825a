"""One module per dvc.yaml stage, run as ``python -m pipeline.stages.<stage>``."""
