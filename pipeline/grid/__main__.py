"""``python -m pipeline.grid [COMMAND] ...``: see ``pipeline/grid/__init__.py``.

Commands: (none) train the grid here; ``bundle``, ``run-bundle``, ``merge`` the offline round
trip; ``report-paper``, ``report-experiment`` the committed GPU reports; ``latency``;
``export-paper`` (paper-trained models through the export stage's code).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

COMMANDS = ("bundle", "run-bundle", "merge", "report-paper", "report-experiment", "latency",
            "export-paper")


def _gpus(text: str) -> list[str]:
    """``--gpus 0,1`` -> ["0", "1"]; ``--gpus none`` -> [] (CPU)."""
    return [] if text == "none" else [g.strip() for g in text.split(",") if g.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def _local_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parallel", type=_positive, default=1,
                        help="local: trainings at a time, spread over the GPUs (default 1)")
    parser.add_argument("--gpus", type=_gpus, default=None, metavar="0,1|none",
                        help="local: GPU ids to use (default: every visible GPU)")


def grid_parser() -> argparse.ArgumentParser:
    from pipeline.grid import __doc__ as doc

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.grid", description=doc.split("\n")[0],
        epilog=f"Other commands: {', '.join(COMMANDS)} (each with --help). Further arguments "
               "tracking.KEY=VALUE are passed to every training.")
    parser.add_argument("--backend", choices=("ray", "local"), default="ray")
    parser.add_argument("--address", default="local",
                        help="ray: local (start Ray here; default), auto (the cluster this "
                             "machine joined with `ray start`) or ray://host:port")
    parser.add_argument("--gpus-per-task", type=float, default=None,
                        help="ray: GPUs per training (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-task", type=float, default=None,
                        help="torch threads per training (ray: also its CPU reservation, "
                             "default 1; local: default cores / --parallel)")
    _local_options(parser)
    parser.add_argument("--cells", nargs="+", default=None, metavar="MODEL-LOSS")
    parser.add_argument("--folds", nargs="+", type=int, default=None)
    parser.add_argument("--project-dir", default=".")
    return parser


def train_main(argv: list[str]) -> None:
    from pipeline.grid import run_grid

    # key=value overrides may stand anywhere, also after --folds 0 1 (which argparse would eat).
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = grid_parser().parse_args([a for a in argv if a not in overrides])
    if args.backend == "ray":
        options = {"address": args.address, "gpus_per_task": args.gpus_per_task,
                   "cpus_per_task": args.cpus_per_task or 1.0}
    else:
        options = {"parallel": args.parallel, "gpus": args.gpus,
                   "cpus_per_task": int(args.cpus_per_task) if args.cpus_per_task else None}
    records = run_grid(args.project_dir, backend=args.backend, cells=args.cells,
                       folds=args.folds, overrides=overrides, **options)
    exit_on_failures(records)


def exit_on_failures(records: list[dict], total: int | None = None) -> None:
    """Exit non-zero naming the trainings in ``records`` that failed (of ``total``)."""
    failed = [r for r in records if not r["ok"]]
    if failed:
        sys.exit(f"{len(failed)} of {total or len(records)} trainings failed: "
                 + ", ".join(str(r["task"]) for r in failed))


def bundle_main(argv: list[str]) -> None:
    from pipeline.grid.offline import bundle

    p = argparse.ArgumentParser(prog="python -m pipeline.grid bundle",
                                description="Write a bundle of the grid for an offline machine.")
    p.add_argument("--out", default="grid_bundle.tar")
    p.add_argument("--cells", nargs="+", default=None, metavar="MODEL-LOSS")
    p.add_argument("--folds", nargs="+", type=int, default=None)
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="wheels to install there (pip download -d DIR --no-deps ...)")
    p.add_argument("--project-dir", default=".")
    a = p.parse_args(argv)
    record = bundle(a.project_dir, a.out, cells=a.cells, folds=a.folds, wheels=a.wheels)
    print(json.dumps(record, indent=2))


def run_bundle_main(argv: list[str]) -> None:
    from pipeline.grid.offline import run_bundle

    p = argparse.ArgumentParser(prog="python run.py (python -m pipeline.grid run-bundle)",
                                description="Train an unpacked bundle's jobs on this machine.")
    p.add_argument("--dir", default=".", help="the unpacked bundle (default: here)")
    p.add_argument("--out", default=None, help="results archive (default: <dir>/results.tar)")
    _local_options(p)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop trainings after this long; their partial histories come back")
    p.add_argument("--mps", action="store_true", help="run NVIDIA MPS while training")
    p.add_argument("--throughput", default=None, metavar="'ARGS'",
                   help="first benchmark training throughput: `python -m pipeline.throughput "
                        "ARGS`, e.g. '--models nasnet_mobile --batch-sizes 16 --cuda-graph both'")
    p.add_argument("--throughput-seconds", type=float, default=60.0)
    p.add_argument("--weights-folds", nargs="+", type=int, default=None, metavar="K",
                   help="folds whose best.pt comes back (default: every fold)")
    p.add_argument("--weights-mib", type=float, default=None, metavar="MIB",
                   help="weights come back in float16 while they fit in MIB (default: all, "
                        "float32)")
    a = p.parse_args(argv)
    records = run_bundle(a.dir, out=a.out, parallel=a.parallel, gpus=a.gpus,
                         cpus_per_task=a.cpus_per_task, deadline_s=a.deadline, mps=a.mps,
                         throughput=shlex.split(a.throughput) if a.throughput else None,
                         throughput_s=a.throughput_seconds, weights_folds=a.weights_folds,
                         weights_mib=a.weights_mib)
    exit_on_failures([r for r in records if not r["cut_off"]], len(records))


def merge_main(argv: list[str]) -> None:
    from pipeline.grid.merge import merge

    p = argparse.ArgumentParser(prog="python -m pipeline.grid merge",
                                description="Merge an offline run's results archive here.")
    p.add_argument("results", type=Path)
    p.add_argument("--project-dir", default=".")
    p.add_argument("--store", type=Path, default=None,
                   help="also add the folds to this runs store (e.g. reports/paper_gpu) and "
                        "regenerate its reports")
    a = p.parse_args(argv)
    out = merge(a.results, a.project_dir, store=a.store)
    print(json.dumps({k: v for k, v in out.items() if k != "store"}, indent=2))


def report_main(command: str, argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=f"python -m pipeline.grid {command}")
    if command == "report-paper":
        from pipeline.grid.runs_store import collect_paper

        p.add_argument("--dest", type=Path, default=Path("reports/paper_gpu"))
        out = collect_paper(p.parse_args(argv).dest)
    else:
        from pipeline.grid.archive_report import report_experiment

        p.add_argument("archive", type=Path)
        p.add_argument("--dest", type=Path, required=True)
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
        p.add_argument("--code-rev", default="", help="the commit whose code trained the run")
        a = p.parse_args(argv)
        out = report_experiment(a.archive, a.dest, a.set, a.code_rev)
    print(json.dumps(out, indent=2))


def latency_main(argv: list[str]) -> None:
    from pipeline.grid.latency import latency

    p = argparse.ArgumentParser(prog="python -m pipeline.grid latency")
    p.add_argument("--models", nargs="+", default=["mini_covidnet", "mobilenet_v2"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", type=Path, default=Path("reports/latency_224"))
    a = p.parse_args(argv)
    print(latency(a.models, a.size, a.out))


def export_paper_main(argv: list[str]) -> None:
    from pipeline.grid.paper_export import export_paper

    p = argparse.ArgumentParser(prog="python -m pipeline.grid export-paper",
                                description="Export paper-trained fold models at 224 px.")
    p.add_argument("--cells", nargs="+", required=True, metavar="MODEL-LOSS")
    p.add_argument("--calibration", nargs="+", type=int, default=[64], metavar="N",
                   help="full-int8 calibration frames, one export per size (default: 64)")
    p.add_argument("--full-int8-only", action="store_true",
                   help="full-int8 files alone (more calibration sizes for exported cells)")
    p.add_argument("--out", type=Path, default=Path("reports/paper_gpu/export_224"))
    a = p.parse_args(argv)
    print(export_paper(a.cells, a.calibration, a.out, a.full_int8_only))


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch to the command named first, else train the grid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv[:1] and argv[0] in COMMANDS else ("", argv)
    if command in ("report-paper", "report-experiment"):
        report_main(command, rest)
    else:
        {"": train_main, "bundle": bundle_main, "run-bundle": run_bundle_main,
         "merge": merge_main, "latency": latency_main,
         "export-paper": export_paper_main}[command](rest)


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
