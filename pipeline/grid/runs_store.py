"""The paper grid's runs store: every fold trained so far, from any number of offline sessions,
and the reports made from it (``reports/paper_gpu/``).

``<dest>/runs/`` holds ``<cell>/fold_<k>/`` (test predictions, history, metrics, and a
``source.json`` naming the session and its device), ``sessions/<id>/`` (each session's machine,
job list, logs, partial histories, benchmarks) and ``folds/`` (the split the folds were trained
on). ``python -m pipeline.grid merge results.tar --store <dest>`` adds a session;
``python -m pipeline.grid report-paper [--dest <dest>]`` regenerates the reports alone:
``grid_progress.md`` (the state of all 70 (model, loss, fold) jobs), the real ``evaluate`` and
``report`` stages on every model whose two rows have all five folds, the same per loss under
``<dest>/<loss>_rows/`` where a loss has more complete rows, and ``throughput_224px.md``.
"""

from __future__ import annotations

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

from pipeline.core.cli import UserError
from pipeline.core.config import apply_overrides, compose
from pipeline.grid.tasks import CODE_ROOT
from pipeline.throughput import precision_kind, rate, step_kind

STORE_FILES = ("test_predictions.csv", "history.csv", "metrics.json")
FOLD_MEMBER = re.compile(r"^models/([^/]+)/fold_(\d+)/([^/]+)$")
SESSION_FILES = ("machine.txt", "log.txt", "done.txt", "jobs.txt", "bundle.json",
                 "graph_check.json", "weights.txt")
LOG_EPOCH = re.compile(r"epoch (\d+)/(\d+): .*\| ([\d.]+)s$")
LOG_DONE = re.compile(r"pooled accuracy ([\d.]+) over folds \[(\d+)\] in (\d+) s")
GENERATOR = "`python -m pipeline.grid report-paper`"


def gpu_name(machine_txt: str) -> str:
    """The device on ``machine.txt``'s second line: a GPU name, or ``CPU <model> (<n> cores)``."""
    lines = machine_txt.splitlines()
    return lines[1].split(",")[0].strip() if len(lines) > 1 else "unknown GPU"


def session_id(done_txt: str, gpu: str) -> str:
    """``<UTC time of the first finished job>_<device>``: stable for one session."""
    stamps = [int(line.split()[0]) for line in done_txt.splitlines() if line.strip()]
    when = datetime.fromtimestamp(min(stamps), timezone.utc) if stamps else datetime.now(timezone.utc)
    return f"{when:%Y%m%dT%H%MZ}_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"


def ingest(results: Path, runs: Path) -> str:
    """Merge one results archive of ``run-bundle`` into the runs store; return its session id.

    A fold whose outputs are not all there (cut off while writing them) is left out; a fold
    already in the store is replaced, and its ``source.json`` names the new session.
    """
    with tarfile.open(results) as tar:
        files = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tar.getmembers() if m.isfile()}
    text = {n: files.get(n, b"").decode() for n in ("machine.txt", "done.txt")}
    gpu = gpu_name(text["machine.txt"])
    sid = session_id(text["done.txt"], gpu)
    sess = runs / "sessions" / sid
    folds: dict[tuple[str, str], dict[str, bytes]] = {}
    for name, data in files.items():
        hit = FOLD_MEMBER.match(name)
        if hit:
            if hit.group(3) in STORE_FILES:
                folds.setdefault((hit.group(1), hit.group(2)), {})[hit.group(3)] = data
        elif name in SESSION_FILES or name.startswith(("logs/", "partial/", "throughput.")):
            (sess / name).parent.mkdir(parents=True, exist_ok=True)
            (sess / name).write_bytes(data)
    for (cell, k), outputs in sorted(folds.items()):
        if set(outputs) != set(STORE_FILES):
            continue
        d = runs / cell / f"fold_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for name, data in outputs.items():
            (d / name).write_bytes(data)
        (d / "source.json").write_text(json.dumps({"session": sid, "gpu": gpu}) + "\n")
    return sid


def fold_precision(metrics: dict, device: str) -> str:
    """How a fold trained: ``bf16 + channels-last`` or ``fp32`` (``metrics.json``'s record;
    folds trained before it was recorded: bf16 + channels-last on a GPU, fp32 on a CPU)."""
    gpu = not device.startswith("CPU ")
    return precision_kind(metrics.get("precision") or {"amp_bf16": gpu, "channels_last": gpu})


def fold_step(metrics: dict) -> str:
    """``cuda graph`` when the fold's training steps were replayed from a CUDA graph
    (``metrics.json``'s ``cuda_graph`` record), else ``eager``."""
    return "cuda graph" if (metrics.get("cuda_graph") or {}).get("steps", {}).get("replay") \
        else "eager"


def session_logs(runs: Path) -> dict[str, tuple[Path, list[float], re.Match | None]]:
    """Per job (``<model>-<loss>-<fold>``): the log that finished, else the one that got
    furthest, with its epoch seconds and its final line."""
    logs: dict[str, tuple[Path, list[float], re.Match | None]] = {}
    for path in sorted(runs.glob("sessions/*/logs/*.log")):
        text = path.read_text()
        secs = [float(x.group(3)) for x in map(LOG_EPOCH.search, text.splitlines()) if x]
        entry = (path, secs, LOG_DONE.search(text))
        key = path.stem.removeprefix("train_")
        old = logs.get(key)
        if old is None or (entry[2] is not None, len(secs)) >= (old[2] is not None, len(old[1])):
            logs[key] = entry
    return logs


def job_state(runs: Path, m: str, loss: str, k: int, logs: dict, partial: dict) -> dict:
    """One job's row of ``grid_progress``: done, finished but outputs lost (log only), cut off
    at a deadline, or not run."""
    row = {"model": m, "loss": loss, "fold": k, "state": "not run", "epochs": None,
           "best_epoch": None, "s_per_epoch": None, "test_accuracy": None, "device": "",
           "precision": "", "step": "", "session": ""}
    d = runs / f"{m}-{loss}" / f"fold_{k}"
    log_entry = logs.get(f"{m}-{loss}-{k}")
    if (d / "test_predictions.csv").is_file():
        rec = json.loads((d / "metrics.json").read_text())
        src = json.loads((d / "source.json").read_text())
        row.update(state="done", epochs=rec["epochs_run"], best_epoch=rec["best_epoch"],
                   s_per_epoch=rec["train_seconds"] / max(rec["epochs_run"], 1),
                   test_accuracy=rec["metrics"]["accuracy"], session=src["session"],
                   device=src["gpu"], precision=fold_precision(rec, src["gpu"]),
                   step=fold_step(rec))
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
        path = partial[f"{m}-{loss}-fold_{k}"]
        h = pd.read_csv(path)
        row.update(state="cut off at the deadline", epochs=len(h),
                   s_per_epoch=float(h["seconds"].mean()), session=path.parent.parent.name)
    return row


def progress(params: dict, runs: Path) -> pd.DataFrame:
    """One row per (model, loss, fold) of the grid with its state (:func:`job_state`)."""
    logs = session_logs(runs)
    partial = {p.stem: p for p in sorted(runs.glob("sessions/*/partial/*.csv"))}
    return pd.DataFrame([job_state(runs, m, loss, k, logs, partial)
                         for m in params["grid"]["models"] for loss in params["grid"]["losses"]
                         for k in range(int(params["folds"]["k"]))])


def throughput_table(dest: Path) -> None:
    """``throughput_224px.md``: every training-throughput benchmark at 224 px kept under ``dest``
    (the sessions' and any other ``throughput*.json``), one row per (device, model, batch, step)."""
    rows = []
    for path in sorted([*dest.glob("throughput*.json"), *dest.glob("runs/sessions/*/throughput.json")]):
        res = json.loads(path.read_text())
        if int(res["image_size"]) != 224:
            continue
        d = res["device"]
        for r in res["rows"]:
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
            f"from a CUDA graph (`train.cuda_graph`). Generated by {GENERATOR}.\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


def run_stages(work: Path, stages: list[str], dvc_root: Path = CODE_ROOT) -> None:
    """This checkout's stage code in ``work``; the reports' provenance lines name the code
    revision of ``dvc_root``'s git repository (``GIT_DIR``), as a stage run in it would."""
    git_dir = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], cwd=dvc_root,
                             capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(CODE_ROOT), **({"GIT_DIR": git_dir} if git_dir else {})}
    for stage in stages:
        subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}"], cwd=work, env=env,
                       check=True)


def retitle(page: Path, text: str) -> None:
    page.write_text(page.read_text().replace(
        "Regenerated by `dvc repro` from the runs of this workspace; do not edit by hand.", text))


def keep_folds(runs: Path, checkout_folds: Path) -> None:
    """The store keeps the fold split its folds were trained on (``runs/folds/``), so its
    reports regenerate from the store alone. Taken from this checkout the first time; a
    checkout whose split differs from it is refused."""
    stored = runs / "folds"
    names = ("splits.csv", "table1.csv", "summary.json")
    if stored.is_dir():
        if checkout_folds.is_dir():
            changed = [n for n in names if (checkout_folds / n).read_bytes() != (stored / n).read_bytes()]
            if changed:
                raise UserError(f"{checkout_folds} differs from the runs store's split {stored} "
                                f"({', '.join(changed)}): the stored folds were not trained on "
                                f"this checkout's folds")
        return
    if not checkout_folds.is_dir():
        raise UserError(f"neither {stored} nor {checkout_folds} exists: run `dvc repro "
                        f"split_folds` first")
    stored.mkdir(parents=True)
    for n in names:
        shutil.copy(checkout_folds / n, stored / n)


def session_costs(runs: Path, prog: pd.DataFrame) -> pd.DataFrame:
    """One row per session of the store: its device, the seconds its grid ran (``log.txt``),
    the jobs that ended in it and the folds of the store it trained; then a total row."""
    rows = []
    for sess in sorted(p for p in (runs / "sessions").glob("*") if p.is_dir()):
        wall = re.search(r"grid wall: (\d+)s", _read(sess / "log.txt"))
        rows.append({"session": sess.name, "device": gpu_name(_read(sess / "machine.txt")),
                     "grid seconds": int(wall.group(1)) if wall else None,
                     "jobs ended": len(_read(sess / "done.txt").splitlines()),
                     "folds done": int(((prog["session"] == sess.name)
                                        & (prog["state"] == "done")).sum())})
    table = pd.DataFrame(rows, columns=["session", "device", "grid seconds", "jobs ended",
                                        "folds done"])
    total = {"session": "total", "device": "", "grid seconds": table["grid seconds"].sum(),
             "jobs ended": table["jobs ended"].sum(), "folds done": table["folds done"].sum()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def write_progress(dest: Path, prog: pd.DataFrame) -> dict:
    """``grid_progress.csv`` and ``.md`` (with the sessions' costs, :func:`session_costs`);
    returns the count of jobs per state."""
    prog.to_csv(dest / "grid_progress.csv", index=False)
    counts = prog["state"].value_counts().to_dict()
    costs = session_costs(dest / "runs", prog).to_markdown(index=False)
    (dest / "grid_progress.md").write_text(
        "# Paper grid: state of every (model, loss, fold) job\n\n"
        f"Generated by {GENERATOR} from `runs/` (the fold outputs of every "
        "session; `runs/sessions/<id>/` holds each session's logs, partial histories, "
        "machine and benchmark; `runs/README.md` how each ran). Seconds per epoch were measured with up to 13-14 trainings "
        "sharing the GPU (MPS); a session named after a CPU trained on that CPU, one fold at a "
        "time. Precision: bf16 autocast + channels-last on the GPUs, and on a CPU with "
        "`train.cpu_amp`; fp32 otherwise. Step: `cuda graph` when the training steps were "
        "replayed from a CUDA graph (`train.cuda_graph`), else `eager`. \"Log only\": the fold finished but its output files did not "
        "come back from the device; its test accuracy is the one its log printed, and it is "
        "not in the pooled tables.\n\n"
        f"States: {json.dumps(counts)}\n\n" + prog.to_markdown(index=False, floatfmt=".3f")
        + "\n\n## Sessions\n\nGrid seconds: from the start of a session's `run.py` to its "
        "end (`log.txt`); folds done: the store's folds that session trained.\n\n"
        + costs + "\n")
    return counts


def collect_paper(dest: Path, checkout_folds: Path | None = None) -> dict:
    """Regenerate the reports of the runs store ``dest/runs`` into ``dest``; ``checkout_folds``
    (this checkout's paper ``folds.dir`` by default) must hold the store's split, or not exist."""
    runs = dest / "runs"
    params = compose(["experiment=paper"])
    keep_folds(runs, checkout_folds or CODE_ROOT / params["folds"]["dir"])
    k = int(params["folds"]["k"])
    prog = progress(params, runs)
    counts = write_progress(dest, prog)
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
    summary = {"complete_models": complete, "rows_by_loss": by_loss, "job_states": counts,
               "sessions": every,
               "grid_wall": {s: [line for line in _read(runs / "sessions" / s / "log.txt").splitlines()
                                 if "wall" in line] for s in every}}
    (dest / "run_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def stage_cells(params: dict, runs: Path, models: list[str], losses: list[str], work: Path) -> set[str]:
    """Copy the store's cells into ``work/models`` as the train stage leaves them (summary and a
    ``run.json`` naming the devices and the code revisions, from the sessions' ``bundle.json``,
    that trained them); returns the devices."""
    from pipeline.stages.train import summarize_cell

    k, classes = int(params["folds"]["k"]), list(params["dataset"]["classes"])
    devices: set[str] = set()
    for m in models:
        for loss in losses:
            cell = work / "models" / f"{m}-{loss}"
            shutil.copytree(runs / f"{m}-{loss}", cell)
            summarize_cell(cell, list(range(k)), classes)
            sources = [json.loads((cell / f"fold_{i}" / "source.json").read_text())
                       for i in range(k)]
            cell_gpus = sorted({src["gpu"] for src in sources})
            devices.update(cell_gpus)
            bundles = [runs / "sessions" / src["session"] / "bundle.json" for src in sources]
            code = sorted({json.loads(b.read_text()).get("git_revision", "?")[:12]
                           if b.is_file() else "?" for b in bundles})
            (cell / "run.json").write_text(json.dumps({
                "model": m, "loss": loss, "folds": list(range(k)), "init": "none (from scratch)",
                "validation": params["folds"]["validation"], "leaky_validation": False,
                "device": " + ".join(sorted({"cpu" if g.startswith("CPU ") else "cuda" for g in cell_gpus})),
                "device_name": " + ".join(cell_gpus), "profile": "paper",
                "image_size": 224, "epochs": 50, "max_frames_per_source": None,
                "code_revision": " + ".join(code)}, indent=2))
    return devices


def pooled_report(params: dict, runs: Path, models: list[str], losses: list[str], dest: Path,
                  scope: str) -> None:
    """The ``evaluate`` and ``report`` stage code on the runs store's folds of ``models`` x
    ``losses`` (each with all its folds), written to ``dest`` (README.md, tables/, figures/, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        devices = stage_cells(params, runs, models, losses, work)
        p = apply_overrides(params, [f"grid.models=[{','.join(models)}]", f"grid.losses=[{','.join(losses)}]"])
        (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        shutil.copytree(runs / "folds", work / p["folds"]["dir"])
        shutil.copytree(CODE_ROOT / "data" / "published", work / "data" / "published")
        shutil.copy(CODE_ROOT / p["dataset"]["checksums"], work / p["dataset"]["checksums"])
        run_stages(work, ["evaluate", "report"])
        retitle(work / "reports" / "README.md",
                f"Generated by {GENERATOR} from the folds in `runs/`, trained offline on "
                f"{' and '.join(sorted(devices))} (`runs/README.md` says how, "
                f"`runs/sessions/` has each session's logs; `grid_progress.md` lists every job "
                f"of the grid); every model trained from scratch (no ImageNet weights offline). "
                f"{scope}. Training minutes per fold were measured with up to 14 trainings "
                f"sharing the GPU (MPS), one process per (model, loss, fold), or on a CPU one "
                f"fold at a time; the throughput tables have the single-process figures.")
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
