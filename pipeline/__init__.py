"""Reproducible experiment pipeline for lightweight medical-image classifiers.

Layers, each importing only from the ones above it in this list (``tests/test_layout.py``):

``core``        errors and CLI entry (``cli``), params (``config``), file digests, MLflow tracking
                (``tracking``), every stage's results on its training run (``review``)
``data``        dataset adapters (``sources.ADAPTERS``), frame decoding, duplicate linking, loading
``models``      the architectures, checkpoints, complexity
``training``    losses, the optimisation step, the schedule and the epoch loop
``evaluation``  metrics with intervals, Grad-CAM
``deploy``      ONNX/TFLite conversion with parity, the runtime runner the benchmark times
``stages``      one module per ``dvc.yaml`` stage: a thin ``main()`` doing I/O around the library
commands        ``predict`` (new files with a trained run), ``grid`` (many trainings outside DVC),
                ``throughput`` (training speed), run as ``python -m pipeline.<command>``
"""
