"""Spec files read a chunk at a time: the same rows and line numbers as a whole read, held as ids, not specs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffpano import specs as spec_module
from diffpano.specs import SpecRows, iter_spec_rows, validate_specs


def rows(n: int) -> list[dict]:
    """n valid spec rows."""
    return [{"tour_id": f"t{i:03d}", "prompt": f"room {i}", "seed": i} for i in range(n)]


def test_jsonl_read_in_small_chunks_gives_every_row_and_the_right_line_of_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_module, "SPEC_CHUNK_BYTES", 7)  # every line spans chunks
    path = tmp_path / "specs.jsonl"
    lines = [json.dumps(r) for r in rows(5)]
    path.write_text("\n".join(lines[:2] + ["", *lines[2:]]))  # a blank line, no newline at the end
    assert list(iter_spec_rows(str(path))) == rows(5)
    path.write_text("\n".join([*lines[:3], "{not json", lines[3]]) + "\n")
    with pytest.raises(ValueError, match="line 4: not valid JSON"):
        list(iter_spec_rows(str(path)))


def test_parquet_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    path = tmp_path / "specs.parquet"
    pq.write_table(pa.Table.from_pylist(rows(5)), path, row_group_size=2)
    read = []
    real = spec_module.storage.read_row_group
    monkeypatch.setattr(spec_module.storage, "read_row_group", lambda uri, i: read.append(i) or real(uri, i))
    assert list(iter_spec_rows(str(path))) == rows(5)
    assert read == [0, 1, 2]


def test_spec_rows_keep_ids_and_errors_and_read_the_specs_again_each_time(tmp_path):
    path = tmp_path / "specs.jsonl"
    bad = [*rows(4), {"tour_id": "t001", "prompt": "again"}, {"tour_id": "t9", "prompt": "x", "seed": -1}]
    path.write_text("\n".join(json.dumps(r) for r in bad))
    reads = []
    specs = SpecRows(lambda: reads.append(1) or iter_spec_rows(str(path)))
    assert specs.ids == ["t000", "t001", "t002", "t003"] and len(specs) == 4
    assert [(e.line, e.field) for e in specs.invalid] == [(5, "tour_id"), (6, "seed")]
    assert not hasattr(specs, "specs") and len(reads) == 1  # checked once, nothing held but ids and errors
    assert [s.tour_id for s in specs] == specs.ids == [s.tour_id for s in specs]
    assert len(reads) == 3  # each iteration reads the file again
    sent = list(specs.json_rows())  # what the driver sends replicas: the valid rows as written, not re-validated
    assert [t for t, _ in sent] == specs.ids and json.loads(sent[1][1]) == bad[1] and len(reads) == 4
    good, errors = validate_specs(bad)  # the list form agrees
    assert [s.tour_id for s in good] == specs.ids and [str(e) for e in errors] == [str(e) for e in specs.invalid]
