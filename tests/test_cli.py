"""The `uip2p` command: edit (one image, JSONL batches with bad records, reruns), argument
errors, the demo."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from uip2p_jax.cli import main

FAST = ["--model", "tiny-random", "--resolution", "64", "--steps", "2"]


def _image(path, size=(96, 64)):
  Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255)
                  .astype(np.uint8)).save(path)
  return str(path)


def test_edit_one_image_with_the_tiny_model(tmp_path):
  out = tmp_path / "out.png"
  assert main(["edit", "--image", _image(tmp_path / "in.jpg"), "--instruction", "make it snowy",
               "--out", str(out), *FAST]) == 0
  assert Image.open(out).size == (64, 64)  # 96x64 -> longest side 64, multiples of 64


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
  # The shipped ShapesWorld editor's edit of the demo scene, as the probe reads it.
  assert ("shapes-cec on a rendered scene (a large red circle in the top left corner and a large "
          "green square in the bottom right corner on a gray background), 'make the red circle "
          "blue'") in out
  assert ("the probe reads the edit as: a large blue circle in the top left corner and a large "
          "green square in the bottom right corner on a gray background") in out
  assert Image.open(tmp_path / "shapes_edited.png").size == (64, 64)


@pytest.mark.parametrize("argv, message", [
    (["plan", "--config", "x.py", "--global-batch", "8", "--mesh", "foo"],
     "argument --mesh: 'foo': expected data=N,fsdp=M"),
    (["edit", "--batch", "r.jsonl", "--batch-size", "0"],
     "argument --batch-size: 0: expected a whole number of at least 1"),
    (["edit", "--batch", "r.jsonl", "--steps", "-3"], "argument --steps: -3"),
    (["edit", "--batch", "r.jsonl", "--resolution", "32"],
     "argument --resolution: 32: expected a resolution in pixels of at least 64"),
    (["app", "--port", "0"], "argument --port: 0: expected a port number of at least 1"),
    # Outputs in a bucket are checked before any work (gs:// needs gcsfs, absent in the tests).
    (["eval", "shapes", "--data", "d", "--out", "ftp://b/x"], "argument --out: ftp:// is not"),
    (["eval", "shapes", "--data", "d", "--out", "gs://b/x"], "--out: gs:// is read and written "
     "with gcsfs, which is not installed here"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_edit_batch_unwritable_output_reruns_and_overwrite(tmp_path, capsys):
  """An unwritable output is a bad record (line named, checked before any edit); a rerun keeps
  the outputs that exist; --overwrite redoes them."""
  _image(tmp_path / "a.jpg")
  records = [{"image": "a.jpg", "instruction": "add fog", "out": "/proc/y.png"},
             {"image": "a.jpg", "instruction": "add fog", "out": "out/good.png"},
             {"image": "a.jpg", "instruction": "add fog", "out": "out/good.gif"}]
  (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  run = lambda *extra: main(["edit", "--batch", str(tmp_path / "records.jsonl"),
                             "--batch-size", "2", *FAST, *extra])
  assert run() == 3
  err = capsys.readouterr().err
  assert "records.jsonl:1: /proc/y.png: cannot write" in err
  assert "records.jsonl:3: " in err and "unknown image extension '.gif'" in err
  assert "edited 1 image(s), skipped 2 bad record(s)" in err
  good = tmp_path / "out" / "good.png"
  assert Image.open(good).size == (64, 64)
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]  # no temp files

  os.utime(good, (0, 0))
  assert run() == 3
  assert "edited 0 image(s), kept 1 existing output(s)" in capsys.readouterr().err
  assert os.stat(good).st_mtime == 0  # kept, not rewritten
  assert run("--overwrite") == 3
  assert "edited 1 image(s), skipped 2 bad record(s)" in capsys.readouterr().err
  assert os.stat(good).st_mtime > 0


def test_edit_checks_the_output_before_loading_a_model(tmp_path, capsys):
  image = _image(tmp_path / "in.jpg")
  # The model does not exist either: the output is checked first, so its error is the one.
  assert main(["edit", "--model", str(tmp_path / "nope"), "--image", image, "--instruction",
               "x", "--out", str(tmp_path / "o.txt")]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      f"uip2p edit: error: {tmp_path / 'o.txt'}: unknown image extension '.txt'; expected one "
      "of .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff"]
