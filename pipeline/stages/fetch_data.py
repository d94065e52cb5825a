"""Stage ``fetch_data``: bring the dataset into ``data/raw/`` and verify it.

Sources are tried in order: a local folder laid out like upstream's ``data/`` folder, or an
http(s) URL of an archive (tar.gz / zip) that contains such a folder. Only the files of the
committed SHA-256 list are taken, and each must match; a source with a missing or altered file
is rejected with the file named, and the next source is tried.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.cli import UserError, run_main
from pipeline.core.config import get, load_params, resolve_path
from pipeline.core.files import sha256_file

log = logging.getLogger("pipeline.stages.fetch_data")


class DataSourceError(RuntimeError, UserError):
    """No source could provide the dataset as the checksum list describes it."""


def read_checksums(path: str | Path) -> dict[str, str]:
    """Parse a ``sha256sum``-style list into ``{relative path: hex digest}``."""
    sums: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise DataSourceError(f"{path}:{lineno}: not a '<sha256>  <path>' line: {line!r}")
        sums[name.removeprefix("./")] = digest
    return sums


def verify_folder(folder: Path, checksums: dict[str, str]) -> list[str]:
    """Problems found in ``folder`` against the list: missing or altered files (empty if none)."""
    problems = []
    for name, digest in checksums.items():
        f = folder / name
        if not f.is_file():
            problems.append(f"missing file {name}")
        elif sha256_file(f) != digest:
            problems.append(f"altered file {name} (sha256 differs from the committed list)")
    return problems


def _download(url: str, workdir: Path) -> Path:
    """Download and unpack an archive; return the folder inside it that holds the data."""
    archive = workdir / Path(url.split("?")[0]).name
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=60) as resp, archive.open("wb") as out:  # noqa: S310
        shutil.copyfileobj(resp, out)
    unpacked = workdir / "unpacked"
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
    else:
        with tarfile.open(archive) as t:
            t.extractall(unpacked, filter="data")
    candidates = sorted(p.parent for p in unpacked.rglob("dataset_metadata.csv"))
    if not candidates:
        raise DataSourceError(f"{url}: the archive holds no dataset_metadata.csv")
    return candidates[0]


def fetch(sources: Sequence[str], checksums: dict[str, str], dest: Path) -> dict:
    """Copy the listed files from the first source that has all of them intact.

    Returns:
        A record of the source used and the files taken.

    Raises:
        DataSourceError: every source failed; the message gives each source's reason.
    """
    failures = []
    for source in sources:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if source.startswith(("http://", "https://")):
                    folder = _download(source, Path(tmp))
                else:
                    folder = resolve_path(source)
                    if not folder.is_dir():
                        raise DataSourceError(f"folder {folder} does not exist")
                problems = verify_folder(folder, checksums)
                if problems:
                    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                                        if len(problems) > 5 else "")
                    raise DataSourceError(shown)
            except (OSError, DataSourceError, tarfile.TarError, zipfile.BadZipFile) as exc:
                log.warning("source %s rejected: %s", source, exc)
                failures.append(f"{source}: {exc}")
                continue
            if dest.exists():
                shutil.rmtree(dest)
            for name in checksums:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)
            total = sum((dest / n).stat().st_size for n in checksums)
            log.info("took %d files (%.1f MB) from %s", len(checksums), total / 1e6, source)
            return {"source": source, "files": len(checksums), "bytes": total}
    raise DataSourceError("no source in dataset.sources provides the dataset as its checksum list "
                          "(dataset.checksums) pins it: " + " | ".join(failures)
                          + ". Restore the files, or fix dataset.sources")


def write_checksums(folder: Path) -> str:
    """A ``sha256sum``-style list of every file under ``folder`` (paths relative to it): how a
    user pins their own dataset (``dataset.checksums``) before running the pipeline on it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise DataSourceError(f"{folder} holds no files")
    return "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pipeline.stages.fetch_data`` (the stage), or
    ``python -m pipeline.stages.fetch_data --write-checksums FOLDER > list.sha256`` to pin a dataset."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write-checksums"]:
        if len(argv) != 2:
            sys.exit("usage: python -m pipeline.stages.fetch_data --write-checksums FOLDER > FILE.sha256")
        sys.stdout.write(write_checksums(Path(argv[1])))
        return
    params = load_params()
    ds = get(params, "dataset")
    listed = ds.get("checksums")
    if not listed:
        raise DataSourceError("dataset.checksums is not set: pin the data first with "
                              "`python -m pipeline.stages.fetch_data --write-checksums FOLDER > "
                              "data/<name>.sha256` and name that file in dataset.checksums")
    listed_path = resolve_path(listed, root=Path.cwd())
    if not listed_path.is_file():
        raise DataSourceError(f"checksum list {listed} (dataset.checksums) not found: run from "
                              f"the project root, or pin the data with `python -m "
                              f"pipeline.stages.fetch_data --write-checksums FOLDER > {listed}`")
    checksums = read_checksums(listed_path)
    record = fetch(get(ds, "sources"), checksums, Path(get(ds, "raw_dir")))
    Path("data").mkdir(exist_ok=True)
    Path("data/fetch.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
