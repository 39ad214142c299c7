"""The `uip2p edit` command: one image, JSONL batches with bad records, clear errors."""

import json

import numpy as np
from PIL import Image

from uip2p_jax.cli import main

FAST = ["--resolution", "64", "--steps", "2"]


def _image(path, size=(96, 64)):
  Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255)
                  .astype(np.uint8)).save(path)
  return str(path)


def test_edit_one_image_with_embedded_model(tmp_path, capsys):
  out = tmp_path / "out.png"
  assert main(["edit", "--image", _image(tmp_path / "in.jpg"), "--instruction", "make it snowy",
               "--out", str(out), *FAST]) == 0
  assert Image.open(out).size == (64, 64)  # 96x64 -> longest side 64, multiples of 64
  assert "embedded tiny random model" in capsys.readouterr().err


def test_edit_batch_skips_bad_records(tmp_path, capsys):
  _image(tmp_path / "a.jpg")
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  records = [
      {"image": "a.jpg", "instruction": "add fog", "out": "out/a.png"},
      {"image": "missing.jpg", "instruction": "add fog", "out": "out/m.png"},
      {"image": "a.jpg", "instruction": "", "out": "out/e.png"},
      {"image": "broken.jpg", "instruction": "add fog", "out": "out/b.png"},
      {"image": "a.jpg", "instruction": "make it night", "out": "out/c.png"},
  ]
  lines = [json.dumps(r) for r in records] + ["{not json"]
  (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
  status = main(["edit", "--batch", str(tmp_path / "records.jsonl"), "--batch-size", "2", *FAST])
  err = capsys.readouterr().err
  assert status == 3
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
  for line, reason in ((2, "no such image"), (3, "empty or missing instruction"),
                       (4, "unreadable image"), (6, "invalid JSON")):
    assert f"records.jsonl:{line}: " in err and reason in err, (line, err)
  assert "edited 2 image(s), skipped 4 bad record(s)" in err


def test_edit_errors_are_one_line(tmp_path, capsys):
  image = _image(tmp_path / "in.jpg")
  assert main(["edit", "--model", str(tmp_path / "nope"), "--image", image, "--instruction",
               "x", "--out", str(tmp_path / "o.png")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"uip2p edit: error: {tmp_path / 'nope'}: no such folder (and not a Hugging "
                 "Face repo id)"]
  assert main(["edit", "--image", str(tmp_path / "missing.jpg"), "--instruction", "x",
               "--out", str(tmp_path / "o.png"), *FAST]) == 2
  assert "no such image file" in capsys.readouterr().err


def test_demo_runs_every_model_and_the_edit(tmp_path, capsys):
  assert main(["demo", "--steps", "1", "--out-dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "rows sum to 1.0000" in out and "demo finished" in out
  assert Image.open(tmp_path / "edited.png").size == (64, 64)
