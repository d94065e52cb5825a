"""Time `dvc repro` per stage on a fresh clone: the benchmark behind the default run's budget.

    python scripts/time_repro.py [--rev HEAD] [--out reports/repro_times.json]

Clones the checkout's revision into a temporary folder (``../shared`` linked beside it, the
checkout's ``.venv`` reused), runs ``dvc repro`` there, stamps each line of its output as it
arrives, and charges the time between one "Running stage" line and the next to that stage. A
second ``dvc repro`` (nothing changed) gives the no-op time. Writes JSON with the host and
revision, and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.deploy.edge_runner import cpu_model, vector_extensions

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
SKIP_LINE = re.compile(r"Stage '([^']+)' didn't change, skipping")


def timed_repro(cwd: Path, env: dict) -> tuple[dict[str, float], list[str], float]:
    """Seconds per stage run, the stages DVC skipped (unchanged since ``dvc.lock``, their
    outputs in Git), and seconds in all, of one ``dvc repro`` in ``cwd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=cwd, env=env, text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stages: dict[str, float] = {}
    skipped: list[str] = []
    current, since = None, start
    for line in proc.stdout:
        skip = SKIP_LINE.search(line)
        if skip:
            skipped.append(skip.group(1))
        match = STAGE_LINE.search(line)
        if match:
            now = time.perf_counter()
            if current:
                stages[current] = round(now - since, 2)
            current, since = match.group(1), now
            print(f"[{now - start:7.1f} s] {match.group(1)}", flush=True)
    if proc.wait():
        sys.exit(f"error: dvc repro failed in {cwd} (exit {proc.returncode}); run it there to see why")
    end = time.perf_counter()
    if current:
        stages[current] = round(end - since, 2)
    return stages, skipped, round(end - start, 2)


def host() -> dict:
    """The machine: CPU model, cores and vector extensions, Python and platform."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "vector_isa": vector_extensions(),
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", default="reports/repro_times.json")
    args = parser.parse_args()
    rev = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "main"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
        (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        (clone / ".venv").symlink_to(ROOT / ".venv")
        env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        stages, skipped, total = timed_repro(clone, env)
        _, _, noop = timed_repro(clone, env)
    record = {"revision": rev, "host": host(), "total_s": total, "stage_s": round(sum(stages.values()), 2),
              "noop_s": noop, "stages": stages, "skipped": skipped}
    out = ROOT / args.out
    out.write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join([f"| {name} | {secs:.1f} |" for name, secs in stages.items()]
                     + [f"| {name} | skipped: unchanged since dvc.lock |" for name in skipped])
    out.with_suffix(".md").write_text(
        f"# `dvc repro` on a fresh clone, per stage\n\nrevision `{rev[:12]}`; {record['host']['cpu']}, "
        f"{record['host']['cores']} cores ({', '.join(record['host']['vector_isa'])}); "
        f"Python {record['host']['python']}\n\n"
        f"| stage | seconds |\n|---|---|\n{rows}\n| **all stages** | **{record['stage_s']:.1f}** |\n\n"
        f"Whole command: {total:.1f} s; a second `dvc repro` with nothing changed: {noop:.1f} s.\n")
    print(json.dumps({k: record[k] for k in ("total_s", "stage_s", "noop_s")}))


if __name__ == "__main__":
    main()
