"""Numbers users write outside HTTP (spec files, trajectory files, training configs, options): NaN, ±inf refused."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import NON_FINITE, TOUR_FIELDS, plain
from typer.testing import CliRunner

from diffpano.cli import build_app

app = build_app()

GOOD_SPEC = '{"tour_id": "good", "prompt": "a room", "num_inference_steps": 2}'


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, plain(result.output)


@pytest.mark.parametrize("token", NON_FINITE)
@pytest.mark.parametrize("field", list(TOUR_FIELDS))
def test_a_jsonl_spec_with_a_non_finite_number_exits_2_naming_line_and_field(tmp_path, field, token):
    bad = '{"tour_id": "bad", ' + TOUR_FIELDS[field].replace("X", token).removeprefix("{")
    specs = tmp_path / "specs.jsonl"
    specs.write_text(GOOD_SPEC + "\n" + bad + "\n")
    out = tmp_path / "out"
    code, text = run("bulk", "--specs", str(specs), "--out", str(out))
    assert code == 2, text
    assert "line 2" in text and field.split(".")[-1] in text, text
    assert not out.exists()  # nothing written, not even the good spec's tour


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["guidance_scale", "seed", "poses", "trajectory"])
def test_a_parquet_spec_with_a_non_finite_number_exits_2_naming_line_and_field(tmp_path, field, value):
    pose = [1.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    row = {"tour_id": "bad", "prompt": "a room", "guidance_scale": 5.0, "seed": 1.0, "poses": [pose],
           "trajectory": None}
    row[field] = {"poses": [[*pose[:15], value]], "trajectory": {"kind": "walk", "spacing": value}}.get(field, value)
    if field == "trajectory":
        row.pop("poses")
    good = {k: v for k, v in row.items()} | {"tour_id": "good", "guidance_scale": 5.0, "seed": 1.0}
    if field == "trajectory":
        good["trajectory"] = {"kind": "walk", "spacing": 1.0}
    specs = tmp_path / "specs.parquet"
    pq.write_table(pa.Table.from_pylist([good, row]), specs)
    out = tmp_path / "out"
    code, text = run("bulk", "--specs", str(specs), "--out", str(out))
    assert code == 2, text
    assert f"line 2: {field}" in text, text
    assert not out.exists()


@pytest.mark.parametrize("token", NON_FINITE)
@pytest.mark.parametrize("kind", ["poses", "named"])
def test_a_trajectory_file_with_a_non_finite_number_exits_2_naming_the_field(tiny_model_dir, tmp_path, kind, token):
    pose = "[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, X, 0, 0, 0, 1]".replace("X", token)
    text = '{"poses": [' + pose + "]}" if kind == "poses" else '{"kind": "walk", "spacing": ' + token + "}"
    path = tmp_path / "trajectory.json"
    path.write_text(text)
    out = tmp_path / "out"
    code, output = run("generate", "a room", "--views", "1", "--trajectory", str(path), "--out", str(out),
                       "--model", str(tiny_model_dir), "--steps", "1")
    assert code == 2, output
    assert ("trajectory.poses" if kind == "poses" else "trajectory.spacing") in output and "finite" in output, output
    assert not out.exists()


@pytest.mark.parametrize(("option", "value"), [
    ("--guidance", "nan"), ("--guidance", "inf"), ("--spacing", "-inf"), ("--spacing", "nan"),
])
def test_a_non_finite_option_exits_2_naming_it(tiny_model_dir, tmp_path, option, value):
    out = tmp_path / "out"
    code, output = run("generate", "a room", "--views", "1", option, value, "--out", str(out),
                       "--model", str(tiny_model_dir), "--steps", "1")
    assert code == 2 and f"Invalid value for '{option}'" in output, output
    assert not out.exists()


@pytest.mark.parametrize("token", [".nan", ".inf", "-.inf", "1e400"])
@pytest.mark.parametrize("key", ["stage1.lr", "stage1.time_limit_s", "data.caption_dropout", "stage1.max_grad_norm"])
def test_a_training_config_with_a_non_finite_number_names_the_key(train_dataset, tmp_path, key, token):
    from trainer.config import load_config

    section, name = key.split(".")
    tree = {"data": {"dataset": train_dataset}, "stage1": {"steps": 1}, "stage2": {"steps": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    load_config(path)  # the config is fine without the bad number
    with pytest.raises(ValueError, match=rf"{section}\.{name}: .*finite"):
        load_config(path, [f"{key}={token}"])
