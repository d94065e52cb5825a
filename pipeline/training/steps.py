"""The optimisation step of training, eager or replayed from a CUDA graph.

At the study's batch size of 16 these models are small enough that a training step on a GPU is
bound by kernel launches, not by arithmetic: on an H200, NASNet-A Mobile trains at 107 images/s
with eager steps and 656 with the step replayed from a CUDA graph, Mini-COVIDNet at 807 and
3,625 (``reports/paper_gpu/throughput_224px.md``). ``train.cuda_graph: true`` captures the whole
step (forward under bf16 autocast, loss, backward, fused Adam update) once as a CUDA graph and
replays it for every full batch, following PyTorch's "whole-network capture" recipe
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):

* a few eager warm-up steps on a side stream first (cuDNN autotuning, Adam's state), each a real
  training step on a real batch;
* Adam with ``capturable=True`` and the learning rate held in a device tensor, so a schedule
  changes it in place (:func:`set_lr`) and the replayed update sees the new value;
* the batch is copied into the graph's static input; a batch of another size (the last, partial
  batch of an epoch) takes the eager step, which updates the same parameters and Adam state.

Augmentation stays outside the graph. On a machine without CUDA the key is ignored.

:func:`precision` decides where ``train.amp`` (bf16 autocast) and ``train.channels_last`` apply.
Channels-last applies on every device: oneDNN's channels-last convolutions are faster on a CPU
too, in fp32 (``reports/throughput_cpu_64px_channels_last.md`` against
``reports/throughput_cpu_64px_nchw.md``). Autocast applies on CUDA, and on a CPU only with
``train.cpu_amp``: on a CPU with native bf16 (AVX512-BF16 or AMX), channels-last and bf16
autocast train Mini-COVIDNet and MobileNetV2 at 224 px about 1.6 times as fast as fp32 in NCHW
(``reports/paper_gpu_old_split/throughput_224px.md``), in the same precision as the GPU folds
of the grid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from pipeline.core.config import ConfigError

log = logging.getLogger("pipeline.training.steps")


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively through oneDNN (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision(tcfg: dict, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels-last) of training on ``device``: ``train.channels_last`` applies
    everywhere; ``train.amp`` on CUDA, and on a CPU only with ``train.cpu_amp`` (autocast there
    needs native bf16; emulated bf16 would be slower than fp32)."""
    on = device.type == "cuda" or (device.type == "cpu" and bool(tcfg["cpu_amp"]))
    amp = bool(tcfg["amp"]) and on
    if amp and device.type == "cpu" and not cpu_bf16_supported():
        raise ConfigError("train.cpu_amp=true asks for bf16 autocast on this CPU, which has no "
                          "native bf16 (AVX512-BF16 or AMX): set train.cpu_amp=false, or "
                          "train.amp=false to keep channels-last alone")
    return amp, bool(tcfg["channels_last"])


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float],
              weight_decay: float, device: torch.device, cuda_graph: bool = False
              ) -> torch.optim.Adam:
    """Adam as the train stage uses it: fused on CUDA (one kernel for the whole update instead
    of several per parameter tensor); with ``cuda_graph`` also capturable, its learning rate a
    device tensor."""
    cuda = device.type == "cuda"
    graph = cuda_graph and cuda
    return torch.optim.Adam(params, lr=torch.tensor(lr, device=device) if graph else lr,
                            betas=betas, weight_decay=weight_decay, fused=cuda, capturable=graph)


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every group's learning rate; a tensor learning rate (read by a captured graph) is
    changed in place, so the graph sees it."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def lr_to_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After ``load_state_dict`` of a capturable optimizer: a saved tensor learning rate comes
    back on the CPU; put it on the device the fused update reads it from."""
    for group in optimizer.param_groups:
        if group.get("capturable") and torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


def optimize_step(model: torch.nn.Module, loss_fn: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool,
                  autocast_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (bf16 autocast when ``amp``), loss, backward, update. Returns the detached loss
    and the number of correct predictions, both on the device (no host sync)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp,
                        cache_enabled=autocast_cache):
        logits = model(x)
    loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


class CudaGraphStep:
    """:func:`optimize_step` captured as one CUDA graph for batches of ``batch_size``.

    Call it with an (augmented, on-device) batch; it returns the step's loss and correct count
    as :func:`optimize_step` does. The first ``warmup`` calls are eager steps on a side stream;
    the next captures the graph and replays it; later calls of the same size copy the batch in
    and replay. Other sizes, and every call after a failed capture, take the eager step.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, batch_size: int, amp: bool,
                 warmup: int = 3) -> None:
        if not all(g.get("capturable") for g in optimizer.param_groups):
            raise ValueError("CudaGraphStep needs an optimizer built with capturable=True "
                             "(pipeline.training.steps.make_adam(..., cuda_graph=True))")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.batch_size, self.amp, self.warmup = batch_size, amp, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.calls = {"warmup": 0, "replay": 0, "eager": 0}

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed or len(x) != self.batch_size:
            self.calls["eager"] += 1
            return optimize_step(self.model, self.loss_fn, self.optimizer, x, y, self.amp)
        if self.graph is None and self.calls["warmup"] < self.warmup:
            self.calls["warmup"] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = optimize_step(self.model, self.loss_fn, self.optimizer, x, y, self.amp,
                                    autocast_cache=False)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self._capture(x, y)
            except RuntimeError as err:  # e.g. an op that syncs with the host inside the model
                log.warning("CUDA graph capture failed (%s); eager steps from here on", err)
                self.graph, self.failed = None, True
                self.calls["eager"] += 1
                return optimize_step(self.model, self.loss_fn, self.optimizer, x, y, self.amp)
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.graph.replay()  # type: ignore[union-attr]
        self.calls["replay"] += 1
        return self.static_loss.clone(), self.static_correct.clone()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # The capture records the kernels without running them: the batch it was captured on is
        # trained by the replay that follows.
        self.static_x, self.static_y = x.clone(), y.clone()
        # Gradients set to None, so backward allocates them from the graph's private pool.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp,
                                cache_enabled=False):
                logits = self.model(self.static_x)
            loss = self.loss_fn(logits.float(), self.static_y)
            loss.backward()
            self.optimizer.step()
            self.static_loss = loss.detach()
            self.static_correct = (logits.argmax(1) == self.static_y).sum()
        self.graph = graph
        log.info("training step captured as a CUDA graph (batch %d)", self.batch_size)


def small_net(device: torch.device | str = "cpu") -> torch.nn.Module:
    """Conv, batch-norm, ReLU, pool, linear (3 classes), seeded: the same weights every call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).to(device)


def parity_check(device: torch.device, sizes: tuple[int, ...] = (16,) * 6 + (5,) + (16,) * 2,
                 lr_change_at: int = 4) -> dict:
    """Train two copies of :func:`small_net` on the same random batches, one with eager steps
    and one through :class:`CudaGraphStep`, changing the learning rate at step ``lr_change_at``
    and including a partial batch. Returns the largest difference of losses and of final
    weights and buffers, and the graph step's call counts."""
    eager, graphed = small_net(device), small_net(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt_e = make_adam(eager.parameters(), 1e-3, (0.9, 0.999), 0.0, device)
    opt_g = make_adam(graphed.parameters(), 1e-3, (0.9, 0.999), 0.0, device, cuda_graph=True)
    step = CudaGraphStep(graphed, loss_fn, opt_g, batch_size=max(sizes), amp=False)
    gen = torch.Generator().manual_seed(1)
    loss_diff = 0.0
    for i, n in enumerate(sizes):
        if i == lr_change_at:
            set_lr(opt_e, 1e-4)
            set_lr(opt_g, 1e-4)
        x = torch.rand((n, 3, 12, 12), generator=gen).to(device)
        y = torch.randint(0, 3, (n,), generator=gen).to(device)
        loss_e, _ = optimize_step(eager, loss_fn, opt_e, x, y, amp=False)
        loss_g, _ = step(x, y)
        loss_diff = max(loss_diff, float((loss_e - loss_g).abs()))
    weight_diff = max(float((a.float() - b.float()).abs().max())
                      for a, b in zip(eager.state_dict().values(), graphed.state_dict().values()))
    return {"captured": step.captured, "failed": step.failed, "calls": dict(step.calls),
            "max_loss_diff": loss_diff, "max_weight_diff": weight_diff,
            "lr": current_lr(opt_g)}


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.training.steps --check``: run :func:`parity_check` on the GPU; exit 1 unless
    the step was captured and replays train to the eager weights (within 1e-5)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="CUDA-graph training step: parity check")
    ap.add_argument("--check", action="store_true", required=True)
    ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "why": "no CUDA device"}))
        return 1
    torch.backends.cudnn.deterministic = True
    result = parity_check(torch.device("cuda"))
    result["ok"] = bool(result["captured"] and result["max_weight_diff"] < 1e-5
                        and result["max_loss_diff"] < 1e-5)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
