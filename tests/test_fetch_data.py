"""The data source stage: sources tried in order, every file verified against the list."""

from __future__ import annotations

import functools
import hashlib
import http.server
import tarfile
import threading
from pathlib import Path

import pytest

from pipeline.stages.fetch_data import DataSourceError, fetch, read_checksums


def make_source(root: Path) -> dict[str, str]:
    files = {"dataset_metadata.csv": b"Filename\nCov_a\n", "pocus_videos/convex/Cov_a.mp4": b"\x00video",
             "pocus_images/convex/Reg_b.png": b"\x89PNGimg"}
    sums = {}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def test_checksum_file_parsing(tmp_path):
    f = tmp_path / "sums"
    f.write_text("a" * 64 + "  ./data/x.mp4\n" + "b" * 64 + "  y.png\n\n")
    assert read_checksums(f) == {"data/x.mp4": "a" * 64, "y.png": "b" * 64}
    f.write_text("not a checksum line\n")
    with pytest.raises(DataSourceError, match=":1:"):
        read_checksums(f)


def test_local_source_is_verified_and_copied(tmp_path):
    src = tmp_path / "src"
    sums = make_source(src)
    (src / "extra_not_listed.txt").write_text("ignored")
    record = fetch([str(src)], sums, tmp_path / "raw")
    assert record["files"] == 3
    taken = {p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    assert taken == set(sums)


def test_altered_or_missing_file_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    sums = make_source(src)
    (src / "pocus_videos/convex/Cov_a.mp4").write_bytes(b"tampered")
    with pytest.raises(DataSourceError, match="altered file pocus_videos/convex/Cov_a.mp4"):
        fetch([str(src)], sums, tmp_path / "raw")
    (src / "pocus_videos/convex/Cov_a.mp4").unlink()
    with pytest.raises(DataSourceError, match="missing file pocus_videos/convex/Cov_a.mp4"):
        fetch([str(src)], sums, tmp_path / "raw")


def test_next_source_is_tried_and_http_archives_work(tmp_path):
    good = tmp_path / "serve" / "pkg" / "data"
    sums = make_source(good)
    archive = tmp_path / "www" / "dataset.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "serve" / "pkg", arcname="covid19_ultrasound-rev")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dataset.tar.gz"
        record = fetch([str(tmp_path / "does-not-exist"), url], sums, tmp_path / "raw")
    finally:
        server.shutdown()
    assert record["source"] == url
    assert (tmp_path / "raw" / "pocus_images/convex/Reg_b.png").read_bytes() == b"\x89PNGimg"


def test_all_sources_failing_lists_each_reason(tmp_path):
    with pytest.raises(DataSourceError) as info:
        fetch([str(tmp_path / "a"), str(tmp_path / "b")], {"x": "0" * 64}, tmp_path / "raw")
    assert "a: folder" in str(info.value) and "b: folder" in str(info.value)


def test_committed_list_matches_the_shared_dataset(shared_lus):
    sums = read_checksums(Path(__file__).parent.parent / "data" / "covid19_ultrasound.sha256")
    assert len(sums) == 165
    # the real files verify (hashing 84 MB takes a few seconds)
    from pipeline.stages.fetch_data import verify_folder

    assert verify_folder(shared_lus, sums) == []
