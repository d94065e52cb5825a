"""``python -m pipeline.grid merge RESULTS.tar [--store DIR]``: an offline run's folds, here.

A fold goes into ``models/<cell>/fold_<k>/`` (with its run record for the cell's ``run.json``)
only when ``params.yaml`` holds the train stage's parameters it was trained with (``seed``,
``train``, ``dataset.classes``, ``models.<model>``, ``losses.<loss>``) and the frames and folds
here are the bundle's: ``dvc commit`` records the current values as the ones the outputs came
from. With ``--store``, every finished fold also joins that runs store, whatever this
checkout's parameters (e.g. paper-profile folds beside a quick-profile checkout).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.cli import UserError
from pipeline.core.config import ConfigError, get, load_params
from pipeline.core.files import audit_inputs
from pipeline.grid.offline import FOLD_OUTPUTS, STAGE_PARAMS, code_digest
from pipeline.grid.tasks import FoldTask, summarize_cells, write_fold_record

log = logging.getLogger("pipeline.grid")

FOLD_MEMBER = re.compile(r"^models/([^/]+)/fold_(\d+)/([^/]+)$")


def finished_folds(tar: tarfile.TarFile) -> dict[tuple[str, int], dict[str, tarfile.TarInfo]]:
    """``(cell, fold) -> {file name: member}`` of the folds whose every output came back (the
    weights, ``best.pt``, may be missing: ``run-bundle --weights-folds/--weights-mib``)."""
    found: dict[tuple[str, int], dict[str, tarfile.TarInfo]] = {}
    for m in tar.getmembers():
        hit = FOLD_MEMBER.match(m.name)
        if m.isfile() and hit and hit.group(3) in FOLD_OUTPUTS:
            found.setdefault((hit.group(1), int(hit.group(2))), {})[hit.group(3)] = m
    return {k: v for k, v in found.items() if set(v) >= set(FOLD_OUTPUTS) - {"best.pt"}}


def read_member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        return tar.extractfile(name).read()  # type: ignore[union-attr]
    except KeyError:
        raise UserError(f"{tar.name}: no {name} in it; is it a results archive of "
                        f"`python -m pipeline.grid run-bundle`?") from None


def param_differences(trained: Mapping, here: Mapping, model: str, loss: str) -> list[str]:
    """The train stage's params of one cell whose values differ between two params dicts."""
    diffs = []
    for key in (k.format(model=model, loss=loss) for k in STAGE_PARAMS):
        try:
            a, b = get(trained, key), get(here, key)
        except ConfigError:
            diffs.append(key)
            continue
        if a != b:
            diffs.append(key)
    return diffs


def check_inputs(results: Path, bundle: Mapping, project: Path, params: Mapping) -> None:
    """Refuse a merge into ``models/`` when the frames or folds differ from the bundle's; warn
    when the code differs (``dvc commit`` records this checkout's code as the folds' deps)."""
    with contextlib.chdir(project):
        inputs = audit_inputs(params)
    if inputs != bundle["audit_inputs"]:
        changed = [k for k in inputs if inputs[k] != bundle["audit_inputs"].get(k)]
        raise UserError(f"{results}: the {' and '.join(changed)} here differ from the ones the "
                        f"folds were trained on; check out the revision the bundle was made at "
                        f"({bundle['git_revision']}) and `dvc checkout`, or merge with --store only")
    if bundle["code_sha256"] != code_digest():
        log.warning("%s was trained with the code of revision %s, not this checkout's "
                    "(pipeline/ differs); `dvc commit` will record this checkout's code",
                    results, bundle["git_revision"])


def place_fold(tar: tarfile.TarFile, project: Path, task: FoldTask,
               members: Mapping[str, tarfile.TarInfo]) -> None:
    """Write one fold's outputs into ``models/<cell>/fold_<k>/`` and keep its run record."""
    fold_dir = project / "models" / task.cell / f"fold_{task.fold}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_dir.mkdir(parents=True)
    for name, member in members.items():
        (fold_dir / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    info = json.loads(read_member(tar, f"models/{task.cell}/fold_{task.fold}.json"))
    write_fold_record(project, task, info)


def merge(results: str | Path, project_dir: str | Path = ".", *,
          store: str | Path | None = None) -> dict[str, Any]:
    """Merge a results archive into ``models/`` (where its parameters match) and ``store``.

    Returns ``{"placed": [...], "skipped": {fold: reason}, "cells": [complete cells],
    "incomplete": [...], "store": summary or None}``.
    """
    results, project = Path(results), Path(project_dir).resolve()
    if not results.is_file():
        raise UserError(f"{results} not found: pass the results.tar that `run.py` wrote")
    params = load_params(project / "params.yaml")
    with tarfile.open(results) as tar:
        bundle = json.loads(read_member(tar, "bundle.json"))
        trained = yaml.safe_load(read_member(tar, "params.yaml"))
        folds = finished_folds(tar)
        if not folds and store is None:
            raise UserError(f"{results} has no finished fold (no models/<cell>/fold_<k>/ with "
                            f"all its outputs; its done.txt and log.txt say why); --store DIR "
                            f"keeps its logs and partial histories in a runs store")
        skipped, ready = {}, []
        for (cell, k), members in sorted(folds.items()):
            model, loss = cell.rsplit("-", 1)
            diffs = param_differences(trained, params, model, loss)
            if diffs:
                skipped[f"{cell} fold {k}"] = f"params.yaml differs in {', '.join(diffs)}"
            elif "best.pt" not in members:
                skipped[f"{cell} fold {k}"] = "its weights did not come back (weights.txt)"
            else:
                ready.append((FoldTask(model, loss, k), members))
        for fold, reason in skipped.items():
            log.warning("%s not put into models/: %s", fold, reason)
        if skipped and store is None:
            raise UserError(f"{results}: {len(skipped)} folds cannot go into models/ "
                            f"({next(iter(skipped.values()))}); compose params.yaml as the "
                            f"bundle's, or merge them into a runs store with --store DIR")
        if ready:
            check_inputs(results, bundle, project, params)
        for task, members in ready:
            place_fold(tar, project, task, members)
        placed = [str(task) for task, _ in ready]
    cells = sorted({f.split(" fold ")[0] for f in placed})
    incomplete = summarize_cells(project, params, cells)
    summary = None
    if store is not None:
        from pipeline.grid.runs_store import collect_paper, ingest

        ingest(results, Path(store) / "runs")
        summary = collect_paper(Path(store), project / get(params, "folds.dir"))
    complete = [c for c in cells if c not in incomplete]
    if complete:
        log.info("now record them: dvc commit -f %s", " ".join(f"train@{c}" for c in complete))
    return {"placed": placed, "skipped": skipped, "cells": complete, "incomplete": incomplete,
            "store": summary}
