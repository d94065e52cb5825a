"""Turn what the GPU scripts bring back into committed report tables.

    python scripts/collect_gpu_run.py paper [GPU_OUT_DIR ...] [--dest reports/paper_gpu]
    python scripts/collect_gpu_run.py experiment RUN.tgz --dest reports/<name> [--set key=value ...]

``paper``: every GPU_OUT_DIR of ``scripts/gpu_paper_run.sh`` (``results.tar``, or the older
``results.tgz``; ``logs.tgz``, ``machine.txt``, ``done.txt``, ``log.txt``) is first merged into
``<dest>/runs/``, the committed store of every fold trained so far (``<cell>/fold_<k>/`` with a
``source.json`` naming the session and GPU; ``sessions/<id>/`` with that session's logs, partial
histories and benchmark; ``folds/``, the split they were trained on). The grid can thus be
finished over several device sessions. Then: ``grid_progress.md`` lists all 70 (model, loss,
fold) jobs with their state, and the real ``evaluate`` and ``report`` stage code runs on every
model whose two rows have all five folds; where more models have all five folds of one loss, it
runs again on those rows alone, into ``<dest>/<loss>_rows/``.

``experiment``: a ``<tag>.tgz`` of ``scripts/gpu_experiment_run.sh`` (params, per-fold outputs,
log; copied to ``--dest``) is unpacked beside freshly re-run data stages (fetch_data, extract_frames, split_folds: the
same checksummed data, so the same folds), then ``evaluate``, ``binary_eval`` (without t-SNE:
weights do not come back) and ``report`` write ``--dest``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.config import apply_overrides, compose, resolve_path  # noqa: E402
from pipeline.throughput import precision_kind, rate, step_kind  # noqa: E402
from pipeline.stages.train import summarize_cell  # noqa: E402

FOLD_FILES = ("test_predictions.csv", "history.csv", "metrics.json")
FOLD_RE = re.compile(r"models/([^/]+)/fold_(\d+)/([^/]+)$")


def gpu_name(machine_txt: str) -> str:
    """The device of ``gpu_paper_run.sh``'s machine.txt: a GPU name, or ``CPU <model> (<n> cores)``
    where the script trained without a GPU."""
    lines = machine_txt.splitlines()
    return lines[1].split(",")[0].strip() if len(lines) > 1 else "unknown GPU"


def session_id(src: Path, gpu: str) -> str:
    """``<UTC time of the first finished job>_<gpu>``: stable for one output folder."""
    stamps = [int(line.split()[0]) for line in _read(src / "done.txt").splitlines() if line.strip()]
    when = datetime.fromtimestamp(min(stamps), timezone.utc) if stamps else datetime.now(timezone.utc)
    return f"{when:%Y%m%dT%H%MZ}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _archives(src: Path) -> list[tarfile.TarFile]:
    return [tarfile.open(p) for p in (src / "results.tar", src / "results.tgz") if p.is_file()]


def ingest(src: Path, runs: Path) -> str:
    """Merge one GPU output folder into the runs store; return its session id."""
    gpu = gpu_name(_read(src / "machine.txt"))
    sid = session_id(src, gpu)
    sess = runs / "sessions" / sid
    sess.mkdir(parents=True, exist_ok=True)
    for name in ("machine.txt", "log.txt", "done.txt", "jobs.txt", "NOTE.md"):
        if (src / name).is_file():
            shutil.copy(src / name, sess / name)
    folds: dict[tuple[str, str], dict[str, bytes]] = {}
    for tar in _archives(src):
        for m in tar.getmembers():
            if not m.isfile():
                continue
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            hit = FOLD_RE.search(m.name)
            if hit and hit.group(3) in FOLD_FILES:
                folds.setdefault((hit.group(1), hit.group(2)), {})[hit.group(3)] = data
            elif m.name.startswith(("partial/", "jobs.txt", "throughput.")):
                (sess / m.name).parent.mkdir(parents=True, exist_ok=True)
                (sess / m.name).write_bytes(data)
            elif m.name.endswith(".log"):  # the older results.tgz carried the training logs
                (sess / "logs").mkdir(exist_ok=True)
                (sess / "logs" / Path(m.name).name).write_bytes(data)
    for (cell, k), files in sorted(folds.items()):
        if set(files) != set(FOLD_FILES):  # a fold cut off while writing its outputs
            continue
        d = runs / cell / f"fold_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        (d / "source.json").write_text(json.dumps({"session": sid, "gpu": gpu}) + "\n")
    if (src / "logs.tgz").is_file():
        with tarfile.open(src / "logs.tgz") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(".log"):
                    (sess / "logs").mkdir(exist_ok=True)
                    (sess / "logs" / Path(m.name).name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    return sid


LOG_EPOCH = re.compile(r"epoch (\d+)/(\d+): .*\| ([\d.]+)s$")
LOG_DONE = re.compile(r"pooled accuracy ([\d.]+) over folds \[(\d+)\] in (\d+) s")


def fold_precision(metrics: dict, device: str) -> str:
    """How a fold trained: ``bf16 + channels-last`` or ``fp32`` (``metrics.json``'s record;
    folds trained before it was recorded: the paper profile's bf16 + channels-last on a GPU,
    fp32 on a CPU, where the train stage then had no other mode)."""
    gpu = not device.startswith("CPU ")
    return precision_kind(metrics.get("precision") or {"amp_bf16": gpu, "channels_last": gpu})


def progress(params: dict, runs: Path) -> pd.DataFrame:
    """One row per (model, loss, fold) of the grid: done (outputs here), finished but outputs
    lost (the log's result only), cut off at a deadline (epochs reached), or not run."""
    rows = []
    # A job trained by several sessions: the log that finished, else the one that got furthest.
    logs: dict[str, tuple[Path, list[float], re.Match | None]] = {}
    for path in sorted(runs.glob("sessions/*/logs/*.log")):
        text = path.read_text()
        secs = [float(x.group(3)) for x in map(LOG_EPOCH.search, text.splitlines()) if x]
        entry = (path, secs, LOG_DONE.search(text))
        key = path.stem.removeprefix("train_")
        old = logs.get(key)
        if old is None or (entry[2] is not None, len(secs)) >= (old[2] is not None, len(old[1])):
            logs[key] = entry
    partial = {p.stem: p for p in sorted(runs.glob("sessions/*/partial/*.csv"))}
    for m in params["grid"]["models"]:
        for loss in params["grid"]["losses"]:
            for k in range(int(params["folds"]["k"])):
                row = {"model": m, "loss": loss, "fold": k, "state": "not run", "epochs": None,
                       "best_epoch": None, "s_per_epoch": None, "test_accuracy": None,
                       "precision": "", "session": ""}
                d = runs / f"{m}-{loss}" / f"fold_{k}"
                log_entry = logs.get(f"{m}-{loss}-{k}")
                if (d / "test_predictions.csv").is_file():
                    rec = json.loads((d / "metrics.json").read_text())
                    src = json.loads((d / "source.json").read_text())
                    row.update(state="done", epochs=rec["epochs_run"], best_epoch=rec["best_epoch"],
                               s_per_epoch=rec["train_seconds"] / max(rec["epochs_run"], 1),
                               test_accuracy=rec["metrics"]["accuracy"], session=src["session"],
                               precision=fold_precision(rec, src["gpu"]))
                elif log_entry is not None:
                    log_path, secs, done = log_entry
                    row.update(epochs=len(secs), session=log_path.parent.parent.name,
                               s_per_epoch=sum(secs) / len(secs) if secs else None)
                    if done:
                        row.update(state="finished; outputs not retrieved (log only)",
                                   test_accuracy=float(done.group(1)))
                    else:
                        row.update(state="cut off at the deadline")
                elif f"{m}-{loss}-fold_{k}" in partial:
                    h = pd.read_csv(partial[f"{m}-{loss}-fold_{k}"])
                    row.update(state="cut off at the deadline", epochs=len(h),
                               s_per_epoch=float(h["seconds"].mean()),
                               session=partial[f"{m}-{loss}-fold_{k}"].parent.parent.name)
                rows.append(row)
    return pd.DataFrame(rows)


def throughput_table(dest: Path) -> None:
    """``throughput_224px.md``: every training-throughput benchmark at 224 px kept under ``dest``
    (the sessions' and any other ``throughput*.json``), one row per (device, model, batch, step)."""
    rows = []
    for path in sorted([*dest.glob("throughput*.json"), *dest.glob("runs/sessions/*/throughput.json")]):
        res = json.loads(path.read_text())
        if int(res["image_size"]) != 224:
            continue
        for r in res["rows"]:
            d = res["device"]
            rows.append({"device": d.get("gpu") or f"CPU {d.get('cpu', '')} ({d.get('cores', '?')} cores)",
                         "model": r["model"], "batch": r["batch_size"], "step": step_kind(r),
                         "precision": precision_kind(r["detail"][0]),
                         # rows measured before the benchmark used the train stage's fused Adam
                         "optimizer": r["detail"][0].get(
                             "optimizer", "adam (foreach)" if d.get("gpu") else "adam"),
                         "real data img/s": rate(r["real"]), "random img/s": rate(r["random"]),
                         "random / real": round(r["random"] / r["real"], 2),
                         "source": str(path.relative_to(dest))})
    if rows:
        (dest / "throughput_224px.md").write_text(
            "# Training throughput at 224 px, every benchmark run\n\n"
            "`python -m pipeline.throughput` (single process; precision: bf16 autocast or "
            "fp32, channels-last or not): real = `train_step` on lung-ultrasound frames held on the device, "
            "augmented per image; random = one pre-made random batch. Step: eager, or replayed "
            "from a CUDA graph (`train.cuda_graph`). Generated by "
            "`scripts/collect_gpu_run.py paper`.\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


def run_stages(work: Path, stages: list[str], dvc_root: Path = ROOT) -> None:
    """This checkout's stage code in ``work``. ``DVC_ROOT`` is what relative data sources resolve
    against and whose code revision the provenance lines name (this checkout by default)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(dvc_root)}
    for stage in stages:
        subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}"], cwd=work, env=env, check=True)


def retitle(page: Path, text: str) -> None:
    page.write_text(page.read_text().replace(
        "Regenerated by `dvc repro` from the runs of this workspace; do not edit by hand.", text))


def keep_folds(runs: Path, checkout_folds: Path) -> None:
    """The runs store keeps the fold split its folds were trained on (``runs/folds/``, a copy of
    the ``split_folds`` stage's output), so its reports regenerate from the store alone. Taken
    from this checkout the first time; a checkout whose split differs from it is refused."""
    stored = runs / "folds"
    names = ("splits.csv", "table1.csv", "summary.json")
    if stored.is_dir():
        if checkout_folds.is_dir():
            changed = [n for n in names if (checkout_folds / n).read_bytes() != (stored / n).read_bytes()]
            if changed:
                raise SystemExit(f"{checkout_folds} differs from the runs store's split {stored} "
                                 f"({', '.join(changed)}): the stored folds were not trained on "
                                 f"this checkout's folds")
        return
    if not checkout_folds.is_dir():
        raise SystemExit(f"neither {stored} nor {checkout_folds} exists: run `dvc repro "
                         f"split_folds` first")
    stored.mkdir(parents=True)
    for n in names:
        shutil.copy(checkout_folds / n, stored / n)


def collect_paper(sources: list[Path], dest: Path, checkout_folds: Path | None = None) -> dict:
    """Merge device sessions into ``dest/runs`` and redo the reports; ``checkout_folds`` (this
    checkout's ``folds.dir`` by default) must hold the store's split, or not exist."""
    runs = dest / "runs"
    sessions = [ingest(s, runs) for s in sources]
    params = compose(["experiment=paper"])
    keep_folds(runs, checkout_folds or ROOT / params["folds"]["dir"])
    k = int(params["folds"]["k"])
    prog = progress(params, runs)
    prog.to_csv(dest / "grid_progress.csv", index=False)
    counts = prog["state"].value_counts().to_dict()
    (dest / "grid_progress.md").write_text(
        "# Paper grid: state of every (model, loss, fold) job\n\n"
        "Generated by `scripts/collect_gpu_run.py paper` from `runs/` (the fold outputs of every "
        "device session; `runs/sessions/<id>/` holds each session's logs, partial histories, "
        "machine and benchmark). Seconds per epoch were measured with up to 13-14 trainings "
        "sharing the GPU (MPS); a session named after a CPU trained on that CPU, one fold at a "
        "time. Precision: bf16 autocast + channels-last on the GPUs, and on a CPU with "
        "`train.cpu_amp`; fp32 otherwise. \"Log only\": the fold finished but its output files did not "
        "come back from the device; its test accuracy is the one its log printed, and it is "
        "not in the pooled tables.\n\n"
        f"States: {json.dumps(counts)}\n\n" + prog.to_markdown(index=False, floatfmt=".3f") + "\n")
    losses = list(params["grid"]["losses"])
    folds_done = prog[prog["state"] == "done"].groupby(["model", "loss"]).size()
    rows_done = {loss: [m for m in params["grid"]["models"] if folds_done.get((m, loss), 0) == k]
                 for loss in losses}
    complete = [m for m in rows_done[losses[0]] if all(m in rows_done[loss] for loss in losses)]
    # A row (model, loss) with its five folds whose other loss is not finished yet: one report
    # per loss, every such model beside the complete ones, under <dest>/<loss>_rows/.
    by_loss = {loss: rows_done[loss] for loss in losses if len(rows_done[loss]) > len(complete)}
    more = "".join(f"; `{loss}_rows/` reports every model with all five {loss} folds"
                   for loss in by_loss)
    if complete:
        pooled_report(params, runs, complete, losses, dest,
                      f"Only models with all five folds of both losses are reported here{more}")
    for loss in losses:
        sub = dest / f"{loss}_rows"
        if sub.exists():
            shutil.rmtree(sub)
        if loss in by_loss:
            sub.mkdir()
            pooled_report(params, runs, by_loss[loss], [loss], sub,
                          f"Every model with all five {loss} folds is reported here, whether or not "
                          f"its other loss has finished (`../README.md` has the models with both)")
    throughput_table(dest)
    every = sorted(p.name for p in (runs / "sessions").iterdir()) if (runs / "sessions").is_dir() else []
    summary = {"complete_models": complete, "rows_by_loss": by_loss, "job_states": counts, "sessions": every,
               "added_now": sessions,
               "grid_wall": {s: [line for line in _read(runs / "sessions" / s / "log.txt").splitlines()
                                 if "wall" in line] for s in every}}
    (dest / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pooled_report(params: dict, runs: Path, models: list[str], losses: list[str], dest: Path,
                  scope: str) -> None:
    """The ``evaluate`` and ``report`` stage code on the runs store's folds of ``models`` x
    ``losses`` (each with all its folds), written to ``dest`` (README.md, tables/, figures/, ...)."""
    k, classes = int(params["folds"]["k"]), list(params["dataset"]["classes"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gpus = set()
        for m in models:
            for loss in losses:
                cell = work / "models" / f"{m}-{loss}"
                shutil.copytree(runs / f"{m}-{loss}", cell)
                summarize_cell(cell, list(range(k)), classes)
                cell_gpus = sorted({json.loads((cell / f"fold_{i}" / "source.json").read_text())["gpu"]
                                    for i in range(k)})
                gpus.update(cell_gpus)
                (cell / "run.json").write_text(json.dumps({
                    "model": m, "loss": loss, "folds": list(range(k)), "init": "none (from scratch)",
                    "validation": params["folds"]["validation"], "leaky_validation": False,
                    "device": " + ".join(sorted({"cpu" if g.startswith("CPU ") else "cuda" for g in cell_gpus})),
                    "device_name": " + ".join(cell_gpus), "profile": "paper",
                    "image_size": 224, "epochs": 50, "max_frames_per_source": None}, indent=2))
        p = apply_overrides(params, [f"grid.models=[{','.join(models)}]", f"grid.losses=[{','.join(losses)}]"])
        (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        shutil.copytree(runs / "folds", work / p["folds"]["dir"])
        shutil.copytree(ROOT / "data" / "published", work / "data" / "published")
        shutil.copy(ROOT / p["dataset"]["checksums"], work / p["dataset"]["checksums"])
        run_stages(work, ["evaluate", "report"])
        retitle(work / "reports" / "README.md",
                f"Generated by `scripts/collect_gpu_run.py paper` from the folds in `runs/`, "
                f"trained by `scripts/gpu_paper_run.sh` on {' and '.join(sorted(gpus))} (see "
                f"`runs/sessions/`; `grid_progress.md` lists every job of the grid); every model "
                f"trained from scratch (no ImageNet weights offline). {scope}. Training minutes "
                f"per fold were measured with up to 14 trainings sharing the GPU (MPS), one "
                f"process per (model, loss, fold), or on a CPU one fold at a time; the throughput "
                f"tables have the single-process figures.")
        for sub in ("tables", "figures"):
            if (dest / sub).exists():
                shutil.rmtree(dest / sub)
        for item in (work / "reports").iterdir():
            if item.name == "plots":
                continue
            if item.is_dir():
                shutil.copytree(item, dest / item.name)
            else:
                shutil.copy(item, dest / item.name)


def collect_experiment(archive: Path, dest: Path, overrides: list[str], code_rev: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        archived = yaml.safe_load((work / "params.yaml").read_text())
        # Keys the archive predates take today's defaults; its own values win.
        default = compose([f"experiment={archived['profile']}"])
        params = OmegaConf.to_container(OmegaConf.merge(default, archived))
        # The data come from this checkout's sources (the device's path means nothing here);
        # the checksum list makes sure they are the same files.
        sources = [s if "://" in s else str(resolve_path(s, ROOT)) for s in default["dataset"]["sources"]]
        params = apply_overrides(params, [f"dataset.sources={json.dumps(sources)}",
                                          "binary.tsne=false", *overrides])
        device_params = (work / "params.yaml").read_text()
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        checksums = work / params["dataset"]["checksums"]
        checksums.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / params["dataset"]["checksums"], checksums)
        shutil.copytree(ROOT / "data" / "published", work / "data" / "published", dirs_exist_ok=True)
        run_stages(work, ["fetch_data", "extract_frames", "split_folds"], dvc_root=work)
        run_stages(work, ["evaluate", "binary_eval", "report"])
        run_info = {c.name: json.loads((c / "run.json").read_text())
                    for c in sorted((work / "models").iterdir()) if (c / "run.json").is_file()}
        gpu = sorted({r["device_name"] for r in run_info.values()})
        t = params["train"]
        held_out = ("" if any((work / "models").glob("*/fold_*/val_predictions.csv")) else
                    " The archive has no validation predictions (the train stage did not write "
                    "them when this run was made), so the held-out operating point of the "
                    "two-class tables is not available: only the study's point fitted on test "
                    "is; a rerun of `scripts/gpu_experiment_run.sh` with the current code brings "
                    "them back.")
        retitle(work / "reports" / "README.md",
                f"Generated by `scripts/collect_gpu_run.py experiment` from `{archive.name}`, the "
                f"run of `scripts/gpu_experiment_run.sh` (profile {params['profile']}, "
                f"{t['image_size']} px, {t['epochs']} epochs, batch {t['batch_size']}) on one "
                f"{' + '.join(gpu)}{f' with the code of commit {code_rev}' if code_rev else ''}, "
                f"beside other trainings sharing the GPU; `run.log` is its log "
                f"and `params.yaml` the parameters it ran with. No weights came back from the "
                f"device, so there is no t-SNE figure.{held_out}")
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(work / "reports", dest, ignore=shutil.ignore_patterns("plots"))
        (dest / "params.yaml").write_text(device_params)
        shutil.copy(archive, dest / archive.name)  # the raw per-fold outputs, for re-evaluation
        if (work / "run.log").is_file():
            shutil.copy(work / "run.log", dest / "run.log")
        for cell in run_info:
            shutil.copy(work / "models" / cell / "metrics.json", dest / f"metrics_{cell}.json")
            for fold in sorted((work / "models" / cell).glob("fold_*")):
                shutil.copy(fold / "history.csv", dest / f"history_{cell}_{fold.name}.csv")
        return {"cells": list(run_info), "gpu": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("paper")
    p.add_argument("gpu_out", type=Path, nargs="*")
    p.add_argument("--dest", type=Path, default=ROOT / "reports" / "paper_gpu")
    e = sub.add_parser("experiment")
    e.add_argument("archive", type=Path)
    e.add_argument("--dest", type=Path, required=True)
    e.add_argument("--set", nargs="*", default=[])
    e.add_argument("--code-rev", default="", help="the commit whose code trained the run")
    args = ap.parse_args()
    if args.mode == "paper":
        out = collect_paper(args.gpu_out, args.dest)
    else:
        out = collect_experiment(args.archive, args.dest, args.set, args.code_rev)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
