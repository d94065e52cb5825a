"""Training throughput: images/s per model through the real data path vs random tensors.

``python -m pipeline.throughput [--models ...] [--batch-sizes 16 128] [--out reports/throughput]``
times ``pipeline.training.loop.train_step`` (uint8 frames already on the device, gathered, scaled and
augmented there; channels-last where ``train.channels_last`` says, bf16 autocast on CUDA and on a
CPU with ``train.cpu_amp``)
against the same model fed one pre-made random float batch with no augmentation (the reference
measurement of REFERENCE.md).
The ratio says how much the data path costs. ``--cuda-graph both`` times every model with eager
steps and with the step replayed from a CUDA graph (``train.cuda_graph``, ``pipeline/training/steps.py``);
by default the configuration's setting is used. The optimizer is the train stage's (fused Adam on
CUDA). Results go to ``<out>.json`` and ``<out>.md`` with the device described.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from pipeline.core.config import apply_overrides, compose, get, load_params
from pipeline.training.loop import pick_device, train_step
from pipeline.training.steps import CudaGraphStep, make_adam, optimize_step, precision

log = logging.getLogger("pipeline.throughput")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(params: Mapping, model_name: str, batch_size: int, source: str, steps: int,
            warmup: int, frames: torch.Tensor | None = None, cuda_graph: bool = False) -> dict:
    """Images/s of training steps of one model on ``source`` = ``real`` or ``random``; with
    ``cuda_graph`` (CUDA only) the step is captured once and replayed, the capture and its
    warm-up steps outside the timed steps."""
    from pipeline.models.build import build_model
    from pipeline.training.losses import build_loss

    tcfg = get(params, "train")
    device = pick_device(str(tcfg["device"]))
    amp, cl = precision(tcfg, device)
    size = int(tcfg["image_size"])
    torch.manual_seed(0)
    cfg = dict(get(params, f"models.{model_name}"))
    cfg["pretrained"] = "none"
    model = build_model(cfg, num_classes=3).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    loss_fn = build_loss({"name": "ce"}, num_classes=3).to(device)
    graph_on = cuda_graph and device.type == "cuda"
    opt = make_adam([p for p in model.parameters() if p.requires_grad], 1e-4, (0.9, 0.999), 0.0,
                    device, cuda_graph=graph_on)
    graph = CudaGraphStep(model, loss_fn, opt, batch_size, amp) if graph_on else None
    if graph is not None:
        warmup = max(warmup, graph.warmup + 1)
    gen = torch.Generator().manual_seed(0)
    if source == "real":
        if frames is None:
            raise ValueError("source='real' needs the frames tensor")
        pool = frames.to(device)
        labels = torch.randint(0, 3, (len(pool),), generator=gen).to(device)
    else:
        x_fixed = torch.rand((batch_size, 3, size, size), generator=gen).to(device)
        if cl:
            x_fixed = x_fixed.contiguous(memory_format=torch.channels_last)
        y_fixed = torch.randint(0, 3, (batch_size,), generator=gen).to(device)

    def step() -> None:
        if source == "real":
            idx = torch.randint(0, len(pool), (batch_size,), generator=gen)
            train_step(model, loss_fn, opt, pool[idx], labels[idx], tcfg["augment"], gen, device,
                       amp, cl, graph)
        elif graph is not None:
            graph(x_fixed, y_fixed)
        else:
            optimize_step(model, loss_fn, opt, x_fixed, y_fixed, amp)

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    return {"model": model_name, "source": source, "batch_size": batch_size, "image_size": size,
            "steps": steps, "seconds": seconds, "images_per_s": steps * batch_size / seconds,
            "amp_bf16": amp, "channels_last": cl, "cuda_graph": graph is not None and graph.captured,
            "optimizer": "adam fused" if opt.param_groups[0]["fused"] else "adam"}


def device_info() -> dict:
    """The machine, as the latency benchmark describes it, plus torch and the GPU."""
    from pipeline.deploy.edge_runner import device_info as host_info

    info = {**host_info(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def rate(images_per_s: float) -> float:
    """Images/s as tables show them: whole numbers, one decimal below 10 (CPU rates)."""
    return round(images_per_s) if images_per_s >= 10 else round(images_per_s, 1)


def step_kind(row: Mapping) -> str:
    """``eager`` or ``cuda graph``: how a throughput row's steps ran (older rows: eager)."""
    return "cuda graph" if row.get("cuda_graph") else "eager"


def precision_kind(rec: Mapping) -> str:
    """``bf16 + channels-last``, ``fp32`` ...: the precision and memory format of a record with
    ``amp_bf16`` and ``channels_last`` (a :func:`measure` result, a fold's ``precision``)."""
    return " + ".join(["bf16" if rec.get("amp_bf16") else "fp32",
                       *(["channels-last"] if rec.get("channels_last") else [])])


def to_markdown(result: Mapping) -> str:
    rows = ["| model | batch | step | precision | real data img/s | random img/s | random / real |",
            "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rows.append(f"| {r['model']} | {r['batch_size']} | {step_kind(r)} | {precision_kind(r['detail'][0])} | "
                    f"{rate(r['real'])} | {rate(r['random'])} | {r['random'] / r['real']:.2f} |")
    d = result["device"]
    head = (f"# Training throughput\n\nDevice: {d.get('gpu', 'no GPU')}; CPU {d['cpu']} "
            f"({d['cores']} cores); torch {d['torch']}. Image size {result['image_size']} px; "
            f"precision: bf16 autocast or fp32, channels-last or not (`train.amp`, "
            f"`train.channels_last`; bf16 on a CPU with `train.cpu_amp`). Real = `train_step` on frames of the "
            f"lung-ultrasound dataset held on the device, augmented per image; random = one "
            f"pre-made random batch, no augmentation.\n\n")
    return head + "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 128])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--experiment", default="paper", help="conf/experiment to compose (or 'params' "
                    "to read params.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides")
    ap.add_argument("--cuda-graph", choices=["config", "both"], default="config",
                    help="'config': train.cuda_graph as configured; 'both': every row eager and "
                    "replayed from a CUDA graph (CUDA only)")
    ap.add_argument("--out", default="reports/throughput")
    args = ap.parse_args(argv)
    params = load_params() if args.experiment == "params" else compose([f"experiment={args.experiment}"])
    params = apply_overrides(params, args.set)
    models = args.models or list(get(params, "grid.models"))
    size = int(get(params, "train.image_size"))
    from pipeline.data.loading import FrameStore, interpolation_of, used_frames

    ds = get(params, "dataset")
    frames = used_frames(ds["frames_dir"])
    store = FrameStore(ds["frames_dir"], frames, size, interpolation_of(ds))
    real = store.tensor(list(frames["frame"]))
    rows: list[dict] = []
    result = {"device": device_info(), "image_size": size, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    modes = [False, True] if args.cuda_graph == "both" else [bool(get(params, "train.cuda_graph"))]
    if any(modes) and pick_device(str(get(params, "train.device"))).type != "cuda":
        log.info("CUDA graphs need a CUDA device: eager steps only")
        modes = [False]
    for model in models:
        for bs in args.batch_sizes:
            for graph in modes:
                r = measure(params, model, bs, "real", args.steps, args.warmup, real, graph)
                q = measure(params, model, bs, "random", args.steps, args.warmup, None, graph)
                rows.append({"model": model, "batch_size": bs, "real": r["images_per_s"],
                             "random": q["images_per_s"],
                             "cuda_graph": r["cuda_graph"] and q["cuda_graph"], "detail": [r, q]})
                log.info("%s batch %d, %s: real %.0f img/s, random %.0f img/s", model, bs,
                         step_kind(rows[-1]), r["images_per_s"], q["images_per_s"])
                # Written after every row: a run stopped at a deadline keeps what it measured.
                out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
                out.with_suffix(".md").write_text(to_markdown(result))


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
