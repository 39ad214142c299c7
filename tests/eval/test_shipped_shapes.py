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


# The default editor's fixed cases: (scene, instruction) -> the true edited scene. Each must be
# read back by the probe exactly as its true edit (the edit done, nothing else changed).
def _default_editor_cases():
  from uip2p_jax.cli.demo import DEMO_INSTRUCTION, demo_scene
  O, S = shapes.SceneObject, shapes.Scene
  return [
      (demo_scene(), DEMO_INSTRUCTION, shapes.Edit("recolour", target="red circle", colour="blue")),
      (S("white", (O(1, 1, "green", "circle", "large"),)), "make the green circle blue",
       shapes.Edit("recolour", target="green circle", colour="blue")),
      (S("gray", (O(0, 2, "yellow", "triangle", "large"), O(2, 0, "blue", "circle", "large"))),
       "make the yellow triangle red", shapes.Edit("recolour", target="yellow triangle",
                                                   colour="red")),
  ]


def test_uip2p_edit_with_no_model_edits_rendered_scenes_correctly(tmp_path, capsys):
  """`uip2p edit` with no --model uses the shipped shapes-cec; its edits of a few fixed scenes
  read, by the world's probe, as their true edits."""
  from PIL import Image

  from uip2p_jax import shapes_models
  from uip2p_jax.cli import main
  from uip2p_jax.eval.shapes import World, to_unit
  cases = _default_editor_cases()
  records = []
  for i, (scene, instruction, edit) in enumerate(cases):
    Image.fromarray(shapes.render(scene)).save(tmp_path / f"in{i}.png")
    records.append({"image": f"in{i}.png", "instruction": instruction, "out": f"out{i}.png"})
  (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  assert main(["edit", "--batch", str(tmp_path / "records.jsonl"),
               "--batch-size", str(len(cases))]) == 0
  assert "no --model given: using shapes-cec" in capsys.readouterr().err
  paths = shapes_models.paths()
  world = World(paths["probe"], paths["clip"])
  import numpy as np
  edited = np.stack([np.asarray(Image.open(tmp_path / f"out{i}.png")) for i in range(len(cases))])
  assert edited.shape[1:] == (shapes.RESOLUTION, shapes.RESOLUTION, 3)  # the world's 64 px
  read = world.labels(to_unit(edited))
  for (scene, instruction, edit), labels in zip(cases, read):
    expected = shapes.scene_labels(shapes.apply_edit(scene, edit))
    assert np.array_equal(labels, expected), (
        instruction, shapes.describe_labels(labels), shapes.describe_labels(expected))
