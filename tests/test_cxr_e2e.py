"""Study 001's protocol on a user's own chest X-ray folder, as the README tells a new user to run
it: images + a CSV of path, label, patient id; pin it with --write-checksums; then one
`dvc exp run -S experiment=cxr_covid_resnet50` (shrunk here: 3 folds, 32 px, 1 epoch, no ImageNet
weights offline). The run must land in `dvc exp show`, MLflow, the binary-task outputs and the
report."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import copy_project, natural_image, run

pytestmark = pytest.mark.slow


def write_cxr_folder(folder: Path, n_patients: int = 12, seed: int = 0) -> None:
    """Grey/RGB/RGBA PNG and JPEG images, 2-3 per patient; COVID images are brighter."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = ["image,label,patient_id,finding"]
    for p in range(n_patients):
        covid = p % 3 == 0  # the minority class, as in the study
        for k in range(int(rng.integers(2, 4))):
            base = natural_image(rng, 48, 40) // 2 + (100 if covid else 20)
            ext = ".png" if k % 2 else ".jpg"
            img = base if k == 0 else cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
            if k == 2 and ext == ".png":
                img = cv2.cvtColor(base, cv2.COLOR_GRAY2BGRA)
            name = f"p{p}_{k}{ext}"
            cv2.imwrite(str(folder / "images" / name), img)
            lines.append(f"{name},{'covid' if covid else 'non_covid'},P{p},"
                         f"{'covid' if covid else ('normal' if p % 2 else 'other')}")
    # As in public collections: one image filed again under another patient id, byte for byte
    # (P1 as P20) and re-encoded at another size (P2 as P21).
    shutil.copyfile(folder / "images" / "p1_0.jpg", folder / "images" / "p20_0.jpg")
    img = cv2.imread(str(folder / "images" / "p2_0.jpg"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "images" / "p21_0.png"), cv2.resize(img, (36, 44)))
    lines += ["p20_0.jpg,non_covid,P20,normal", "p21_0.png,non_covid,P21,normal"]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


def project_with_data(tmp_path: Path, name: str, write) -> tuple[Path, Path]:
    """A git copy of the project with the user's data in data/external/<name>, pinned as the
    README says."""
    proj = copy_project(tmp_path / "project")
    data = proj / "data" / "external" / name
    write(data)
    sums = run([sys.executable, "-m", "pipeline.stages.fetch_data", "--write-checksums", str(data)], proj)
    (proj / "data" / "external" / f"{name}.sha256").write_text(sums)
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "init"], proj)
    return proj, data


def exp_run(proj: Path, name: str, overrides: list[str]) -> None:
    args = ["dvc", "exp", "run", "-n", name]
    for o in overrides:
        args += ["-S", o]
    run(args, proj, timeout=1500)


def test_new_user_runs_study_001_on_their_folder(tmp_path):
    proj, data = project_with_data(tmp_path, "cxr_covid", write_cxr_folder)
    overrides = ["experiment=cxr_covid_resnet50", "folds.k=3", "train.folds=[0,1,2]",
                 "folds.val_fraction=0.34", "train.image_size=32", "train.epochs=1",
                 "train.batch_size=8", "models.resnet50.pretrained=none",
                 "models.resnet50.freeze.policy=all", "export.formats=[onnx]",
                 "benchmark.formats=[onnx]", "benchmark.runs=5", "benchmark.warmup=1",
                 "binary.bootstrap=200", "evaluate.bootstrap=50"]  # the experiment's t-SNE stays on
    exp_run(proj, "study001", overrides)

    manifest = (proj / "data/frames/manifest.csv").read_text()
    assert manifest.count("\n") - 1 == len((data / "metadata.csv").read_text().splitlines()) - 1
    splits = (proj / "data/folds/splits.csv").read_text()
    assert "test" in splits
    # the copies under other ids were linked, so the audit passed with no hand edit
    links = json.loads((proj / "data/folds/links.json").read_text())
    assert sorted(sorted(g["patients"]) for g in links) == [["meta:P1", "meta:P20"],
                                                            ["meta:P2", "meta:P21"]]
    assert json.loads((proj / "reports/audit.json").read_text())["ok"]
    binary = json.loads((proj / "reports/binary_metrics.json").read_text())
    op = binary["resnet50-ce"]["operating_point"]
    assert op["sensitivity"] >= 0.973  # the highest threshold that reaches the target
    assert set(binary["resnet50-ce"]["sweep"]) == {"0.15", "0.20", "0.25", "0.30"}
    assert (proj / "reports/binary/resnet50-ce/histogram.png").is_file()
    page = (proj / "reports/README.md").read_text()
    assert "resnet50-ce" in page and "Table VII " in page
    # the two-class section: sweep, both operating points with patient-level intervals, figures
    for k in range(3):  # the train stage kept each fold's validation scores
        assert (proj / f"models/resnet50-ce/fold_{k}/val_predictions.csv").is_file()
    assert "Two-class threshold sweep" in page and "Two-class figures per fold" in page
    assert "fitted on test (optimistic, as in the study)" in page
    assert "held out (threshold chosen on validation, applied to test)" in page
    assert "bootstrap over patients" in page and "± Wald" in page
    for name in ("binary_sweep", "binary_operating_points", "binary_folds"):
        for ext in ("md", "tex", "csv"):
            assert (proj / f"reports/tables/{name}.{ext}").is_file()
    import pandas as pd

    points = pd.read_csv(proj / "reports/tables/binary_operating_points.csv").set_index("row")
    ours = points.loc["resnet50-ce"]
    assert len(ours) == 2 and ours["sensitivity [95% CI]"].str.contains(r"\[").iloc[0]
    assert points.loc["resnet50-ce (published)", "specificity ± Wald"] == "0.982 ± 0.013"
    held = pd.read_csv(proj / "reports/binary/resnet50-ce/held_out_thresholds.csv")
    assert held["n_val"].gt(0).all()  # chosen on validation rows, which every fold has
    if binary["resnet50-ce"]["held_out_point"].get("available", True):
        assert ours["sensitivity [95% CI]"].str.contains(r"\[").all()
    else:  # no fold's validation holds a positive: the page says so instead of a number
        assert "no validation positive" in page
    linked = re.findall(r"\]\(figures/(binary_[^)]+)\)", page)
    assert {f"binary_{k}_resnet50-ce.png" for k in ("roc", "histogram", "tsne")} <= set(linked)
    assert all((proj / "reports/figures" / f).is_file() for f in linked)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], proj))
    names = {r.get("name") for e in shown for x in (e.get("experiments") or []) for r in x.get("revs", [])}
    assert "study001" in names
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cxr_covid")
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 3


def write_folder_layout(folder: Path, seed: int = 1) -> None:
    """Study 002's flow_from_directory layout: train/ val/ test/ x NORMAL/ PNEUMONIA/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        for cls in ("NORMAL", "PNEUMONIA"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(30, 110, (40, 52)).astype(np.uint8) + (90 if cls == "PNEUMONIA" else 0)
                prefix = f"person{i}_bacteria" if cls == "PNEUMONIA" else f"IM-{i:04d}-0001"
                cv2.imwrite(str(folder / split / cls / f"{prefix}_{split}{i}.jpeg"), img)


def test_new_user_runs_study_002_on_a_folder_layout(tmp_path):
    proj, data = project_with_data(tmp_path, "chest_xray", write_folder_layout)
    models = ["mobilenet_v2", "resnet50"]
    overrides = ["experiment=cxr_pneumonia_mobilenetv2", f"grid.models=[{','.join(models)}]",
                 "train.image_size=64", "train.epochs=1", "train.batch_size=8",
                 "export.formats=[onnx]", "benchmark.formats=[onnx]", "benchmark.runs=5",
                 "benchmark.warmup=1", "evaluate.bootstrap=50"]
    for m in models:  # no ImageNet weights offline; the flatten head sees a 2x2 map at 64 px
        overrides += [f"models.{m}.pretrained=none", f"models.{m}.head.feature_map=2"]
    exp_run(proj, "study002", overrides)
    import pandas as pd

    splits = pd.read_csv(proj / "data/folds/splits.csv")
    assert splits["split"].value_counts().to_dict() == {"train": 20, "test": 8, "val": 6}
    assert (splits["source"].str.split("/").str[0] == splits["split"]).all()  # the folders' split
    t7 = (proj / "reports/tables/table7_accuracy.csv").read_text()
    assert all(f"{m}-ce" in t7 for m in models)  # the comparison table has every model
    binary = json.loads((proj / "reports/binary_metrics.json").read_text())
    assert set(binary) == {f"{m}-ce" for m in models}
