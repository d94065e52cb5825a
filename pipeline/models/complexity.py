"""Model complexity for Table II: parameters, FLOPs, memory, exported file sizes.

Conventions, so the numbers compare with the paper's:

- ``params`` counts every parameter and ``trainable_params`` those with ``requires_grad``;
  BatchNorm running statistics are buffers (Keras counts them as "non-trainable params", so a
  Keras *total* exceeds ``params`` by 2 x the BN channels).
- ``flops`` = 2 x ``macs`` for one forward pass at batch 1, as counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; element-wise
  ops, pooling and activations are not counted, as in most papers' FLOP columns).
- ``activation_bytes`` sums every distinct tensor that a leaf module outputs in one batch-1
  forward pass and ``memory_bytes`` adds the weights: the Keras-style estimate (each layer's
  output kept, float32) behind "memory (MB)" columns. ``peak_activation_bytes`` is the largest
  input + output of a single layer: a lower bound of the working memory a runtime that frees
  tensors needs. A runtime's real footprint is its peak RSS, measured by ``pipeline.stages.benchmark``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> dict:
    """``params`` (all) and ``trainable_params`` (``requires_grad``)."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _sample(model: nn.Module, image_size: int) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.rand(1, 3, image_size, image_size, device=device)


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int) -> dict:
    """``flops`` (= 2 x ``macs``) and ``macs`` of one batch-1 forward pass, eval mode."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(_sample(model, image_size))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    return {"flops": flops, "macs": flops // 2}


def weights_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, at their stored dtypes."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def activation_bytes(model: nn.Module, image_size: int) -> dict:
    """Activation memory of one batch-1 forward pass (see the module docstring).

    Returns:
        ``activation_bytes`` (all distinct leaf outputs, plus the input) and
        ``peak_activation_bytes`` (largest input + output of one leaf module).
    """
    seen: set[int] = set()
    total, peak = 0, 0

    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    def hook(_module, inputs, output):
        nonlocal total, peak
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for t in outputs:
            # In-place activations and Identity/Dropout return the same storage: count it once.
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += nbytes(t)
        peak = max(peak, sum(map(nbytes, inputs)) + sum(map(nbytes, outputs)))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        x = _sample(model, image_size)
        total += nbytes(x)
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"activation_bytes": int(total), "peak_activation_bytes": int(peak)}


def file_sizes(files: Mapping[str, str | Path]) -> dict:
    """``{name: size in bytes}`` of the files that exist (exported models)."""
    return {name: Path(p).stat().st_size for name, p in files.items() if Path(p).is_file()}


def complexity(model: nn.Module, image_size: int,
               files: Mapping[str, str | Path] | None = None) -> dict:
    """Everything Table II needs for one model at its input size.

    Returns:
        params, trainable_params, flops, macs, weights_bytes, activation_bytes,
        peak_activation_bytes, memory_bytes (weights + activations), image_size and, when
        ``files`` is given, file_size_bytes per export format.
    """
    act = activation_bytes(model, image_size)
    result = {"image_size": int(image_size), **count_params(model),
              **count_flops(model, image_size), "weights_bytes": weights_bytes(model), **act}
    result["memory_bytes"] = result["weights_bytes"] + act["activation_bytes"]
    if files is not None:
        result["file_size_bytes"] = file_sizes(files)
    return result
