"""The runs store of offline sessions (``pipeline.grid.runs_store``, ``merge --store``): merging
results archives into it, the grid's job states, and regenerating the committed GPU reports
(``reports/paper_gpu``, ``reports/pneumoniamnist_gpu_*px``) from their store and archives."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.core.cli import UserError
from pipeline.core.config import compose
from pipeline.grid import runs_store as collect
from tests.conftest import PROJECT_ROOT


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fold_files(acc: float, epochs: int) -> dict[str, str]:
    return {"test_predictions.csv": "frame,y_true,y_pred\nf0,0,0\n",
            "history.csv": "epoch,seconds\n" + "".join(f"{e},2.0\n" for e in range(epochs)),
            "metrics.json": json.dumps({"fold": 0, "best_epoch": 3, "epochs_run": epochs,
                                        "train_seconds": 2.0 * epochs, "metrics": {"accuracy": acc}})}


RESNET_LOG = (
    "x INFO pipeline.stages.train: fold 3 epoch 1/50: train loss 1 acc 0.5 | val loss 1 acc 0.5 | 4.0s\n"
    "x INFO pipeline.stages.train: fold 3 epoch 2/50: train loss 1 acc 0.5 | val loss 1 acc 0.5 | 6.0s\n"
    "x INFO pipeline.stages.train: resnet50-ce: pooled accuracy 0.612 over folds [3] in 10 s\n")


def _session(path: Path, gpu: str, stamp: int, resnet_log: str = RESNET_LOG,
             machine: str | None = None) -> Path:
    """A results archive as ``run-bundle`` writes it (the fold outputs of ``run-bundle``,
    written here by hand: what matters is which of them came back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        _add(tar, "bundle.json", json.dumps({"git_revision": "abc", "jobs": 3}))
        _add(tar, "machine.txt", machine or f"name, memory.total [MiB], driver_version\n{gpu}, 1 MiB, 1\n")
        _add(tar, "jobs.txt", "mini_covidnet ce 0\nmini_covidnet ce 1\nresnet50 ce 3\n")
        for name, text in {**_fold_files(0.75, 10), "best.pt": "weights",
                           "val_predictions.csv": "frame\n"}.items():
            _add(tar, f"models/mini_covidnet-ce/fold_0/{name}", text)
        # Killed while writing its outputs: only the history made it. Must not count as done.
        _add(tar, "models/mini_covidnet-ce/fold_1/history.csv", "epoch,seconds\n0,1.0\n")
        _add(tar, "logs/train_resnet50-ce-3.log", resnet_log)
        _add(tar, "partial/mobilenet_v2-focal-fold_2.csv", "epoch,seconds\n0,5.0\n1,7.0\n")
        _add(tar, "done.txt", f"{stamp} mini_covidnet ce 0 exit 0\n")
        _add(tar, "log.txt", "grid wall: 100s\n")
    return path


def test_sessions_merge_into_the_runs_store_and_every_job_has_a_state(tmp_path):
    runs = tmp_path / "runs"
    sid = collect.ingest(_session(tmp_path / "a.tar", "NVIDIA H200", 1_795_840_000), runs)
    assert sid == "20261128T0426Z_NVIDIA-H200"
    fold = runs / "mini_covidnet-ce" / "fold_0"
    assert sorted(p.name for p in fold.iterdir()) == ["history.csv", "metrics.json", "source.json",
                                                     "test_predictions.csv"]
    assert json.loads((fold / "source.json").read_text()) == {"session": sid, "gpu": "NVIDIA H200"}
    assert not (runs / "mini_covidnet-ce" / "fold_1").exists()
    assert (runs / "sessions" / sid / "logs" / "train_resnet50-ce-3.log").is_file()

    prog = collect.progress(compose(["experiment=paper"]), runs).set_index(["model", "loss", "fold"])
    assert len(prog) == 70
    done = prog.loc[("mini_covidnet", "ce", 0)]
    assert (done["state"], done["epochs"], done["test_accuracy"], done["s_per_epoch"]) == ("done", 10, 0.75, 2.0)
    assert done["precision"] == "bf16 + channels-last"  # a GPU fold from before the record
    assert (done["device"], done["step"]) == ("NVIDIA H200", "eager")  # no cuda_graph record
    costs = collect.session_costs(runs, prog.reset_index())
    assert costs.to_dict("records") == [
        {"session": sid, "device": "NVIDIA H200", "grid seconds": 100, "jobs ended": 1,
         "folds done": 1},
        {"session": "total", "device": "", "grid seconds": 100, "jobs ended": 1, "folds done": 1}]
    log_only = prog.loc[("resnet50", "ce", 3)]
    assert log_only["state"].startswith("finished; outputs not retrieved")
    assert (log_only["test_accuracy"], log_only["epochs"], log_only["s_per_epoch"]) == (0.612, 2, 5.0)
    cut = prog.loc[("mobilenet_v2", "focal", 2)]
    assert (cut["state"], cut["epochs"], cut["s_per_epoch"]) == ("cut off at the deadline", 2, 6.0)
    assert prog.loc[("mini_covidnet", "ce", 1), "state"] == "not run"
    assert (prog["state"] == "not run").sum() == 67

    assert (runs / "sessions" / sid / "partial" / "mobilenet_v2-focal-fold_2.csv").is_file()
    assert (runs / "sessions" / sid / "log.txt").read_text() == "grid wall: 100s\n"

    # A later session that finishes a fold again replaces it, and names itself as its source.
    later = _session(tmp_path / "b.tar", "NVIDIA H100 80GB HBM3", 1_795_900_000)
    sid_b = collect.ingest(later, runs)
    assert json.loads((fold / "source.json").read_text())["session"] == sid_b
    assert sorted(p.name for p in (runs / "sessions").iterdir()) == sorted([sid, sid_b])


@pytest.mark.parametrize("size", [28, 224])
def test_committed_pneumoniamnist_gpu_report_regenerates_from_its_archive(tmp_path, size):
    committed = PROJECT_ROOT / "reports" / f"pneumoniamnist_gpu_{size}px"
    dest = tmp_path / "report"
    from pipeline.grid.__main__ import main

    main(["report-experiment", str(committed / f"pmnist_{size}.tgz"), "--dest", str(dest),
          "--code-rev", "3aa32f9"])
    assert (dest / f"pmnist_{size}.tgz").read_bytes() == (committed / f"pmnist_{size}.tgz").read_bytes()
    assert json.loads((dest / "metrics.json").read_text()) == \
        json.loads((committed / "metrics.json").read_text())
    assert json.loads((dest / "binary_metrics.json").read_text()) == \
        json.loads((committed / "binary_metrics.json").read_text())
    # the archive has no validation scores: the held-out point is said to be unavailable
    page = (dest / "README.md").read_text()
    assert "fitted on test (optimistic, as in the study)" in page
    assert "The archive has no validation predictions" in page
    points = pd.read_csv(dest / "tables" / "binary_operating_points.csv")
    assert points["threshold"].tolist()[1] == "not available"
    table = pd.read_csv(dest / "tables" / "table7_accuracy.csv")
    published = {28: (0.854, 0.944), 224: (0.864, 0.956)}[size]
    assert tuple(table[["published acc.", "published AUC"]].iloc[0]) == published


def test_a_session_run_on_cpu_names_the_cpu(tmp_path):
    """run-bundle on a machine without a GPU writes the CPU on machine.txt's device line."""
    src = _session(tmp_path / "cpu.tar", "", 1_795_840_000,
                   machine="name, memory.total, driver_version\n"
                           "CPU AMD EPYC (2 cores), -, none\ntorch 2\n2\n")
    sid = collect.ingest(src, tmp_path / "runs")
    assert sid == "20261128T0426Z_CPU-AMD-EPYC-2-cores"
    source = tmp_path / "runs" / "mini_covidnet-ce" / "fold_0" / "source.json"
    assert json.loads(source.read_text())["gpu"] == "CPU AMD EPYC (2 cores)"
    row = collect.progress(compose(["experiment=paper"]), tmp_path / "runs").iloc[0]
    assert row["precision"] == "fp32"  # a CPU fold from before the record: fp32
    # A fold that records its precision (train.cpu_amp on a CPU) is shown as recorded.
    metrics = tmp_path / "runs" / "mini_covidnet-ce" / "fold_0" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()),
                                   "precision": {"amp_bf16": True, "channels_last": True}}))
    row = collect.progress(compose(["experiment=paper"]), tmp_path / "runs").iloc[0]
    assert row["precision"] == "bf16 + channels-last"


def test_throughput_table_names_device_step_and_optimizer(tmp_path):
    def result(device: dict, detail: dict, real: float) -> dict:
        return {"device": device, "image_size": 224, "rows": [
            {"model": "mini_covidnet", "batch_size": 16, "real": real, "random": real * 1.1,
             **({"cuda_graph": True} if detail.get("cuda_graph") else {}), "detail": [detail]}]}

    gpu = {"gpu": "NVIDIA H200", "cpu": "Xeon", "cores": 16}
    bf16 = {"amp_bf16": True, "channels_last": True}
    cpu = {"cpu": "AMD EPYC", "cores": 2}
    files = {"throughput.json": result(gpu, bf16, 800.4),  # measured before the optimizer key
             "throughput_graph.json": result(gpu, {**bf16, "optimizer": "adam fused", "cuda_graph": True}, 3000),
             "throughput_cpu.json": result(cpu, {"amp_bf16": False, "channels_last": False}, 2.87)}
    for name, res in files.items():
        (tmp_path / name).write_text(json.dumps(res))
    collect.throughput_table(tmp_path)
    lines = (tmp_path / "throughput_224px.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if "mini_covidnet" in line]
    assert sorted(r[:8] for r in rows) == sorted([
        ["CPU AMD EPYC (2 cores)", "mini_covidnet", "16", "eager", "fp32", "adam", "2.9", "3.2"],
        ["NVIDIA H200", "mini_covidnet", "16", "eager", "bf16 + channels-last", "adam (foreach)", "800", "880"],
        ["NVIDIA H200", "mini_covidnet", "16", "cuda graph", "bf16 + channels-last", "adam fused", "3000", "3300"]])


def test_a_job_rerun_by_a_later_session_keeps_the_log_that_got_furthest(tmp_path):
    runs = tmp_path / "runs"
    sid_a = collect.ingest(_session(tmp_path / "a.tar", "NVIDIA H200", 1_795_840_000), runs)
    # The same job, cut off after 1 epoch.
    later = _session(tmp_path / "b.tar", "CPU AMD EPYC (2 cores)", 1_795_900_000, resnet_log=
                     "x INFO pipeline.stages.train: fold 3 epoch 1/50: train loss 1 acc 0.5 | "
                     "val loss 1 acc 0.5 | 80.0s\n")
    collect.ingest(later, runs)
    row = collect.progress(compose(["experiment=paper"]), runs).set_index(
        ["model", "loss", "fold"]).loc[("resnet50", "ce", 3)]
    assert row["state"].startswith("finished; outputs not retrieved")
    assert (row["session"], row["epochs"], row["test_accuracy"]) == (sid_a, 2, 0.612)


def test_a_row_with_five_folds_is_reported_before_its_other_loss_finishes(tmp_path):
    """The committed runs store with one focal fold of Mini-COVIDNet taken away: Mini-COVIDNet
    leaves the both-losses report, and ``ce_rows/`` reports every model with five cross-entropy
    folds through the real evaluate and report stages, with the same pooled numbers as the
    committed report."""
    committed = PROJECT_ROOT / "reports" / "paper_gpu"
    dest = tmp_path / "paper_gpu"
    shutil.copytree(committed / "runs", dest / "runs")
    shutil.rmtree(dest / "runs" / "mini_covidnet-focal" / "fold_0")
    ce_rows = [c.name.removesuffix("-ce") for c in sorted((dest / "runs").glob("*-ce"))
               if all((c / f"fold_{k}" / "test_predictions.csv").is_file() for k in range(5))]
    assert "mini_covidnet" in ce_rows
    complete = [m for m in json.loads((committed / "run_summary.json").read_text())["complete_models"]
                if m != "mini_covidnet"]
    summary = collect.collect_paper(dest, checkout_folds=tmp_path / "no_checkout_folds")
    assert summary["complete_models"] == complete
    assert sorted(summary["rows_by_loss"]["ce"]) == ce_rows
    assert (dest / "README.md").exists() == bool(complete)
    metrics = json.loads((dest / "ce_rows" / "metrics.json").read_text())
    assert sorted(metrics) == sorted(f"{m}-ce" for m in ce_rows)
    assert metrics["mini_covidnet-ce"] == json.loads((committed / "metrics.json").read_text())["mini_covidnet-ce"]
    page = (dest / "ce_rows" / "README.md").read_text()
    assert "Every model with all five ce folds is reported here" in page
    table = pd.read_csv(dest / "ce_rows" / "tables" / "table7_accuracy.csv")
    assert sorted(table["row"]) == sorted(f"{m}-ce" for m in ce_rows)


def test_the_runs_store_keeps_the_split_its_folds_were_trained_on(tmp_path):
    checkout = tmp_path / "data" / "folds"
    checkout.mkdir(parents=True)
    for name in ("splits.csv", "table1.csv", "summary.json"):
        (checkout / name).write_text(f"{name} v1\n")
    runs = tmp_path / "runs"
    with pytest.raises(UserError, match="run `dvc repro split_folds` first"):
        collect.keep_folds(runs, tmp_path / "absent")
    collect.keep_folds(runs, checkout)  # first time: taken from the checkout
    assert (runs / "folds" / "splits.csv").read_text() == "splits.csv v1\n"
    collect.keep_folds(runs, tmp_path / "absent")  # a fresh clone: the stored split serves
    (checkout / "splits.csv").write_text("splits.csv v2\n")
    with pytest.raises(UserError, match=r"differs from the runs store's split .*\(splits.csv\)"):
        collect.keep_folds(runs, checkout)


def test_merge_with_a_store_adds_folds_of_another_profile_to_the_store_only(tmp_path):
    """A paper-profile session merged into a quick-profile checkout: its folds join the runs
    store and its progress table, and nothing goes into the checkout's models/."""
    from pipeline.grid.merge import merge

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(compose([]), sort_keys=False))
    results = _session(tmp_path / "results.tar", "NVIDIA H200", 1_795_840_000)
    with tarfile.open(results, "a") as tar:
        _add(tar, "params.yaml", yaml.safe_dump(compose(["experiment=paper"]), sort_keys=False))
    store = tmp_path / "paper_gpu"
    shutil.copytree(PROJECT_ROOT / "reports" / "paper_gpu" / "runs" / "folds", store / "runs" / "folds")

    with pytest.raises(UserError, match="--store"):  # without a store: refused, nothing written
        merge(results, project)
    out = merge(results, project, store=store)

    assert out["placed"] == [] and "train" in out["skipped"]["mini_covidnet-ce fold 0"]
    assert not (project / "models").exists()
    assert json.loads((store / "runs" / "mini_covidnet-ce" / "fold_0" / "source.json").read_text()) == \
        {"session": "20261128T0426Z_NVIDIA-H200", "gpu": "NVIDIA H200"}
    prog = pd.read_csv(store / "grid_progress.csv").set_index(["model", "loss", "fold"])
    assert prog.loc[("mini_covidnet", "ce", 0), "state"] == "done"
    assert out["store"]["job_states"]["done"] == 1


def test_weights_come_back_in_float16_for_the_chosen_folds_within_the_budget(tmp_path):
    """``run-bundle --weights-folds 0 --weights-mib M``: fold 0's weights come back in
    float16 while they fit, other folds' not at all; ``merge`` keeps the folds without weights
    in the store only, saying why."""
    import torch

    from pipeline.grid.merge import merge
    from pipeline.grid.offline import FOLD_OUTPUTS, ResultsArchive
    from pipeline.grid.tasks import FoldTask
    from pipeline.models.checkpoint import load_checkpoint, save_checkpoint

    project = tmp_path / "bundle"
    net = torch.nn.Linear(256, 256)  # 257 KiB of float32 weights
    tasks = [FoldTask("mini_covidnet", "ce", 0), FoldTask("mini_covidnet", "ce", 1),
             FoldTask("mini_covidnet", "focal", 0)]
    for t in tasks:
        fold = project / "models" / t.cell / f"fold_{t.fold}"
        save_checkpoint(fold / "best.pt", net, model_cfg={}, classes=["a", "b", "c"], image_size=8)
        for name, text in {**_fold_files(0.7, 3), "val_predictions.csv": "frame\n"}.items():
            (fold / name).write_text(text)
    (project / "train.log").write_text("log\n")
    archive = ResultsArchive(tmp_path / "results.tar", project, weights_folds=[0],
                             weights_mib=0.2)  # one float16 copy (129 KiB) fits, two do not
    for i, t in enumerate(tasks):
        archive.add_record({"task": t, "ok": True, "log": project / "train.log", "cut_off": False,
                            "returncode": 0, "ended": 1_795_840_000 + i, "run_info": {}})
    for name, text in {"bundle.json": json.dumps({"git_revision": "abc", "jobs": 3}),
                       "params.yaml": yaml.safe_dump(compose(["experiment=paper"])),
                       "machine.txt": "name\nNVIDIA H200, 1 MiB, 1\n",
                       "done.txt": "".join(f"{line}\n" for line in archive.done),
                       "weights.txt": "".join(f"{line}\n" for line in archive.weights)}.items():
        archive.add_text(name, text)

    with tarfile.open(archive.path) as tar:
        names = set(tar.getnames())
        weights = tar.extractfile("weights.txt").read().decode().splitlines()
        tar.extract("models/mini_covidnet-ce/fold_0/best.pt", tmp_path / "x", filter="data")
    back = load_checkpoint(tmp_path / "x" / "models/mini_covidnet-ce/fold_0/best.pt")
    assert collect.fold_step({"cuda_graph": {"captured": True, "steps": {"replay": 9}}}) == "cuda graph"
    assert back["weights_dtype"] == "float16" and back["state_dict"]["weight"].dtype == torch.float16
    assert torch.allclose(back["state_dict"]["weight"].float(), net.weight, atol=1e-3)
    assert [n for n in names if n.endswith("best.pt")] == ["models/mini_covidnet-ce/fold_0/best.pt"]
    assert {f"models/mini_covidnet-ce/fold_1/{f}" for f in FOLD_OUTPUTS if f != "best.pt"} <= names
    assert weights[0].startswith("mini_covidnet-ce-0 float16 ")
    assert "fold not in --weights-folds" in weights[1] and "would pass --weights-mib" in weights[2]

    here = tmp_path / "project"  # its ce loss differs: only the focal fold could go to models/
    here.mkdir()
    (here / "params.yaml").write_text(yaml.safe_dump(compose(["experiment=paper",
                                                             "losses.ce.label_smoothing=0.1"])))
    store = tmp_path / "paper_gpu"
    shutil.copytree(PROJECT_ROOT / "reports" / "paper_gpu" / "runs" / "folds",
                    store / "runs" / "folds")
    with pytest.raises(UserError, match="3 folds cannot go into models/"):
        merge(archive.path, here)
    out = merge(archive.path, here, store=store)
    assert out["placed"] == [] and "losses.ce" in out["skipped"]["mini_covidnet-ce fold 0"]
    assert out["skipped"]["mini_covidnet-focal fold 0"] == \
        "its weights did not come back (weights.txt)"
    assert sorted(p.parent.name for p in (store / "runs").glob("*/fold_*/metrics.json")) == \
        ["fold_0", "fold_0", "fold_1"]


def test_a_failed_graph_check_makes_the_trainings_take_eager_steps(tmp_path, monkeypatch):
    """``run-bundle`` on a machine that reports CUDA but whose parity check fails (here: the
    check's process sees no GPU): ``train.cuda_graph`` is turned off in the bundle's
    ``params.yaml`` before any training, and the check's result joins the archive."""
    import torch

    from pipeline.grid.offline import ResultsArchive, check_graphs

    project = tmp_path / "bundle"
    project.mkdir()
    params = compose(["train.cuda_graph=true"])
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    archive = ResultsArchive(tmp_path / "results.tar", project)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this process only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the check's process sees no GPU

    out = check_graphs(project, params, archive)
    assert out["train"]["cuda_graph"] is False
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["cuda_graph"] is False
    with tarfile.open(archive.path) as tar:
        check = json.loads(tar.extractfile("graph_check.json").read())
    assert check == {"ok": False, "why": "no CUDA device"}
