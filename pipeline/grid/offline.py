"""The grid on a machine without DVC, MLflow or network: a bundle goes there, one results archive
comes back.

``bundle`` (here) writes one tar: the project code, ``params.yaml``, the frames the folds use
with their manifest, the folds and their audit report, a job list of (model, loss, fold), any
wheels the machine lacks (``--wheels DIR``, e.g. filled with ``pip download -d DIR --no-deps
omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 timm==1.0.31 pytorchcv==0.0.74``; that machine
needs Python with PyTorch, NumPy, pandas, SciPy, scikit-learn, OpenCV, PyYAML and filelock)
and ``run.py``.

``python run.py [--parallel N] [--gpus 0,1] [--deadline S] [--mps] [--throughput ARGS]
[--weights-folds K ...] [--weights-mib M]`` (there) installs the wheels into the bundle, runs
the CUDA-graph parity check when ``train.cuda_graph`` is on (eager steps if it fails), then any
training-throughput benchmark, then trains the jobs with the local backend, MLflow and DVC
imports blocked. Each finished fold is appended to ``results.tar`` as it ends, so a run killed
from outside keeps it: its ``models/<cell>/fold_<k>/`` outputs (weights as ``--weights-*``
allow), its run record and its log. At the end come the per-epoch history of every fold cut
off by the deadline (``partial/``; its resume state stays in the bundle: ``run.py`` again there,
with ``jobs.json`` narrowed to the jobs left, continues it), ``done.txt`` (one line per ended
job), ``weights.txt`` and ``log.txt``.

``merge`` (here) puts the finished folds into ``models/<cell>/`` when ``params.yaml`` holds the
parameters they were trained with, writes the cells' summaries, and with ``--store`` adds them
to a runs store (``pipeline.grid.runs_store``) and regenerates its reports. ``dvc commit`` of
the cells' train stages then records them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.cli import UserError
from pipeline.core.config import apply_overrides, get, load_params
from pipeline.core.files import audit_inputs
from pipeline.grid.backends import run_local
from pipeline.grid.tasks import (
    CODE_ROOT,
    OFFLINE_BLOCKED,
    STAGING_DIR,
    FoldTask,
    check_training_inputs,
    fold_env,
    plan_tasks,
    warm_frame_cache,
)

log = logging.getLogger("pipeline.grid")

# Where the bundle keeps what params.yaml points to, whatever the paths are here.
BUNDLE_PATHS = {"dataset.frames_dir": "data/frames", "folds.dir": "data/folds",
                "audit.report": "reports/audit.json"}
FOLD_OUTPUTS = ("best.pt", "history.csv", "test_predictions.csv", "val_predictions.csv",
                "metrics.json")
# The train stage's params (dvc.yaml) of a cell: merged folds must have been trained with them.
STAGE_PARAMS = ("seed", "train", "dataset.classes", "models.{model}", "losses.{loss}")
RESUME_DIR = Path(".cache/resume")

RUN_PY = '''\
"""Run this grid bundle: python run.py [--parallel N] [--gpus 0,1] [--deadline S] [--mps]
[--out results.tar] (python -m pipeline.grid run-bundle --help lists the options)."""
import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
site = here / ".site"
wheels = sorted(str(p) for p in (here / "wheels").glob("*.whl"))
if wheels and not (site / ".installed").is_file():
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), *wheels], check=True)
    (site / ".installed").write_text("\\n".join(wheels) + "\\n")
path = [str(here), *([str(site)] if wheels else []), os.environ.get("PYTHONPATH", "")]
env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
sys.exit(subprocess.call([sys.executable, "-m", "pipeline.grid", "run-bundle", "--dir", str(here),
                          *sys.argv[1:]], cwd=here, env=env))
'''


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def code_digest(root: Path = CODE_ROOT) -> str:
    """SHA-256 over the package's Python files (names and bytes): which code trained a fold."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted((root / "pipeline").rglob("*.py")):
        h.update(f"{p.relative_to(root)}\n".encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def bundle(project_dir: str | Path, out: str | Path, *, cells: Sequence[str] | None = None,
           folds: Sequence[int] | None = None, wheels: str | Path | None = None) -> dict:
    """Write the bundle tar ``out`` for the grid's tasks (narrowed to ``cells``/``folds``).

    Returns the bundle's ``bundle.json`` record. Raises a ``UserError`` when the folds have not
    passed the audit here (training there would refuse them) or ``wheels`` has no wheel.
    """
    from pipeline.core.tracking import git_revision
    from pipeline.data.loading import used_frames

    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml")
    tasks = plan_tasks(params, cells, folds)
    check_training_inputs(project, params)  # the check training makes there, made here first
    with contextlib.chdir(project):
        inputs = audit_inputs(params)
        revision = git_revision()
    wheel_files = sorted(Path(wheels).glob("*.whl")) if wheels else []
    if wheels and not wheel_files:
        raise UserError(f"--wheels {wheels}: no .whl file there (fill it with `pip download -d "
                        f"{wheels} --no-deps <package>==<version> ...`)")
    frames_dir = project / get(params, "dataset.frames_dir")
    folds_dir = project / get(params, "folds.dir")
    bundled = apply_overrides(params, [f"{k}={v}" for k, v in BUNDLE_PATHS.items()]
                              + ["tracking.required=false"])
    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "git_revision": revision, "code_sha256": code_digest(),
              "audit_inputs": inputs, "jobs": len(tasks),
              "wheels": [p.name for p in wheel_files]}
    top = Path(out).name.split(".")[0]
    frames = list(used_frames(frames_dir)["frame"])
    log.info("bundle %s: %d jobs, %d frames, %d wheels", out, len(tasks), len(frames),
             len(wheel_files))
    with tarfile.open(out, "w") as tar:
        tar.add(CODE_ROOT / "pipeline", f"{top}/pipeline",
                filter=lambda t: None if "__pycache__" in t.name else t)
        _add_bytes(tar, f"{top}/run.py", RUN_PY.encode(), 0o755)
        _add_bytes(tar, f"{top}/params.yaml", yaml.safe_dump(bundled, sort_keys=False).encode())
        _add_bytes(tar, f"{top}/jobs.json", json.dumps(
            [{"model": t.model, "loss": t.loss, "fold": t.fold} for t in tasks], indent=1).encode())
        _add_bytes(tar, f"{top}/bundle.json", json.dumps(record, indent=2).encode())
        # Frame files keep their mtimes: the frame cache keys on them, and the audit on the
        # manifest's and splits' bytes.
        tar.add(frames_dir / "manifest.csv", f"{top}/data/frames/manifest.csv")
        for name in frames:
            tar.add(frames_dir / name, f"{top}/data/frames/{name}")
        tar.add(folds_dir, f"{top}/data/folds")
        tar.add(project / get(params, "audit.report"), f"{top}/reports/audit.json")
        for p in wheel_files:
            tar.add(p, f"{top}/wheels/{p.name}")
    return record


class _BlockImports:
    """A meta-path finder that refuses the offline run's blocked packages."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in OFFLINE_BLOCKED:
            raise ModuleNotFoundError(f"{name} is not used in an offline grid run", name=name)


def machine_text() -> str:
    """``machine.txt``: a header, one line per device (``nvidia-smi``'s GPUs, or ``CPU <model>
    (<n> cores)``), torch's version and the core count."""
    import torch

    from pipeline.deploy.edge_runner import device_info

    host = device_info()
    smi = shutil.which("nvidia-smi")
    lines = None
    if smi and torch.cuda.is_available():
        proc = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                               "--format=csv"], capture_output=True, text=True)
        lines = proc.stdout.strip() if proc.returncode == 0 else None
    if lines is None and torch.cuda.is_available():
        lines = f"name\n{torch.cuda.get_device_name(0)}"
    if lines is None:
        lines = f"name, memory.total, driver_version\nCPU {host['cpu']} ({host['cores']} cores), -, none"
    return f"{lines}\ntorch {torch.__version__}\n{host['cores']}\n"


@contextlib.contextmanager
def mps_daemon(enabled: bool) -> Iterator[bool]:
    """NVIDIA MPS while the trainings run, so the kernels of processes sharing a GPU overlap
    instead of taking turns; yields whether it runs (no GPU or no MPS: plain sharing)."""
    ctl = shutil.which("nvidia-cuda-mps-control") if enabled else None
    started = bool(ctl) and subprocess.run([ctl, "-d"]).returncode == 0
    if enabled and not started:
        log.warning("--mps: nvidia-cuda-mps-control is missing or did not start; GPUs shared "
                    "without MPS")
    try:
        yield started
    finally:
        if started:
            subprocess.run([ctl], input="quit\n", text=True)


class ResultsArchive:
    """``results.tar``, appended to by the worker threads as their folds end.

    ``weights_folds`` (default: every fold) names the folds whose ``best.pt`` comes back; with
    ``weights_mib`` they come back in float16, each while the weights so far fit in that many
    MiB (a device that returns few bytes). A fold without its weights still brings back its
    predictions, history and metrics; ``weights.txt`` lists what came back and what did not.
    """

    def __init__(self, path: Path, project: Path, weights_folds: Sequence[int] | None = None,
                 weights_mib: float | None = None):
        self.path, self.project = path, project
        self.weights_folds = None if weights_folds is None else set(weights_folds)
        self.budget = None if weights_mib is None else int(weights_mib * 2**20)
        self.weights_bytes = 0
        self.lock = threading.Lock()
        self.done: list[str] = []
        self.weights: list[str] = []
        with tarfile.open(path, "w"):
            pass

    def add_text(self, name: str, text: str) -> None:
        with self.lock, tarfile.open(self.path, "a") as tar:
            _add_bytes(tar, name, text.encode())

    def _weights_file(self, task: FoldTask, best: Path) -> Path | None:
        """The file to archive as the fold's ``best.pt``, or None (noted in ``self.weights``)."""
        if self.weights_folds is not None and task.fold not in self.weights_folds:
            self.weights.append(f"{task.name} left out (fold not in --weights-folds)")
            return None
        if self.budget is None:
            self.weights.append(f"{task.name} float32 {best.stat().st_size}")
            return best
        from pipeline.models.checkpoint import half_precision_copy

        half = best.with_name("best.fp16.pt")
        half_precision_copy(best, half)
        size = half.stat().st_size
        if self.weights_bytes + size > self.budget:
            self.weights.append(f"{task.name} left out ({size} bytes in float16 would pass "
                                f"--weights-mib)")
            return None
        self.weights_bytes += size
        self.weights.append(f"{task.name} float16 {size}")
        return half

    def add_record(self, record: dict[str, Any]) -> None:
        """A finished training: its log, and if it succeeded its fold outputs and run record."""
        task: FoldTask = record["task"]
        with self.lock, tarfile.open(self.path, "a") as tar:
            tar.add(record["log"], f"logs/train_{task.name}.log")
            if record["ok"]:
                fold = Path("models") / task.cell / f"fold_{task.fold}"
                for name in FOLD_OUTPUTS:
                    src = self.project / fold / name
                    if name == "best.pt":
                        src = self._weights_file(task, src)
                    if src is not None:
                        tar.add(src, str(fold / name))
                _add_bytes(tar, f"{fold}.json", json.dumps(record["run_info"], indent=2).encode())
            code = "cut off" if record["cut_off"] else record["returncode"]
            self.done.append(f"{int(record['ended'])} {task.model} {task.loss} {task.fold} "
                             f"exit {code}")


def partial_histories(project: Path) -> dict[str, str]:
    """The per-epoch history of every training cut off before it finished (its resume state),
    as ``partial/<cell>-fold_<k>.csv`` texts."""
    import pandas as pd
    import torch

    out = {}
    for f in sorted((project / RESUME_DIR).glob("*/fold_*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["state"]
        out[f"partial/{f.parent.name}-{f.name.split('-')[0]}.csv"] = \
            pd.DataFrame(state["history"]).to_csv(index=False)
    return out


def benchmark_throughput(project: Path, args: Sequence[str], seconds: float,
                         archive: ResultsArchive) -> None:
    """``python -m pipeline.throughput --experiment params <args>`` on the bundle's frames,
    stopped after ``seconds``; its log and ``throughput.json``/``.md`` so far join the results."""
    out = project / STAGING_DIR / "throughput"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.throughput", "--experiment", "params", *args,
           "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=seconds,
                              env=fold_env(os.cpu_count() or 1, None, project))
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as stopped:
        text = "".join(x.decode() if isinstance(x, bytes) else x or ""
                       for x in (stopped.stdout, stopped.stderr))
        text += f"\nstopped after {seconds:.0f} s\n"
        log.warning("throughput benchmark stopped after %.0f s", seconds)
    archive.add_text("throughput.log", text)
    for suffix in (".json", ".md"):
        if out.with_suffix(suffix).is_file():
            archive.add_text(f"throughput{suffix}", out.with_suffix(suffix).read_text())


def check_graphs(project: Path, params: dict[str, Any], archive: ResultsArchive
                 ) -> dict[str, Any]:
    """With ``train.cuda_graph`` on a CUDA machine, run the CUDA-graph parity check
    (``python -m pipeline.training.steps --check``) before any training; if it fails, the
    trainings take eager steps (the bundle's ``params.yaml`` rewritten so, and that is the one
    that comes back). Its result joins the archive as ``graph_check.json``."""
    import torch

    if not (get(params, "train.cuda_graph") and torch.cuda.is_available()):
        return params
    proc = subprocess.run([sys.executable, "-m", "pipeline.training.steps", "--check"],
                          cwd=project, capture_output=True, text=True,
                          env=fold_env(1, None, project))
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"ok": False, "why": (proc.stdout + proc.stderr)[-2000:]}
    archive.add_text("graph_check.json", json.dumps(result, indent=2) + "\n")
    if result.get("ok"):
        log.info("CUDA-graph parity check passed: %s", result)
        return params
    log.warning("CUDA-graph parity check failed (%s): the trainings take eager steps", result)
    params = apply_overrides(params, ["train.cuda_graph=false"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_bundle(bundle_dir: str | Path, *, out: str | Path | None = None, parallel: int = 1,
               gpus: Sequence[str] | None = None, cpus_per_task: int | None = None,
               deadline_s: float | None = None, mps: bool = False,
               throughput: Sequence[str] | None = None, throughput_s: float = 60.0,
               weights_folds: Sequence[int] | None = None, weights_mib: float | None = None
               ) -> list[dict[str, Any]]:
    """Train an unpacked bundle's jobs here with the local backend; write ``results.tar``
    (default: in the bundle). MLflow and DVC cannot be imported meanwhile, in this process and
    in the trainings.

    First comes the CUDA-graph parity check (:func:`check_graphs`), then, with ``throughput``,
    a training-throughput benchmark (``pipeline.throughput`` with those arguments, alone on the
    machine, for at most ``throughput_s`` seconds of the deadline), then the trainings.
    ``weights_folds``/``weights_mib``: which weights come back (:class:`ResultsArchive`).
    """
    sys.meta_path.insert(0, _BlockImports())  # type: ignore[arg-type]
    project = Path(bundle_dir).resolve()
    out = Path(out) if out else project / "results.tar"
    params = load_params(project / "params.yaml")
    tasks = [FoldTask(j["model"], j["loss"], int(j["fold"]))
             for j in json.loads((project / "jobs.json").read_text())]
    started = time.monotonic()
    archive = ResultsArchive(out, project, weights_folds, weights_mib)
    archive.add_text("machine.txt", machine_text())
    params = check_graphs(project, params, archive)
    for name in ("bundle.json", "params.yaml"):
        archive.add_text(name, (project / name).read_text())
    archive.add_text("jobs.txt", "".join(f"{t.model} {t.loss} {t.fold}\n" for t in tasks))
    if throughput is not None:
        benchmark_throughput(project, throughput, throughput_s, archive)
    with contextlib.chdir(project):
        warm_frame_cache(project, params)
    with mps_daemon(mps) as mps_on:
        records = run_local(project, tasks, (), parallel=parallel, gpus=gpus,
                            cpus_per_task=cpus_per_task, offline=True, code_root=project,
                            deadline_s=None if deadline_s is None
                            else deadline_s - (time.monotonic() - started),
                            on_done=archive.add_record)
    for name, text in partial_histories(project).items():
        archive.add_text(name, text)
    ok = sum(r["ok"] for r in records)
    wall = time.monotonic() - started
    archive.add_text("done.txt", "".join(f"{line}\n" for line in archive.done))
    archive.add_text("weights.txt", "".join(f"{line}\n" for line in archive.weights))
    archive.add_text("log.txt", f"grid: {len(tasks)} jobs, {parallel} at a time"
                                f"{' (MPS)' if mps_on else ''}\n{ok} done, "
                                f"{len(records) - ok} failed or cut off, "
                                f"{len(tasks) - len(records)} not started\ngrid wall: {wall:.0f}s\n")
    log.info("results: %s (%d of %d folds done)", out, ok, len(tasks))
    return records
