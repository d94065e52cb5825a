"""``python -m pipeline.grid export-paper --cells ... [--calibration 64 256] [--out DIR]``:
paper-trained fold models through the ``export`` stage's code at their input size.

Run from the root of a paper-profile checkout whose ``models/<cell>/fold_<k>/best.pt`` came
back from a GPU session (``run-bundle --weights-folds``, merged). Every file is checked against
PyTorch on every test frame of its fold (not the stage's ``export.parity_frames`` sample), so
an accuracy change of one frame shows. Full-int8 TFLite is made once per calibration size
(``export.calibration_frames``, frames of the training side of the fold). Writes
``<out>/<cell>-calib<N>.json`` (the stage's ``parity.json`` content) and ``<out>/README.md``,
a table of every JSON in ``<out>`` (so later calls add rows: another cell, a larger calibration).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.cli import UserError
from pipeline.core.config import apply_overrides, get, load_params

COLUMNS = ["row", "fold", "format", "calibration frames", "frames", "max |logit diff|",
           "relative", "tolerance", "top-1 agreement", "PyTorch accuracy",
           "accuracy change (points)", "file MB", "within tolerance"]


def fold_test_frames(params: dict, fold: int) -> int:
    """The number of test frames of ``fold`` in the checkout's split."""
    splits = pd.read_csv(Path(get(params, "folds.dir")) / "splits.csv")
    part = splits[(splits["fold"] == fold) & (splits["split"] == "test")]
    return int(part["frames"].sum())


def export_cell(params: dict, cell: str, calibration: Sequence[int], out: Path,
                full_int8_only: bool = False) -> None:
    """Export every fold model of ``models/<cell>``: in every format of ``export.formats`` with
    the first calibration size (full-int8 alone with ``full_int8_only``), then in full-int8
    once per further calibration size; write ``out/<cell>-calib<N>.json`` per size."""
    from pipeline.models.checkpoint import fold_checkpoints
    from pipeline.stages.export import export_config, export_run, summarize

    checkpoints = fold_checkpoints(Path("models") / cell)
    if not checkpoints:
        raise UserError(f"models/{cell} has no fold_<k>/best.pt: merge a results archive whose "
                        f"weights came back (run-bundle --weights-folds)")
    base = export_config(params)
    frames = max(fold_test_frames(params, k) for k in checkpoints)
    for i, n in enumerate(calibration):
        formats = ["tflite_int8_full"] if i or full_int8_only else list(base["formats"])
        cfg = export_config(apply_overrides(params, [
            f"export.formats=[{','.join(formats)}]", f"export.parity_frames={frames}",
            f"export.calibration_frames={n}", "export.all_formats_folds=null"]))
        with tempfile.TemporaryDirectory() as tmp:
            records, _ = export_run(checkpoints, cfg, Path(tmp), all_formats=True)
        for r in records:
            r.pop("file", None)  # a temporary path
        (out / f"{cell}-calib{n}.json").write_text(json.dumps(
            {"run": cell, "calibration_frames": n, "per_format": summarize(records),
             "records": records}, indent=2) + "\n")


def bf16_check(params: dict, cell: str, out: Path) -> None:
    """PyTorch under bf16 autocast (CPU) against float32 on every test frame of each fold of
    ``models/<cell>``, as a record like an exported file's; writes ``out/<cell>-bf16.json``.
    Folds trained on a GPU with ``train.amp`` take their steps in bf16; this says what the
    same rounding does to their predictions."""
    import torch

    from pipeline.data.loading import load_split_images
    from pipeline.deploy.formats import compare_outputs, torch_logits
    from pipeline.models.checkpoint import fold_checkpoints, load_model

    records = []
    for fold, path in fold_checkpoints(Path("models") / cell).items():
        model, ckpt = load_model(path)
        images, labels = load_split_images(fold, "test", int(ckpt["image_size"]),
                                           fold_test_frames(params, fold), params)
        x = images.float().div(255)
        logits = {}
        for name, bf16 in (("float32", False), ("bf16", True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits[name] = torch_logits(model, x, batch_size=32)
        result = compare_outputs(logits["float32"], logits["bf16"], labels.numpy())
        records.append({"fold": fold, "format": "torch_bf16_autocast",
                        "n_frames": result.pop("n"), **result, "size_bytes": None,
                        "tolerance": None, "passed": True})
    (out / f"{cell}-bf16.json").write_text(json.dumps(
        {"run": cell, "calibration_frames": None, "records": records}, indent=2) + "\n")


def table_rows(out: Path) -> list[dict]:
    """One row per exported file of every ``<cell>-calib<N>.json`` in ``out``, then the
    ``<cell>-bf16.json`` row of each fold."""
    rows = []
    docs = [json.loads(f.read_text()) for f in out.glob("*-calib*.json")]
    docs += [json.loads(f.read_text()) for f in out.glob("*-bf16.json")]
    for doc in sorted(docs, key=lambda d: (d["run"], d["calibration_frames"] is None,
                                           d["calibration_frames"] or 0)):
        for r in doc["records"]:
            rows.append({"row": doc["run"], "fold": r["fold"], "format": r["format"],
                         "calibration frames": doc["calibration_frames"]
                         if r["format"] == "tflite_int8_full" else None,
                         "frames": r["n_frames"], "max |logit diff|": r["max_abs_diff"],
                         "relative": r["rel_max_abs_diff"], "tolerance": r["tolerance"],
                         "top-1 agreement": r["top1_agreement"],
                         "PyTorch accuracy": r["accuracy_torch"],
                         "accuracy change (points)": 100 * r["accuracy_change"],
                         "file MB": r["size_bytes"] / 2**20 if r["size_bytes"] else None,
                         "within tolerance": r["passed"]})
    return rows


def export_paper(cells: Sequence[str], calibration: Sequence[int], out: Path,
                 full_int8_only: bool = False) -> str:
    """Export ``cells`` (run from a paper-profile checkout) into ``out``; regenerate
    ``out/README.md`` from every JSON there (earlier calls' too) and return its text."""
    params = apply_overrides(load_params(), ["tracking.required=false"])
    size = int(get(params, "train.image_size"))
    out.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        export_cell(params, cell, calibration, out, full_int8_only)
        if not full_int8_only:
            bf16_check(params, cell, out)
    return write_readme(out, size)


def write_readme(out: Path, size: int) -> str:
    """``out/README.md``: the table of every JSON in ``out``; returns its text."""
    from pipeline.deploy.edge_runner import device_info

    table = pd.DataFrame(table_rows(out), columns=COLUMNS).to_markdown(index=False,
                                                                       floatfmt=".4g")
    host = device_info()
    text = (f"# Export of paper-trained models at {size} px\n\n"
            "Generated by `python -m pipeline.grid export-paper` from the fold models that came "
            "back from the GPU sessions (`../runs/sessions/*/weights.txt`; float16 weights, "
            "run in float32). Each file against PyTorch (float32, CPU) on every test frame of "
            "its fold: max |logit difference| (relative: over the largest |logit|), top-1 "
            "agreement, and the accuracy change from PyTorch's, in points. Tolerance: the "
            "`export.tolerance` gate of the checkout's `params.yaml` when the file was made "
            "(int8 files are recorded, not gated). Full-int8 (per-channel int8 weights, int8 "
            "activations) is calibrated on training frames of the fold; each calibration size "
            "is one row. `torch_bf16_autocast`: PyTorch itself under bf16 autocast, the "
            "precision of GPU training steps. Machine: "
            f"{host['cpu']} ({host['cores']} cores).\n\n{table}\n")
    (out / "README.md").write_text(text)
    return text
