"""Copies of one chest X-ray under different patient ids (byte-identical, re-encoded, resized,
and a chain of three ids) are linked into split groups before the folds are made, the audit then
passes, and with linking off the same data fail the audit with a one-line way out. Training
refuses folds that the audit has not passed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.config import compose
from pipeline.data.loading import AuditError, audited_splits
from pipeline.data.sources import prepare
from pipeline.stages.audit import main as audit_main
from pipeline.stages.split_folds import main as split_main
from tests.conftest import natural_image

N_PATIENTS = 30
# copy of (patient, image index) -> new file under another patient id, and how it was made
COPIES = {"P1": ("P21", "identical"), "P2": ("P22", "jpeg"), "P3": ("P23", "resized"),
          "P4": ("P24", "identical"), "P24": ("P25", "resized")}  # P4 ~ P24 ~ P25: one group


def write_collection(folder: Path) -> None:
    """A public-collection-like folder: images/ + metadata.csv, two images per patient, some
    re-filed under another id as an exact, re-encoded or resized copy."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = []
    for p in range(N_PATIENTS):
        for k in range(2):
            name = f"P{p}_{k}.png"
            cv2.imwrite(str(folder / "images" / name), natural_image(rng, 160, 128))
            rows.append({"image": name, "label": "covid" if p % 3 == 0 else "non_covid",
                         "patient_id": f"P{p}", "finding": ""})
    for src, (dst, how) in COPIES.items():
        original = folder / "images" / f"{src}_0.png"
        img = cv2.imread(str(original), cv2.IMREAD_GRAYSCALE)
        name = f"{dst}_copy." + ("jpg" if how == "jpeg" else "png")
        if how == "identical":
            shutil.copyfile(original, folder / "images" / name)
        elif how == "jpeg":
            cv2.imwrite(str(folder / "images" / name), img, [cv2.IMWRITE_JPEG_QUALITY, 70])
        else:
            cv2.imwrite(str(folder / "images" / name), cv2.resize(img, (96, 120), interpolation=cv2.INTER_AREA))
        label = "covid" if int(dst[1:]) % 3 == 0 else "non_covid"
        rows.append({"image": name, "label": label, "patient_id": dst, "finding": ""})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)


@pytest.fixture
def project(tmp_path, monkeypatch) -> dict:
    """The study-001 experiment's params on the collection, frames extracted; cwd = project."""
    write_collection(tmp_path / "raw")
    params = compose(["experiment=cxr_covid_resnet50"])
    params["dataset"].update(frames_dir="data/frames", workers=1)
    params["folds"].update(dir="data/folds")
    monkeypatch.chdir(tmp_path)
    manifest = prepare(params["dataset"]["kind"], tmp_path / "raw", Path("data/frames"),
                       params["dataset"], strict=True)
    manifest.to_csv("data/frames/manifest.csv", index=False)
    write_params(params)
    return params


def write_params(params: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_copies_link_their_patients_and_the_audit_passes(project):
    split_main([])
    links = json.loads(Path("data/folds/links.json").read_text())
    assert sorted(sorted(g["patients"]) for g in links) == [
        ["meta:P1", "meta:P21"], ["meta:P2", "meta:P22"], ["meta:P23", "meta:P3"],
        ["meta:P24", "meta:P25", "meta:P4"]]
    kinds = {tuple(link["patients"]): link["kinds"] for g in links for link in g["links"]}
    assert kinds[("meta:P1", "meta:P21")] == ["identical"]
    assert kinds[("meta:P2", "meta:P22")] == ["near"] and kinds[("meta:P23", "meta:P3")] == ["near"]
    example = links[0]["links"][0]["examples"][0]
    assert set(example) == {"frames", "sources", "kind", "distance"}
    summary = json.loads(Path("data/folds/summary.json").read_text())
    assert summary["link_duplicates"]["linked_groups"] == 4
    assert summary["link_duplicates"]["linked_patients"] == 9
    assert summary["groups"] == summary["patients"] - 5
    splits = pd.read_csv("data/folds/splits.csv")
    for _, part in splits.groupby("fold"):
        for group in links:
            assert part.loc[part.patient.isin(group["patients"]), "split"].nunique() == 1
    assert audit_main([]) == 0
    assert len(audited_splits(project)) == len(splits)


def test_without_linking_the_audit_fails_with_the_option_to_set(project, capsys):
    project["folds"]["link_duplicates"]["method"] = "off"
    write_params(project)
    split_main([])
    assert json.loads(Path("data/folds/links.json").read_text()) == []
    assert audit_main([]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: audit FAILED: leaks: ")
    assert "identical frame(s)" in last and "folds.link_duplicates.method=perceptual" in last
    assert last.endswith("details in reports/audit.json")
    # the re-encoded and resized copies are listed (a warning while linking is off)
    near = json.loads(Path("reports/audit.json").read_text())["warnings"]["near_duplicates"]
    assert {tuple(p["patients"]) for p in near["pairs"]} >= {("meta:P2", "meta:P22"),
                                                             ("meta:P23", "meta:P3")}
    with pytest.raises(AuditError, match="FAILED the leakage audit"):
        audited_splits(project)

    # exact linking joins the byte-identical copies only
    project["folds"]["link_duplicates"]["method"] = "exact"
    write_params(project)
    split_main([])
    groups = json.loads(Path("data/folds/links.json").read_text())
    assert sorted(sorted(g["patients"]) for g in groups) == [["meta:P1", "meta:P21"],
                                                             ["meta:P24", "meta:P4"]]
    assert audit_main([]) == 0  # near copies: warnings, since exact linking does not promise them
    report = json.loads(Path("reports/audit.json").read_text())
    assert report["warnings"]["near_duplicates"]["patient_pairs"] >= 2


def test_training_refuses_folds_the_audit_has_not_seen(project):
    with pytest.raises(AuditError, match="no leakage audit"):
        split_main([])
        audited_splits(project)
    assert audit_main([]) == 0
    splits = pd.read_csv("data/folds/splits.csv")
    splits.loc[0, "split"] = "test" if splits.loc[0, "split"] != "test" else "train"
    splits.to_csv("data/folds/splits.csv", index=False)
    with pytest.raises(AuditError, match="changed since the audit"):
        audited_splits(project)
