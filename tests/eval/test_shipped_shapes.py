"""The shipped ShapesWorld models load from the package alone and reproduce the evaluation
numbers recorded when they were shipped (uip2p_jax/shapes_models/expected.json), on the first
test turns of `data build shapes --seed 0`, within the tolerances below (another CPU or XLA
version may round a few pixels differently; 1/40 of the turns is 0.025)."""

import json
import os

import pytest

from uip2p_jax.data import shapes
from uip2p_jax.shapes_models import ROOT, ship

TOLERANCE = {"edit_accuracy": 0.051, "preservation": 0.051, "l1": 0.005, "l2": 0.003,
             "clip_i": 0.01, "clip_t": 0.01}


def test_shipped_models_reproduce_their_recorded_numbers(tmp_path):
  path = os.path.join(ROOT, ship.EXPECTED_FILE)
  assert os.path.isfile(path), "the package ships ShapesWorld models with expected.json"
  record = json.load(open(path))
  assert record["models"], "expected.json records no model"
  with open(shapes.scenes_path(str(tmp_path), "test"), "w") as f:
    for example in shapes.examples("test", record["data"]["turns"], record["data"]["seed"]):
      f.write(json.dumps(example.to_json()) + "\n")
  from uip2p_jax.cli import main
  for name, expected in record["models"].items():
    out = tmp_path / name
    assert main(["eval", "shapes", "--data", str(tmp_path), "--out", str(out), "--model", name,
                 "--batch-size", str(record["data"]["turns"])]) == 0
    got = json.load(open(out / "summary.json"))
    for metric, value in expected.items():
      assert got[metric] == pytest.approx(value, abs=TOLERANCE[metric]), (name, metric)
