"""ShapesWorld: deterministic rendering, scene rules, exact edits and inverses, held-out splits,
and `uip2p data build shapes` read back by the loader and the MagicBrush evaluator."""

import collections
import dataclasses
import io
import json

import numpy as np
import PIL.Image
import pytest

from uip2p_jax import cli
from uip2p_jax.data import builders
from uip2p_jax.data import shapes as S
from uip2p_jax.data.loader import Loader, LoaderConfig
from uip2p_jax.eval.magicbrush import load_turns

TRAIN = list(S.examples("train", 400, seed=0))
TEST = list(S.examples("test", 400, seed=0))


def test_rendering_is_a_deterministic_function_of_the_seed():
  for seed in (0, 7):
    first = [S.png_bytes(S.render(ex.scene)) for ex in S.examples("train", 20, seed)]
    again = [S.png_bytes(S.render(ex.scene)) for ex in S.examples("train", 20, seed)]
    assert first == again
  other = [S.png_bytes(S.render(ex.scene)) for ex in S.examples("train", 20, 1)]
  assert other != first
  image = S.render(TRAIN[0].scene)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  # Example i depends on (seed, i) only: a longer build starts with the shorter one.
  assert [ex.to_json() for ex in S.examples("train", 5, 0)] == [ex.to_json() for ex in TRAIN[:5]]
  assert [ex.to_json() for ex in S.examples("test", 7, 0)] == [ex.to_json() for ex in TEST[:7]]


def test_objects_never_overlap_and_never_take_the_background_colour():
  for ex in TRAIN + TEST:
    for scene in (ex.scene, ex.edited_scene):
      cells = [(o.row, o.col) for o in scene.objects]
      assert len(set(cells)) == len(cells) and 1 <= len(cells) <= S.MAX_OBJECTS
      assert len({o.name for o in scene.objects}) == len(scene.objects)
      assert all(S.COLOURS[o.colour] != S.BACKGROUNDS[scene.background] for o in scene.objects)
  # In pixels: each object's drawing stays inside its own cell (a margin of background around).
  scene = S.Scene("black", tuple(S.SceneObject(r, c, "yellow", shape, "large")
                                 for (r, c), shape in zip([(0, 0), (1, 1), (2, 2)], S.SHAPES)))
  image = S.render(scene).astype(int)
  drawn = np.abs(image - S.BACKGROUNDS["black"]).sum(-1) > 0
  cell = 64 / 3
  for o in scene.objects:
    inside = np.zeros_like(drawn)
    inside[int(o.row * cell) + 1:int((o.row + 1) * cell), int(o.col * cell) + 1:
           int((o.col + 1) * cell)] = True
    assert drawn[inside].any()
  assert drawn.sum() == sum(drawn[int(o.row * cell) + 1:int((o.row + 1) * cell),
                                  int(o.col * cell) + 1:int((o.col + 1) * cell)].sum()
                            for o in scene.objects)
  with pytest.raises(ValueError, match="distinct cells"):
    S.Scene("gray", (S.SceneObject(0, 0, "red", "circle", "small"),
                     S.SceneObject(0, 0, "blue", "square", "small")))
  with pytest.raises(ValueError, match="distinct colour"):
    S.Scene("gray", (S.SceneObject(0, 0, "red", "circle", "small"),
                     S.SceneObject(1, 1, "red", "circle", "large")))


def test_captions_follow_the_grammar():
  scene = S.Scene("gray", (S.SceneObject(1, 1, "blue", "square", "small"),
                           S.SceneObject(0, 0, "red", "circle", "large"),
                           S.SceneObject(2, 1, "green", "triangle", "large")))
  assert S.caption(scene) == ("a large red circle in the top left corner, a small blue square in "
                              "the center and a large green triangle at the bottom on a gray "
                              "background")
  one = S.Scene("white", (S.SceneObject(1, 2, "yellow", "circle", "small"),))
  assert S.caption(one) == "a small yellow circle on the right on a white background"
  # The caption names everything: two different scenes never share one.
  by_caption = {}
  for ex in TRAIN + TEST:
    for scene in (ex.scene, ex.edited_scene):
      assert by_caption.setdefault(S.caption(scene), scene) == scene


def changed_objects(before: S.Scene, after: S.Scene) -> tuple[set, set]:
  return set(before.objects) - set(after.objects), set(after.objects) - set(before.objects)


def test_each_edit_changes_exactly_what_it_names_and_its_inverse_undoes_it():
  kinds = collections.Counter()
  for ex in TRAIN + TEST:
    edit, before, after = ex.edit, ex.scene, ex.edited_scene
    kinds[edit.kind] += 1
    assert S.caption(after) == ex.to_json()["edited_caption"]
    assert S.apply_edit(after, ex.inverse) == before
    gone, new = changed_objects(before, after)
    if edit.kind == "background":
      assert after.background == edit.colour != before.background and not gone and not new
      continue
    assert after.background == before.background
    if edit.kind == "add":
      assert not gone and new == {edit.added} and ex.inverse == S.Edit("remove",
                                                                       target=edit.added.name)
    elif edit.kind == "remove":
      assert not new and gone == {before.find(edit.target)}
    else:
      (old,), (changed,) = gone, new
      assert old.name == edit.target
      field = "colour" if edit.kind == "recolour" else "shape"
      assert dataclasses.replace(old, **{field: getattr(edit, field)}) == changed != old
  assert set(kinds) == set(S.EDIT_KINDS) and min(kinds.values()) > 80


def test_instructions_and_reverse_instructions_read_as_the_templates_say():
  scene = S.Scene("gray", (S.SceneObject(0, 0, "red", "circle", "large"),
                           S.SceneObject(1, 1, "blue", "square", "small")))
  cases = [(S.Edit("recolour", target="red circle", colour="green"), "make the red circle green",
            "make the green circle red"),
           (S.Edit("reshape", target="blue square", shape="triangle"),
            "turn the blue square into a triangle", "turn the blue triangle into a square"),
           (S.Edit("background", colour="white"), "make the background white",
            "make the background gray"),
           (S.Edit("add", added=S.SceneObject(2, 2, "yellow", "circle", "small")),
            "add a small yellow circle in the bottom right corner", "remove the yellow circle"),
           (S.Edit("remove", target="red circle"), "remove the red circle",
            "add a large red circle in the top left corner")]
  for edit, forward, reverse in cases:
    edited = S.apply_edit(scene, edit)
    assert S.instruction(scene, edit, 0) == forward
    assert S.instruction(edited, S.inverse_edit(scene, edit), 0) == reverse
    assert S.Edit.from_json(json.loads(json.dumps(edit.to_json()))) == edit


def test_held_out_phrasings_and_combinations_never_reach_the_train_split():
  held_phrasings = {kind: templates[-1].split("{")[0] for kind, templates in S.TEMPLATES.items()}
  held_words = [f"{c} {s}" for c, s in S.HELD_OUT_COMBINATIONS]
  for ex in TRAIN:
    assert not ex.held_out_phrasing and not ex.held_out_combination
    assert ex.template < len(S.TEMPLATES[ex.edit.kind]) - 1
    assert ex.reverse_template < len(S.TEMPLATES[ex.inverse.kind]) - 1
    texts = (ex.instruction, ex.reverse_instruction, S.caption(ex.scene),
             S.caption(ex.edited_scene))
    assert not any(w in t for w in held_words for t in texts)
    assert not ex.instruction.startswith(held_phrasings[ex.edit.kind])
    assert not ex.reverse_instruction.startswith(held_phrasings[ex.inverse.kind])
  # The test split holds both, often enough to be scored.
  assert 0.35 < np.mean([ex.held_out_phrasing for ex in TEST]) < 0.65
  assert np.mean([ex.held_out_combination for ex in TEST]) > 0.15
  for kind in S.EDIT_KINDS:
    assert any(ex.held_out_phrasing and ex.edit.kind == kind for ex in TEST)


def test_test_sessions_chain_their_turns():
  sessions = collections.defaultdict(list)
  for ex in TEST:
    sessions[ex.img_id].append(ex)
  assert len(TEST) == 400 and 1 < len(TEST) / len(sessions) < S.MAX_TURNS
  for img_id, turns in sessions.items():
    assert [ex.turn for ex in turns] == list(range(1, len(turns) + 1))
    for previous, ex in zip(turns, turns[1:]):
      assert ex.scene == previous.edited_scene and ex.id == f"{img_id}-{ex.turn}"


def decoded(data: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_cli_builds_three_readable_datasets_in_one_folder(tmp_path, capsys):
  out = str(tmp_path / "shapes")
  argv = ["data", "build", "shapes", "--out", out, "--train", "40", "--test", "10", "--seed", "0"]
  assert cli.main(argv) == 0
  assert "40 records written, 0 skipped" in capsys.readouterr().out
  train = list(S.examples("train", 40, 0))
  test = list(S.examples("test", 10, 0))
  for kind, expected in (("captions", train), ("ip2p", train), ("magicbrush", test)):
    source, info = builders.open_split(out, kind)
    assert len(source) == len(expected) and info.metadata["seed"] == 0
    # Byte-identical to the generator, in images and texts.
    by_id = {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}
    wanted = {rid: fields for rid, _, fields in S.records(kind, len(expected), 0)}
    assert set(by_id) == set(wanted)
    for rid, fields in wanted.items():
      for name, value in fields.items():
        stored = by_id[rid][name]
        assert (stored if isinstance(value, bytes) else
                stored.decode() if isinstance(stored, bytes) else stored) == value, (rid, name)
  by_id = {ex.id: ex for ex in train}
  for kind in ("captions", "ip2p"):
    loader = Loader(LoaderConfig(out, kind=kind, batch_size=8, resolution=64, num_workers=0,
                                 flip=False, max_scale=1.0))
    batch = next(loader)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["instruction_ids"].shape == (8, 77)
    for row, rid in enumerate(batch["id"]):  # no crop or flip: the images are the renders
      ex = by_id[rid.decode()]
      scenes = [("image", ex.scene)] + ([("edited_image", ex.edited_scene)] if kind == "ip2p"
                                        else [])
      for name, scene in scenes:
        np.testing.assert_allclose(batch[name][row], S.render(scene) / 127.5 - 1, atol=1e-5)
    loader.close()
  turns = load_turns(out)
  assert [t["id"] for t in turns] == sorted(ex.id for ex in test)
  first = next(t for t in turns if t["id"] == test[0].id)
  np.testing.assert_array_equal(decoded(first["target_image"]), S.render(test[0].edited_scene))
  assert first["edited_caption"] == S.caption(test[0].edited_scene)
  for split, expected in (("train", train), ("test", test)):
    rows = [json.loads(line) for line in open(S.scenes_path(out, split))]
    assert rows == [ex.to_json() for ex in expected]
    for row in rows:
      scene, edited = S.Scene.from_json(row["scene"]), S.Scene.from_json(row["edited_scene"])
      assert S.apply_edit(scene, S.Edit.from_json(row["edit"])) == edited
  # A second build refuses to replace the datasets unless asked to.
  assert cli.main(argv) == 2
  assert "already holds a built dataset" in capsys.readouterr().err
  assert cli.main(argv + ["--overwrite"]) == 0
  assert cli.main(["data", "build", "captions", "--out", out, "--train", "3"]) == 2


def test_train_records_can_hold_one_edit_kind_and_the_default_is_unchanged():
  every = [e.edit.kind for e in S.examples("train", 40, seed=1)]
  assert every == [e.edit.kind for e in S.examples("train", 40, 1, S.EDIT_KINDS)]
  assert set(every) == set(S.EDIT_KINDS)
  only = list(S.examples("train", 30, seed=1, kinds=("recolour",)))
  assert {e.edit.kind for e in only} == {"recolour"}
  assert not any(e.held_out_phrasing or e.held_out_combination for e in only)
  with pytest.raises(ValueError, match="subset"):
    list(S.examples("train", 1, seed=1, kinds=("repaint",)))
