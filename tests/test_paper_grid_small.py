"""The paper profile's whole grid at toy size: every one of the 14 (model, loss) rows trains
through the train stage's code into a real MLflow store, and the evaluate and report stages put
each row in the tables (Table VII, the CE-vs-focal ablation and the comparison with
Mini-COVIDNet)."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from pipeline.core.config import compose
from tests.conftest import make_tiny_project

pytestmark = pytest.mark.slow


def test_every_row_of_the_paper_grid_lands_in_mlflow_and_the_tables(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.core.config import load_params
    from pipeline.stages import evaluate, report
    from pipeline.stages.train import run

    params = make_tiny_project(tmp_path, epochs=1, frames_per_source=2)
    paper = compose(["experiment=paper"])
    params["grid"] = paper["grid"]
    params["profile"] = "paper"
    params["evaluate"]["bootstrap"] = 20
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "data" / "published").mkdir()
    (tmp_path / "data" / "published" / "lus_convex.yaml").write_text("rows: {}\n")
    monkeypatch.chdir(tmp_path)
    params = load_params()
    cells = [f"{m}-{l}" for m in params["grid"]["models"] for l in params["grid"]["losses"]]
    assert len(cells) == 14
    for cell in cells:
        model, loss = cell.rsplit("-", 1)
        run(params, model, loss, [0])
    (tmp_path / "data" / "folds" / "table1.csv").write_text("fold\n0\n")
    evaluate.main([])
    report.main([])

    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    found = client.search_runs([exp.experiment_id], max_results=500)
    parents = {r.info.run_id: r.info.run_name for r in found if r.info.run_name in cells}
    assert sorted(parents.values()) == sorted(cells)  # one parent run per row
    children = [r for r in found if r.info.run_name == "fold_0"]
    assert sorted(parents[r.data.tags["mlflow.parentRunId"]] for r in children) == sorted(cells)

    table7 = pd.read_csv(tmp_path / "reports" / "tables" / "table7_accuracy.csv")
    assert sorted(table7["row"]) == sorted(cells)
    ablation = pd.read_csv(tmp_path / "reports" / "tables" / "table8_ablation.csv")
    assert len(ablation) == 7
    page = (tmp_path / "reports" / "README.md").read_text()
    for cell in cells:
        assert cell in page
