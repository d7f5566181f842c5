"""`diffpano manifest compact`: many parts become one while concurrent readers and writers run; S3 goes `--into`."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import plain
from typer.testing import CliRunner

from diffpano.cli import build_app
from diffpano.io import storage
from diffpano.io.compaction import Publisher, compact, publish_pending
from diffpano.io.manifest import PENDING, Tour, commit_tours, read_manifest, tour_ids

app = build_app()

VIEWS = 2


def tour(tour_id: str) -> Tour:
    """A 2-view 8x16 tour of random pixels."""
    images = np.random.default_rng(len(tour_id)).integers(0, 255, (VIEWS, 8, 16, 3), dtype=np.uint8)
    return Tour(tour_id, images, ["a room"] * VIEWS, np.tile(np.eye(4, dtype=np.float32), (VIEWS, 1, 1)), 0, "m", 2,
                5.0)


def commit(root: str, *ids: str, pending: bool = False) -> None:
    commit_tours(root, [tour(i) for i in ids], pending)


def keys(root: str) -> list[tuple[str, int]]:
    table = read_manifest(root)
    return sorted(zip(table["tour_id"].to_pylist(), table["view_index"].to_pylist(), strict=True))


def naive_compact(root: str, meanwhile) -> None:
    """The unsafe way, as a control: write the merged part, let readers read (meanwhile()), then delete the parts."""
    parts = sorted((Path(root) / "manifest").glob("*.parquet"))
    table = pads.dataset([str(p) for p in parts], format="parquet").to_table()
    pq.write_table(table, Path(root) / "manifest" / f"merged-{time.monotonic_ns()}.parquet")
    meanwhile()
    for p in parts:
        p.unlink()


def reader(root: str, stop, results) -> None:
    """Read the manifest with pyarrow.dataset and DuckDB in a loop: (rows, distinct keys) per read, or the error."""
    import duckdb

    while not stop.is_set():
        for how in ("pyarrow", "duckdb"):
            try:
                if how == "pyarrow":
                    table = pads.dataset(f"{root}/manifest", format="parquet").to_table(["tour_id", "view_index"])
                    rows = list(zip(table["tour_id"].to_pylist(), table["view_index"].to_pylist(), strict=True))
                else:
                    rows = duckdb.sql(f"select tour_id, view_index from read_parquet('{root}/manifest/*.parquet')"
                                      ).fetchall()
                results.append((how, len(rows), len(set(rows))))
            except Exception as e:  # noqa: BLE001 - a read that fails is recorded, not a result
                results.append((how, type(e).__name__, None))


def run_with_reader(root: str, rounds: int, compaction) -> list:
    """Rounds of (commit two tours as two parts, compaction(root, fresh_reads)) while a reader process reads; the
    reader's results. fresh_reads() returns once the reader has finished two more reads, so that at least one read
    began after the call (one may have been under way): each round's state is read, whatever the machine's speed."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        stop, results = manager.Event(), manager.list()
        proc = ctx.Process(target=reader, args=(root, stop, results))
        proc.start()

        def fresh_reads(count: int = 2) -> None:
            target = len(results) + count
            deadline = time.monotonic() + 120  # only bounds a reader that hangs or died
            while len(results) < target:
                assert proc.is_alive() and time.monotonic() < deadline, "the reader process stopped reading"
                time.sleep(0.01)

        fresh_reads(1)  # the reader has started
        for r in range(rounds):
            commit(root, f"t{r}a")
            commit(root, f"t{r}b")
            compaction(root, fresh_reads)
            fresh_reads()
        stop.set()
        proc.join(30)
        return list(results)


def test_a_concurrent_reader_never_sees_a_duplicate_or_a_missing_row(tmp_path):
    root = str(tmp_path / "out")
    commit(root, "first")
    rounds = 25
    results = run_with_reader(root, rounds, lambda r, fresh_reads: compact(r))
    reads = [r for r in results if r[2] is not None]
    errors = [r for r in results if r[2] is None]
    assert all(rows == distinct for _, rows, distinct in reads), "a reader saw duplicated rows"
    assert all(rows % VIEWS == 0 for _, rows, _ in reads), "a reader saw a partial tour"
    for how in ("pyarrow", "duckdb"):  # committed rows never disappear from a later read
        counts = [rows for h, rows, _ in reads if h == how]
        assert counts == sorted(counts), f"{how}: a later read had fewer rows"
    assert reads[-1][1] == (1 + 2 * rounds) * VIEWS  # the reader read the end state too
    # One reader reads one thing at a time, so each swap of manifest/ can fail at most the read under way then (one
    # that listed the old folder and opens its files after the swap); a reader retries such a read.
    assert len(errors) <= rounds, errors
    assert len(list((Path(root) / "manifest").glob("*.parquet"))) == 1
    assert len(keys(root)) == (1 + 2 * rounds) * VIEWS


def test_the_reader_check_catches_a_naive_compaction(tmp_path):
    root = str(tmp_path / "out")
    commit(root, "first")
    results = run_with_reader(root, 3, naive_compact)  # reads are made while both copies are listed
    assert any(rows != distinct for _, rows, distinct in results if distinct is not None)


def test_writers_publishing_during_compactions_lose_and_duplicate_nothing(tmp_path):
    root = str(tmp_path / "out")
    commit(root, "first")
    done = threading.Event()

    def writer():
        for i in range(40):
            commit(root, f"w{i}")
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        compact(root)
    thread.join()
    compact(root)
    assert keys(root) == sorted((t, v) for t in ["first", *(f"w{i}" for i in range(40))] for v in range(VIEWS))
    assert len(list((Path(root) / "manifest").glob("*.parquet"))) == 1


def test_what_a_crashed_compaction_left_is_invisible_and_cleaned_up(tmp_path):
    root = str(tmp_path / "out")
    commit(root, "a")
    commit(root, "b")
    leftover = Path(root) / "_compact" / "dead" / "manifest"
    leftover.mkdir(parents=True)
    for part in (Path(root) / "manifest").glob("*.parquet"):
        shutil.copy(part, leftover / part.name)
    assert len(keys(root)) == 2 * VIEWS  # readers look at manifest/ only
    result = CliRunner().invoke(app, ["manifest", "compact", root])
    assert result.exit_code == 0 and "2 parts -> 1, 4 rows" in result.output
    assert not (Path(root) / "_compact").exists() and len(keys(root)) == 2 * VIEWS
    result = CliRunner().invoke(app, ["manifest", "compact", root])  # nothing left to merge
    assert result.exit_code == 0 and "1 parts -> 1" in result.output


def test_an_s3_manifest_is_compacted_into_a_new_output_not_in_place(s3_endpoint):
    root, into = "s3://diffpano-test/compact-src", "s3://diffpano-test/compact-dst"
    for i in range(3):
        commit(root, f"s{i}")
    result = CliRunner().invoke(app, ["manifest", "compact", root])
    assert result.exit_code == 2 and "--into" in plain(result.output)
    assert len(storage.list_files(storage.join(root, "manifest"), ".parquet")) == 3  # untouched
    result = CliRunner().invoke(app, ["manifest", "compact", root, "--into", into])
    assert result.exit_code == 0 and "3 parts -> 1, 6 rows" in result.output, result.output
    table = read_manifest(into)
    assert keys(into) == keys(root)
    assert all(uri.startswith(root) and storage.exists(uri) for uri in table["image_uri"].to_pylist())
    result = CliRunner().invoke(app, ["manifest", "compact", root, "--into", into])
    assert result.exit_code == 2 and "already has a manifest" in plain(result.output)


@pytest.mark.parametrize("target", ["missing", "no-manifest"])
def test_compacting_something_that_is_not_an_output_is_refused(tmp_path, target):
    (tmp_path / "no-manifest").mkdir()
    result = CliRunner().invoke(app, ["manifest", "compact", str(tmp_path / target)])
    assert result.exit_code == 2 and "has no manifest/ folder" in plain(result.output)


def test_a_batch_retried_after_its_part_was_compacted_adds_no_duplicate(tmp_path):
    root = str(tmp_path / "out")
    commit(root, "a", "b")
    commit(root, "c")
    compact(root)
    commit(root, "a", "b")  # a replica that died after committing retries its batch: same tours, same part name
    assert keys(root) == sorted((t, v) for t in "abc" for v in range(VIEWS))
    commit(root, "d")  # new batches still publish
    assert len(keys(root)) == 4 * VIEWS


@pytest.mark.parametrize("into", [False, True])
def test_parts_written_before_the_scheduler_column_still_read_and_compact_with_it(tmp_path, into):
    """docs/tours.md: `scheduler` (and `depth_uri`) are null in older parts; reading and compacting keep the newer
    parts' values, whichever part comes first."""
    from diffpano.io.manifest import TOUR_SCHEMA, parquet_bytes, tour_table

    root = str(tmp_path / "out")
    commit_tours(root, [tour("new")])
    new = tour("newer")
    new.scheduler = "pndm"
    commit_tours(root, [new])
    old = tour_table([tour("aaa-old")]).drop_columns(["scheduler", "depth_uri"])  # written before the columns
    assert old.schema.names == TOUR_SCHEMA.names[:-2]
    storage.write_bytes(storage.join(root, "manifest", "part-0000-old.parquet"), parquet_bytes(old))
    expect = {"aaa-old": None, "new": None, "newer": "pndm"}
    table = read_manifest(root)
    assert dict(zip(table["tour_id"].to_pylist(), table["scheduler"].to_pylist(), strict=True)) == expect
    target = str(tmp_path / "into") if into else root
    compact(root, target if into else None)
    table = read_manifest(target)
    assert len(storage.list_files(storage.join(target, "manifest"), ".parquet")) == 1
    assert dict(zip(table["tour_id"].to_pylist(), table["scheduler"].to_pylist(), strict=True)) == expect
    assert table["depth_uri"].null_count == table.num_rows  # no tour here was made on a geometry


def check_compacted_into_plays_back(root: str, into: str, tmp_path: Path) -> None:
    """Tours of an output compacted --into another read back identically there (absolute image URIs): by the tour
    reader, `diffpano video` and the server's GET /v1/tours/{id}."""
    import base64

    from diffpano.io.manifest import decode_rgb, read_tours
    from serve.ingress import read_stored_tour

    commit(root, "t-one", "t-two")
    result = CliRunner().invoke(app, ["manifest", "compact", root, "--into", into])
    assert result.exit_code == 0, result.output
    before, after = read_tours(root), read_tours(into)
    assert [t.tour_id for t in after] == ["t-one", "t-two"]
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.images, b.images) and a.image_uris == b.image_uris  # the images stayed where they were
    result = CliRunner().invoke(app, ["video", into, "--tour", "t-two", "--frames-per-view", "2",
                                      "--out", str(tmp_path / "t.gif")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.gif").stat().st_size > 0
    answer = read_stored_tour(into, "t-one")
    assert [v.image_uri for v in answer.views] == before[0].image_uris
    shown = np.stack([decode_rgb(base64.b64decode(v.image_png_base64)) for v in answer.views])
    assert np.array_equal(shown, before[0].images)


def test_an_output_compacted_into_a_new_folder_plays_back(tmp_path):
    check_compacted_into_plays_back(str(tmp_path / "out"), str(tmp_path / "new"), tmp_path)


def test_an_s3_output_compacted_into_a_new_prefix_plays_back(s3_endpoint, tmp_path):
    check_compacted_into_plays_back("s3://diffpano-test/played/out", "s3://diffpano-test/played/new", tmp_path)


def staged(root: str) -> list[str]:
    return storage.list_files(storage.join(root, PENDING), ".parquet")


def published_parts(root: str) -> list[str]:
    return storage.list_files(storage.join(root, "manifest"), ".parquet")


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    """A fresh output root, a local folder or an s3 prefix on the test endpoint."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    return f"s3://diffpano-test/publish-{request.node.name.split('[')[0][-20:]}-{time.monotonic_ns()}"


def test_staged_parts_are_invisible_until_published_merged_into_one_part(output):
    commit(output, "a", "b", pending=True)
    commit(output, "c", pending=True)
    assert len(staged(output)) == 2 and keys(output) == []  # readers look at manifest/ only
    publisher = Publisher(output)
    assert publisher.publish() == 3
    assert keys(output) == sorted((t, v) for t in "abc" for v in range(VIEWS))
    assert len(published_parts(output)) == 1 and staged(output) == []
    assert publisher.publish() == 0 and len(published_parts(output)) == 1  # nothing staged: nothing written


def test_a_batch_staged_again_after_its_publication_adds_no_duplicate(output):
    publisher = Publisher(output)
    commit(output, "a", "b", pending=True)
    assert publisher.publish() == 2
    commit(output, "a", "b", pending=True)  # its replica died before answering: the batch ran again
    commit(output, "c", pending=True)
    assert publisher.publish() == 1
    assert keys(output) == sorted((t, v) for t in "abc" for v in range(VIEWS))
    assert staged(output) == []
    commit(output, "a", "b", pending=True)  # only its own tours again: nothing to publish, the part is dropped
    assert publisher.publish() == 0 and len(published_parts(output)) == 2 and staged(output) == []


def test_a_publication_cut_short_is_completed_by_the_next_job_without_a_duplicate(output):
    """A job stopped after publishing merged parts but before deleting them, with other parts staged too: the next
    job's start publishes the rest against what the manifest holds."""
    commit(output, "a", "b", pending=True)
    Publisher(output).publish()
    commit(output, "a", "b", pending=True)  # as if its deletion never happened
    commit(output, "c", pending=True)  # staged, never published
    present = tour_ids(output)
    assert present == {"a", "b"}
    assert publish_pending(output, present) == 1 and present == {"a", "b", "c"}
    assert keys(output) == sorted((t, v) for t in "abc" for v in range(VIEWS)) and staged(output) == []
