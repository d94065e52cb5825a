"""Shared fixtures: small real media files and tiny projects written by the tests, and the real
dataset path."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_LUS = PROJECT_ROOT.parent / "shared" / "datasets" / "covid19_ultrasound" / "data"


def write_video(path: Path, n_frames: int, fps: float, size: int = 48) -> Path:
    """A video whose frame i shows its index as two flat grey halves (i // 28 and i % 28, in
    steps of 8 grey levels, which survive lossy compression)."""
    codec = {".avi": "MJPG", ".mp4": "mp4v"}[path.suffix]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (size, size))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(n_frames):
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:, : size // 2] = 16 + 8 * (i // 28)
        frame[:, size // 2:] = 16 + 8 * (i % 28)
        writer.write(frame)
    writer.release()
    return path


def frame_level_to_index(img: np.ndarray) -> int:
    """Inverse of the ``write_video`` pattern (read away from the edge between the halves)."""
    w = img.shape[1]
    hi = int(round((float(img[:, : w // 2 - 4].mean()) - 16) / 8))
    lo = int(round((float(img[:, w // 2 + 4:].mean()) - 16) / 8))
    return 28 * hi + lo


def natural_image(rng: np.random.Generator, height: int = 96, width: int = 96) -> np.ndarray:
    """A grey image with the 1/f amplitude spectrum of natural images and radiographs: its
    perceptual hash survives resizing and re-encoding (copies within a few bits of 256), and
    two such images are about half the bits apart."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    shape = (height, width // 2 + 1)
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / radius
    img = np.fft.irfft2(spectrum, s=(height, width))
    return ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)


# Four convex files per class, from different patients (the metadata gives each its patient id):
# the real-data subset the end-to-end tests run the pipeline on.
LUS_SUBSET = [
    "pocus_videos/convex/Cov-Atlas-suspectedCovid.mp4",
    "pocus_videos/convex/Cov_combatting_Image1.mp4",
    "pocus_videos/convex/Cov_convex_volpecelli_sonographic_v1.mov",
    "pocus_images/convex/Cov_Oliviera_2020_Fig4A.jpg",
    "pocus_videos/convex/Pneu-Atlas-pneumonia.gif",
    "pocus_videos/convex/Pneu_Avi_Video_001.mp4",
    "pocus_videos/convex/Pneu_liftl_pneu_case3_clip3.mp4",
    "pocus_videos/convex/pneu-radiopaeda.mp4",
    "pocus_videos/convex/Reg-Atlas.gif",
    "pocus_videos/convex/Reg_Avi_Video_001.mp4",
    "pocus_videos/convex/Reg_pat1Image_132943.mpeg",
    "pocus_videos/convex/Reg_pat2Image_133824.mpeg",
]


def copy_lus_subset(shared: Path, dest: Path, files: list[str]) -> str:
    """Copy ``files`` (paths under the shared dataset) to ``dest``; return their checksum list,
    as a user with another mirror of the data would pin it."""
    lines = []
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / rel, dest / rel)
        lines.append(f"{hashlib.sha256((dest / rel).read_bytes()).hexdigest()}  {rel}")
    return "\n".join(lines) + "\n"


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    """Run ``cmd`` in ``cwd`` with the venv's tools first on PATH; its stdout, or a failure
    showing the tail of its output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def write_pinned_source(root: Path) -> Path:
    """A two-file source folder ``root/src`` and its checksum list ``root/sums.sha256``."""
    src = root / "src"
    files = {"dataset_metadata.csv": b"Filename\nCov_a\n", "pocus_videos/convex/Cov_a.mp4": b"v"}
    lines = []
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (root / "sums.sha256").write_text("".join(lines))
    return src


def require_shared_lus() -> Path:
    """The real lung-ultrasound data; missing, the test fails under CI (which always has
    ``../shared``) and skips elsewhere."""
    if not SHARED_LUS.is_dir():
        message = f"real dataset not found at {SHARED_LUS}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must have ../shared beside the checkout")
        pytest.skip(message)
    return SHARED_LUS


@pytest.fixture
def shared_lus() -> Path:
    return require_shared_lus()


CLASSES = ("covid", "pneumonia", "healthy")
PREFIX = {"covid": "Cov", "pneumonia": "Pneu", "healthy": "Reg"}
# Per class: patient 0 is test in fold 0, 1 is val, 2 and 3 train; fold 1 rotates by two.
ROLES = {0: ["test", "val", "train", "train"], 1: ["train", "train", "test", "val"]}


def make_tiny_project(root: Path, *, epochs: int = 3, folds: tuple[int, ...] = (0,),
                      frames_per_source: int = 4, tracking_uri: str | None = None,
                      required: bool = False) -> dict:
    """A project dir with 3 classes x 4 patients x 1 video, its manifest, 2-fold splits,
    params.yaml (32 px images, CPU, no AMP) and the audit report of those folds. Returns the
    params written."""
    from pipeline.core.config import compose  # this module, and must start fast
    from pipeline.stages.audit import main as audit_main  # not at the top: worker processes import

    rng = np.random.default_rng(0)
    frames_dir, folds_dir = root / "data" / "frames", root / "data" / "folds"
    frames_dir.mkdir(parents=True)
    folds_dir.mkdir(parents=True)
    rows, split_rows = [], []
    for label, cls in enumerate(CLASSES):
        for p in range(4):
            source = f"pocus_videos/convex/{PREFIX[cls]}_p{p}.avi"
            patient = f"file:{PREFIX[cls]}_p{p}"
            for i in range(frames_per_source):
                name = f"pocus_videos__convex__{PREFIX[cls]}_p{p}__f{i:05d}.jpg"
                img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                img[:, : 10 + 10 * label] += 120  # a class signal the model can pick up
                cv2.imwrite(str(frames_dir / name), img)
                rows.append({"frame": name, "source": source, "class": cls, "label": label,
                             "probe": "convex", "kind": "video", "patient": patient,
                             "frame_index": i, "time_s": i / 3, "fps": 30.0, "width": 40,
                             "height": 40, "status": "used", "reason": ""})
            for fold, roles in ROLES.items():
                split_rows.append({"fold": fold, "source": source, "patient": patient,
                                   "class": cls, "label": label, "frames": frames_per_source,
                                   "split": roles[p]})
    pd.DataFrame(rows).to_csv(frames_dir / "manifest.csv", index=False)
    pd.DataFrame(split_rows).to_csv(folds_dir / "splits.csv", index=False)
    params = compose([])
    params["dataset"].update(frames_dir="data/frames")
    params["folds"].update(dir="data/folds", k=2)
    params["train"].update(image_size=32, epochs=epochs, batch_size=8, max_frames_per_source=None,
                           folds=list(folds), device="cpu", amp=False, channels_last=False)
    params["tracking"].update(uri=tracking_uri or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                              required=required)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(root):  # the real leakage audit, which training requires
        assert audit_main([]) == 0
    return params


# --- running the project's commands -------------------------------------------------------------

def project_env() -> dict[str, str]:
    """The environment of a project command in a test: one thread (the same reduction order in
    every run, and no fight over the 2 shared cores), the checkout importable, no telemetry."""
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


TRAIN_CMD = [sys.executable, "-m", "pipeline.stages.train", "model=mini_covidnet", "loss=ce", "fold=0"]


def train_in_process(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``TRAIN_CMD`` in this process (no seconds of imports); paths are relative to ``cwd``."""
    from pipeline.core.config import load_params
    from pipeline.stages.train import run as train

    with monkeypatch.context() as m:
        m.chdir(cwd)
        train(load_params(), "mini_covidnet", "ce", [0])


@pytest.fixture
def one_thread():
    """The thread count of the subprocesses (``OMP_NUM_THREADS=1``): CPU kernels may sum in
    another order with another count, and the comparisons are bit for bit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mlflow_state() -> Iterator[None]:
    """Leave MLflow's process-wide state (active runs, tracking URI and the
    ``MLFLOW_TRACKING_URI`` it exports) as it was found."""
    import mlflow

    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# --- a copy of the project on the real-data subset ------------------------------------------------

E2E_SUBSET = [*LUS_SUBSET,
              "pocus_videos/linear/Cov-Atlas-pleural.mp4",  # excluded by the probe selection
              "dataset_metadata.csv"]


def copy_project(dest: Path) -> Path:
    """The project's tracked files, as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (PROJECT_ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / f, dest / f)
    return dest


def edit_yaml(path: Path, **changes) -> None:
    """Set keys of a YAML file; ``a__b=1`` sets ``a.b``."""
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def build_project(base: Path) -> Path:
    """A git repository of the project on the data subset: 2 folds, 32 px, 1 epoch,
    mini_covidnet x {ce, focal}."""
    shared = require_shared_lus()
    # the data subset, with its own checksum list (as a user with another mirror would have)
    data = base / "lus_subset"
    sums = copy_lus_subset(shared, data, E2E_SUBSET)
    proj = copy_project(base / "project")
    (proj / "data" / "subset.sha256").write_text(sums)
    conf = proj / "conf"
    edit_yaml(conf / "dataset" / "lus_convex.yaml", sources=[str(data)],
              checksums="data/subset.sha256", frame_max_side=64, workers=1)
    edit_yaml(conf / "folds" / "patient_kfold.yaml", k=2, val_fraction=0.34)
    edit_yaml(conf / "train" / "quick.yaml", image_size=32, epochs=1, batch_size=8,
              max_frames_per_source=4, folds=[0, 1])
    cfg = yaml.safe_load((conf / "config.yaml").read_text())
    cfg["grid"] = {"models": ["mini_covidnet"], "losses": ["ce", "focal"]}
    cfg["evaluate"]["bootstrap"] = 50
    (conf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    params = run([sys.executable, "-m", "pipeline.core.config"], cwd=proj)
    (proj / "params.yaml").write_text(params)
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "init"], proj)
    return proj
