"""The shipped ShapesWorld models load from the package alone and reproduce the evaluation
numbers recorded when they were shipped (uip2p_jax/shapes_models/expected.json), on the first
test turns of `data build shapes --seed 0`, within ship.EXPECTED_TOLERANCE; and the default
editor edits a few fixed scenes right."""

import json
import os
import subprocess
import sys

from uip2p_jax.data import shapes
from uip2p_jax.shapes_models import ROOT, ship


def test_shipped_models_reproduce_their_recorded_numbers():
  """`ship --check`, as a user would run it: in its own process with XLA's default optimisation
  (the suite compiles unoptimised code, conftest.py, which runs these 4 x 20 edits ~1.8x slower;
  expected.json was recorded optimised)."""
  record = json.load(open(os.path.join(ROOT, ship.EXPECTED_FILE)))
  assert {"identity", "shapes-ip2p", "shapes-cec"} <= set(record["models"]), record["models"]
  # XLA reads a flags value that does not start with "--" (even " ") as a file name: rebuild it.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f != "--xla_backend_optimization_level=0"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  done = subprocess.run([sys.executable, "-m", "uip2p_jax.shapes_models.ship", "--check"],
                        env=env, capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  assert "ship --check: reproduced" in done.stdout


def test_compare_expected_names_what_drifted():
  recorded = {"shapes-cec": {"edit_accuracy": 0.15, "l1": 0.157},
              "identity": {"preservation": 1.0}}
  assert ship.compare_expected(recorded, {"shapes-cec": {"edit_accuracy": 0.175, "l1": 0.160},
                                          "identity": {"preservation": 1.0}}) == []
  off = ship.compare_expected(recorded, {"shapes-cec": {"edit_accuracy": 0.25, "l1": 0.157}})
  assert off == ["shapes-cec edit_accuracy: recorded 0.1500, reproduced 0.2500 (tolerance 0.051)",
                 "identity preservation: recorded 1.0000, reproduced nothing (tolerance 0.051)"]
  assert ship.compare_expected(recorded, {"shapes-cec": {"edit_accuracy": float("nan"),
                                                         "l1": 0.157},
                                          "identity": {"preservation": 1.0}})


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
