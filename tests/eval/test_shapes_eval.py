"""The ShapesWorld evaluator scores exactly: with an oracle probe (labels of the rendered scene
graph), the identity editor scores edit accuracy 0 and preservation 1, the true edited image
1 and 1, and a wrong edit is caught; the world's labels and rendered data are consistent."""

import json

import numpy as np
import pytest

from uip2p_jax.data import shapes
from uip2p_jax.eval import shapes as shapes_eval


class OracleWorld:
  """Reads labels off images by looking up the rendered scenes (a perfect probe)."""

  def __init__(self, scenes):
    self.table = {}
    for scene in scenes:
      self.table[shapes.render(scene).tobytes()] = shapes.scene_labels(scene)

  def labels(self, images):
    out = []
    for image in images:
      key = np.round((image + 1) * 127.5).astype(np.uint8).tobytes()
      out.append(self.table.get(key, np.full(len(shapes.LABEL_NAMES), -1, np.int32)))
    return np.stack(out)

  def image_embeddings(self, images):
    flat = images.reshape(len(images), -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)

  def text_embeddings(self, texts):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(texts), 64 * 64 * 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def turns(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes_test")
  with open(shapes.scenes_path(str(out), "test"), "w") as f:
    for example in shapes.examples("test", 30, seed=3):
      f.write(json.dumps(example.to_json()) + "\n")
  return shapes_eval.load_test(str(out))


def _run(turns, edit, tmp_path, label="test"):
  world = OracleWorld([t["scene"] for t in turns] + [t["edited_scene"] for t in turns])
  return shapes_eval.evaluate(turns, edit, world, str(tmp_path), label, {}, batch_size=8)


def truth(images, chunk):
  return np.stack([shapes.render(t["edited_scene"]) for t in chunk]) * (2 / 255) - 1


def test_identity_and_ground_truth_score_exactly(turns, tmp_path):
  identity = _run(turns, lambda images, chunk: images, tmp_path / "identity")
  assert identity["edit_accuracy"] == 0.0 and identity["preservation"] == 1.0
  assert identity["probe_accuracy"] == 1.0
  best = _run(turns, truth, tmp_path / "truth")
  assert best["edit_accuracy"] == 1.0 and best["preservation"] == 1.0
  assert best["l1"] == 0.0 and best["clip_i"] == pytest.approx(1.0)
  kinds = {t["edit"]["kind"] for t in turns}
  for kind in kinds:
    assert best["groups"][f"kind:{kind}"]["edit_accuracy"] == 1.0


def test_compare_pools_runs_that_share_a_label_as_replicates(turns, tmp_path):
  # Two "seeds" of one label (one editing perfectly, one not at all) and a single run.
  _run(turns, lambda images, chunk: images, tmp_path / "a0", label="chain")
  _run(turns, truth, tmp_path / "a1", label="chain")
  _run(turns, truth, tmp_path / "b", label="truth")
  table = shapes_eval.compare([str(tmp_path / "a0"), str(tmp_path / "a1"),
                               str(tmp_path / "b" / "summary.json")])
  header, _, pooled, single = table.splitlines()
  cells = [c.strip() for c in pooled.strip("|").split("|")]
  assert cells[0] == "chain (n=2)"
  # edit accuracy 0 and 1: mean 0.5, sample sd sqrt(0.5); preservation 1 and 1.
  assert cells[1:3] == ["0.500 ± 0.707", "1.000 ± 0.000"]
  assert single.startswith("| truth | 1.000 | 1.000 |")
  assert len(cells) == len(header.strip("|").split("|"))


def test_plot_draws_one_line_per_label_with_seeds_as_mean_and_sd(tmp_path, capsys):
  from uip2p_jax.cli import main

  def summary(name, label, step, accuracy, image_scale=1.5):
    groups = {"all": {m: 0.5 for m in shapes_eval.METRICS}}
    groups["all"]["edit_accuracy"] = accuracy
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"model": label, "groups": groups, "settings": {
        "train_step": step, "image_scale": image_scale}}))
    return str(path)

  runs = [summary("a0", "full", 0, 0.1), summary("a1s0", "full", 100, 0.2),
          summary("a1s1", "full", 100, 0.4), summary("b", "base", 100, 0.3)]
  drawn = shapes_eval.plot(runs, "train_step", "edit_accuracy", str(tmp_path / "p.png"),
                           annotate="image_scale")
  assert drawn["base"] == [(100.0, 1.5, 0.3, 0.0, 1)]
  (x0, _, y0, sd0, n0), (x1, _, y1, sd1, n1) = drawn["full"]
  assert (x0, y0, sd0, n0) == (0.0, 0.1, 0.0, 1)
  assert (x1, n1) == (100.0, 2) and y1 == pytest.approx(0.3) and sd1 == pytest.approx(0.1414, 1e-3)
  assert (tmp_path / "p.png").stat().st_size > 0
  assert main(["eval", "shapes-plot", *runs, "--out", str(tmp_path / "cli.png")]) == 0
  assert (tmp_path / "cli.png").is_file()
  with pytest.raises(ValueError, match="'strength' is neither a metric.*train_step"):
    shapes_eval.plot(runs, "strength", "edit_accuracy", str(tmp_path / "bad.png"))
  with pytest.raises(ValueError, match="group 'kind:add' is not in the summary"):
    shapes_eval.plot(runs, "train_step", "edit_accuracy", str(tmp_path / "bad.png"),
                     group="kind:add")


def test_an_edit_that_also_changes_the_background_is_not_preserving():
  scene = shapes.world_scene(0, 1)
  edit = shapes.Edit(kind="background", colour=next(b for b in shapes.BACKGROUNDS
                                                    if b != scene.background))
  target = shapes.apply_edit(scene, edit)
  recolour = [e for e in shapes.possible_edits(scene, "recolour", held_out=True)][0]
  wrong = shapes.apply_edit(target, recolour)  # the background right, an object recoloured
  labels = lambda s: shapes.scene_labels(s)[None]
  ok, preserved = shapes_eval.score_labels(labels(scene), labels(target), labels(wrong))
  assert ok[0] and not preserved[0]
  ok, preserved = shapes_eval.score_labels(labels(scene), labels(target), labels(scene))
  assert not ok[0] and preserved[0]


def test_world_labels_name_every_attribute():
  scene = shapes.world_scene(0, 7)
  labels = shapes.scene_labels(scene)
  assert len(labels) == len(shapes.LABEL_NAMES) == len(shapes.LABEL_CLASSES)
  assert np.all(labels < np.asarray(shapes.LABEL_CLASSES)) and np.all(labels >= 0)
  assert np.count_nonzero(labels[1::3]) == len(scene.objects)  # one colour per object
  # The world draws held-out combinations too (its pretrained models see the whole world).
  scenes = [shapes.world_scene(0, i) for i in range(400)]
  assert any(shapes.has_held_out_combination(s) for s in scenes)


def test_world_loader_batches_match_their_scenes():
  from uip2p_jax.data.loader import Loader, LoaderConfig
  from uip2p_jax.tokenizer import default_tokenizer, tokenize
  loader = Loader(LoaderConfig("", kind="world", resolution=64, batch_size=3, seed=5,
                               num_workers=0, flip=False, max_scale=1.0))
  batch = next(loader)
  for i in range(3):
    scene = shapes.world_scene(5, i)
    np.testing.assert_array_equal(batch["labels"][i], shapes.scene_labels(scene))
    np.testing.assert_allclose(batch["image"][i], shapes.render(scene) * (2 / 255) - 1,
                               atol=1e-6)
    np.testing.assert_array_equal(batch["input_caption_ids"][i],
                                  tokenize(default_tokenizer(), [shapes.caption(scene)])[0])


def _edit_of(e, obj):
  value = {"recolour": "colour", "reshape": "shape"}.get(e["kind"])
  fields = {value: e["value"]} if value else {}
  return shapes.apply_edit(e["scene"], shapes.Edit(e["kind"], target=obj.name, **fields))


def test_grounding_tells_the_named_object_from_the_others(turns):
  edits = shapes_eval.grounding_edits(turns)
  assert {e["kind"] for e in edits} == set(shapes_eval.GROUNDED_KINDS)
  assert any(e["id"].endswith("-swapped") for e in edits)
  scenes = [e["scene"] for e in edits]
  for e in edits:
    for obj in [e["named"]] + e["others"]:
      try:
        scenes.append(_edit_of(e, obj))
      except ValueError:  # (this edit does not apply to that object)
        pass
  world = OracleWorld(scenes)
  render = lambda scenes: np.stack([shapes.render(s) for s in scenes]) * (2 / 255) - 1

  def wrong_object(images, chunk):
    edited = []
    for e in chunk:
      try:
        edited.append(_edit_of(e, e["others"][0]))
      except ValueError:
        edited.append(e["scene"])
    return render(edited)

  editors = {"identity": lambda images, chunk: images,
             "truth": lambda images, chunk: render([_edit_of(e, e["named"]) for e in chunk]),
             "wrong object": wrong_object}
  results = {name: shapes_eval.grounding(turns, edit, world, batch_size=8)
             for name, edit in editors.items()}
  for kind in shapes_eval.GROUNDED_KINDS:
    assert results["identity"][kind]["named"] == 0.0 == results["identity"][kind]["others"]
    assert results["truth"][kind]["named"] == 1.0 and results["truth"][kind]["others"] == 0.0
    assert results["wrong object"][kind]["named"] == 0.0
    assert results["wrong object"][kind]["others"] > 0.0
    assert results["truth"][kind]["edits"] == sum(e["kind"] == kind for e in edits)
