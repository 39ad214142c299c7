"""Metrics on hand-built cases, and the three `uip2p eval` commands end to end (tiny models)."""

import io
import json
import math
import os

import numpy as np
import PIL.Image
import pytest

from uip2p_jax.cli import main as cli_main
from uip2p_jax.eval import magicbrush
from uip2p_jax.eval.metrics import (cosine_similarity, direction_similarity, l1_distance,
                                    l2_distance, magicbrush_metrics)


@pytest.fixture(scope="module")
def metric_folders(tmp_path_factory):
  """A tiny CLIP (real 49,408-token vocabulary, so real token ids work) and a tiny DINO ViT."""
  import torch
  from reference import tiny_torch_metric_models
  torch.manual_seed(0)
  clip, dino = tiny_torch_metric_models(32, 16)
  root = tmp_path_factory.mktemp("metric_models")
  clip.save_pretrained(root / "clip")
  dino.save_pretrained(root / "dino")
  return str(root / "clip"), str(root / "dino")


def photo(seed, size=(48, 40)):
  rng = np.random.default_rng(seed)
  return PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_pixel_distances_and_similarities_on_known_values():
  a = np.zeros((2, 4, 4, 3), np.float32)
  np.testing.assert_allclose(l1_distance(a, a), 0.0)
  np.testing.assert_allclose(l1_distance(a + 0.1, a), 0.1, rtol=1e-6)
  np.testing.assert_allclose(l2_distance(a + 0.1, a), 0.01, rtol=1e-5)
  x = np.asarray([[1.0, 0.0], [0.0, 2.0]])
  np.testing.assert_allclose(cosine_similarity(x, x), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cosine_similarity(x, x[::-1]), 0.0, atol=1e-6)
  # Image moved from e1 to e2, text from e1 to e2: the same direction.
  e1, e2 = np.asarray([[1.0, 0.0]]), np.asarray([[0.0, 1.0]])
  np.testing.assert_allclose(direction_similarity(e1, e2, e1, e2), 1.0, rtol=1e-6)
  np.testing.assert_allclose(direction_similarity(e1, e2, e2, e1), -1.0, rtol=1e-6)


def test_identical_images_score_perfectly(metric_folders):
  from uip2p_jax.cli.eval import metric_models
  models = metric_models(*metric_folders)
  images = [photo(1), photo(2, (64, 64))]
  scores = magicbrush_metrics(models, images, images, ["a cat", ""])
  np.testing.assert_allclose(scores["l1"], 0.0)
  np.testing.assert_allclose(scores["l2"], 0.0)
  np.testing.assert_allclose(scores["clip_i"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(scores["dino"], 1.0, rtol=1e-5)
  # CLIP-T's value is checked against MagicBrush's in test_metrics_reference.py.
  assert np.isfinite(scores["clip_t"][0]) and math.isnan(scores["clip_t"][1])  # no caption
  # A known brightness shift gives the known L1 (the edit is resized to the target's size).
  gray = PIL.Image.new("RGB", (40, 40), (100, 100, 100))
  brighter = PIL.Image.new("RGB", (20, 20), (125, 125, 125))
  shifted = magicbrush_metrics(models, [brighter], [gray], None)
  np.testing.assert_allclose(shifted["l1"], 25 / 255, rtol=1e-5)
  np.testing.assert_allclose(shifted["l2"], (25 / 255) ** 2, rtol=1e-4)


def magicbrush_data(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  def jpeg(seed):
    out = io.BytesIO()
    photo(seed, (64, 64)).save(out, "JPEG")
    return {"bytes": out.getvalue(), "path": None}
  rows = [("11", 1), ("11", 2), ("22", 1)]
  pq.write_table(pa.table({
      "img_id": [r[0] for r in rows], "turn_index": [r[1] for r in rows],
      "source_img": [jpeg(i) for i in range(3)], "mask_img": [jpeg(9)] * 3,
      "target_img": [jpeg(10 + i) for i in range(3)],
      "instruction": ["add a hat", "make it red", "add snow"]}), str(tmp_path / "test.parquet"))
  (tmp_path / "desc.json").write_text(json.dumps({
      "11": {"11-input.png": "a dog", "11-output1.png": "a dog with a hat",
             "11-output2.png": "a red dog with a hat"},
      "22": {"22-input.png": "a road", "22-output1.png": "a snowy road"}}))
  data = str(tmp_path / "data")
  assert cli_main(["data", "build", "magicbrush", "--parquet", str(tmp_path / "test.parquet"),
                   "--descriptions", str(tmp_path / "desc.json"), "--out", data]) == 0
  return data


def test_magicbrush_protocol_resume_and_compare(tmp_path, metric_folders, capsys):
  data = magicbrush_data(tmp_path)
  clip, dino = metric_folders
  run = lambda out, *extra: cli_main(
      ["eval", "magicbrush", "--data", data, "--out", out, "--steps", "2", "--resolution", "64",
       "--clip", clip, "--dino", dino, "--batch-size", "2",
       "--expected", "experiments/uip2p.py:data=cc3m", *extra])
  out = str(tmp_path / "run_a")
  assert run(out) == 0
  printed, err = capsys.readouterr()
  assert "uip2p eval: no --model given: using the embedded tiny random model" in err
  assert "single-turn: 3 edits made" in printed and "multi-turn: 3 edits made" in printed
  assert sorted(os.listdir(os.path.join(out, "multi"))) == ["11-1.png", "11-2.png", "22-1.png"]
  # Multi-turn chains: turn 2 starts from our turn-1 edit, so it differs from single-turn's.
  single2 = np.asarray(PIL.Image.open(os.path.join(out, "single", "11-2.png")))
  multi2 = np.asarray(PIL.Image.open(os.path.join(out, "multi", "11-2.png")))
  assert not np.array_equal(single2, multi2)

  rows = magicbrush.read_csv(os.path.join(out, "single_turn.csv"))
  assert [r["id"] for r in rows] == ["11-1", "11-2", "22-1"]
  # Every turn has a caption, CLIP and DINO, so every metric is a number (values: see
  # test_metrics_reference.py).
  assert np.isfinite([[r[m] for m in magicbrush.METRICS] for r in rows]).all()
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert set(summary["settings"]) == {"single", "multi (all turns)", "multi (final turn)"}
  assert summary["settings"]["multi (final turn)"]["n"] == 2
  np.testing.assert_allclose(summary["settings"]["single"]["l1"],
                             np.mean([r["l1"] for r in rows]))
  assert summary["expected"]["l1"] == 0.0680
  table = open(os.path.join(out, "summary.md")).read()
  assert "| UIP2P, CC12M (paper) | single | | 0.0619 | 0.0174 |" in table

  # Resume: finished edits are not redone; missing ones are.
  os.remove(os.path.join(out, "single", "11-1.png"))
  os.remove(os.path.join(out, "single", "22-1.png"))
  assert run(out, "--turns", "single") == 0
  assert "single-turn: 2 edits made, 1 already on disk" in capsys.readouterr().out
  redone = magicbrush.read_csv(os.path.join(out, "single_turn.csv"))
  for before, after in zip(rows, redone):  # per-record seeds: the same edits
    for metric in magicbrush.METRICS:
      np.testing.assert_allclose(after[metric], before[metric], rtol=1e-4)

  # The folder's edits were made with 2 steps: another setting is refused before any edit.
  assert run(out, "--steps", "3") == 2
  assert "its edits were made with steps 2, this run asks for steps 3" in capsys.readouterr().err

  other = str(tmp_path / "run_b")
  assert run(other, "--turns", "single", "--text-scale", "3", "--label", "B") == 0
  capsys.readouterr()
  assert cli_main(["eval", "compare", out, other]) == 0
  compared = capsys.readouterr().out
  assert "B - A" in compared
  assert sum(line.startswith("| single | ") for line in compared.splitlines()) == 5


def test_ip2p_curve_over_scales(tmp_path, metric_folders, capsys):
  from uip2p_jax.data import builders
  data = str(tmp_path / "data")
  builders.build_sample(data)
  out = str(tmp_path / "curve")
  assert cli_main(["eval", "ip2p-curve", "--data", data, "--kind", "captions", "--out", out,
                   "--steps", "2", "--resolution", "64", "--limit", "2", "--batch-size", "2",
                   "--clip", metric_folders[0], "--text-scales", "3,7.5",
                   "--image-scales", "1.5"]) == 0
  lines = open(os.path.join(out, "ip2p_curve.csv")).read().splitlines()
  assert lines[0] == "model,text_scale,image_scale,n,direction_similarity,image_similarity"
  assert len(lines) == 3 and lines[1].startswith("embedded tiny random model,3.0,1.5,2,")
  assert PIL.Image.open(os.path.join(out, "ip2p_curve.png")).size[0] > 300


def _turn(img_id, turn):
  image = io.BytesIO()
  photo(turn, (32, 32)).save(image, "PNG")
  return {"id": f"{img_id}-{turn}", "img_id": img_id, "turn": turn, "instruction": "add a hat",
          "edited_caption": "", "image": image.getvalue(), "target_image": image.getvalue()}


def test_multi_turn_chain_with_a_missing_turn_is_reported_not_restarted(tmp_path):
  """Session 11 lacks turn 1: its turns 2 and 3 are skipped with the reason, never edited from
  the dataset's source; session 22 is edited."""
  turns = [_turn("11", 2), _turn("11", 3), _turn("22", 1), _turn("22", 2)]
  edited_inputs = []
  identity = lambda images, instructions, seeds: edited_inputs.extend(images) or images
  report = magicbrush.run_edits(turns, identity, str(tmp_path), "multi", 4, 0, progress=False)
  assert report.made == 2 and report.on_disk == 0
  assert report.skipped == [("11-2", "turn 1 of session 11 is not in the data"),
                            ("11-3", "turn 1 of session 11 is not in the data")]
  assert sorted(os.listdir(tmp_path / "multi")) == ["22-1.png", "22-2.png"]
  # Single-turn edits every turn from its own source.
  report = magicbrush.run_edits(turns, identity, str(tmp_path), "single", 4, 0, progress=False)
  assert (report.made, report.skipped) == (4, [])


def test_resumed_eval_refuses_a_folder_made_by_another_model(tmp_path):
  out = str(tmp_path)
  settings = {"model": "/models/a", "steps": 20, "text_scale": 7.5}
  magicbrush.check_edit_settings(out, settings)  # a fresh folder is fine
  magicbrush.record_edit_settings(out, settings)
  magicbrush.check_edit_settings(out, dict(settings))  # the same settings resume
  with pytest.raises(ValueError, match=r"made with model '/models/a', this run asks for model "
                                       r"'/models/b'; give another --out"):
    magicbrush.check_edit_settings(out, {**settings, "model": "/models/b"})
  os.remove(os.path.join(out, magicbrush.EDIT_SETTINGS_FILE))
  os.makedirs(os.path.join(out, "single"))
  photo(0).save(os.path.join(out, "single", "1-1.png"))
  with pytest.raises(ValueError, match="holds edits .* but no edits.json"):
    magicbrush.check_edit_settings(out, settings)
