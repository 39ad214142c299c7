"""Building each dataset kind from its raw format; bad records are skipped and reported."""

import io
import json
import os

import numpy as np
import PIL.Image
import pytest

from sources import TRUNCATED, image_struct, jpeg, texts, write_jsonl, write_parquet, write_tar
from uip2p_jax.cli import main as cli_main
from uip2p_jax.data import builders


def read_all(data_dir, kind, split=None):
  source, info = builders.open_split(data_dir, kind, split)
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}, info


def decoded(data: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_sample_photos_build_with_their_texts(sample_data):
  records, info = read_all(sample_data, "captions")
  assert len(records) == 12 and info.metadata["kind"] == "captions"
  manifest = [json.loads(line) for line in open(builders.sample_manifest())]
  for row in manifest:
    record = records[row["id"]]
    for field in ("input_caption", "instruction", "edited_caption", "reverse_instruction"):
      assert record[field].decode() == row[field]
    image = decoded(record["image"])
    assert image.ndim == 3 and min(image.shape[:2]) == 288
  total = sum(os.path.getsize(os.path.join(os.path.dirname(builders.sample_manifest()), f))
              for f in os.listdir(os.path.dirname(builders.sample_manifest())))
  assert total < 1_000_000


def test_manifest_build_skips_and_reports_bad_records(tmp_path, capsys):
  (tmp_path / "img").mkdir()
  for i in range(3):
    (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
  (tmp_path / "img" / "bad.jpg").write_bytes(TRUNCATED)
  png = io.BytesIO()
  PIL.Image.new("RGBA", (30, 20), (10, 200, 30, 128)).save(png, "PNG")
  (tmp_path / "img" / "alpha.png").write_bytes(png.getvalue())
  rows = [{"image": f"img/{i}.jpg", **texts(i)} for i in range(3)]
  rows += [
      {"image": "img/bad.jpg", **texts(3)},                                   # corrupt image
      {"image": "img/missing.jpg", **texts(4)},                               # no file
      {"image": "img/0.jpg", **{**texts(5), "instruction": ""}, "id": "e"},   # empty text
      {"image": "img/1.jpg", **{**texts(6), "edited_caption": 7}, "id": "t"},  # wrong type
      {"image": "img/alpha.png", **texts(8)},                                 # RGBA: converted
      "{not json",
      {"image": "img/2.jpg", **texts(9)},                                     # duplicate id
  ]
  manifest = write_jsonl(str(tmp_path / "manifest.jsonl"), rows)
  out = str(tmp_path / "data")
  assert cli_main(["data", "build", "captions", "--manifest", manifest, "--out", out]) == 0
  printed = capsys.readouterr().out
  assert "4 records written, 6 skipped" in printed
  records, _ = read_all(out, "captions")
  assert sorted(records) == ["img/0.jpg", "img/1.jpg", "img/2.jpg", "img/alpha.png"]
  assert decoded(records["img/alpha.png"]["image"]).shape == (20, 30, 3)
  skipped = {r["id"]: r["reason"] for r in map(json.loads, open(
      os.path.join(builders.dataset_dir(out, "captions"), "skipped.jsonl")))}
  assert "undecodable image" in skipped["img/bad.jpg"]
  assert "not found" in skipped["img/missing.jpg"]
  assert skipped["e"] == "instruction is missing or empty"
  assert skipped["t"] == "edited_caption must be a string, got int"
  assert "invalid JSON" in skipped["line 9"]
  assert "duplicate id" in skipped["img/2.jpg"]


def test_webdataset_shards_joined_with_instructions(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  write_tar(str(shards / "00000.tar"), {
      "000000000": {"jpg": jpeg(0), "txt": b"caption zero", "json": b'{"caption": "x"}'},
      "000000001": {"jpg": jpeg(1), "json": b'{"caption": "caption one"}'},
      "000000002": {"jpg": TRUNCATED, "txt": b"broken"},
  })
  write_tar(str(shards / "00001.tar"), {
      "000000003": {"jpg": jpeg(3), "txt": b"caption three"},
      "000000004": {"txt": b"no image here"},
      "000000005": {"jpg": jpeg(5), "txt": b"no instruction for me"},
  })
  rows = [{"key": f"00000000{i}", **{k: v for k, v in texts(i).items() if k != "input_caption"}}
          for i in (0, 1, 2, 3, 4, 7)]
  instructions = write_jsonl(str(tmp_path / "instructions.jsonl"), rows)
  out = str(tmp_path / "data")
  report = builders.build("captions", lambda: builders.webdataset_records(
      str(shards / "{00000..00001}.tar"), instructions), out)
  records, _ = read_all(out, "captions")
  assert sorted(records) == ["000000000", "000000001", "000000003"]
  assert records["000000000"]["input_caption"] == b"caption zero"   # txt wins over json
  assert records["000000001"]["input_caption"] == b"caption one"    # json caption
  assert records["000000003"]["reverse_instruction"] == b"undo red 3"
  reasons = dict(report.skipped)
  assert "undecodable" in reasons["000000002"]
  assert "no image" in reasons["000000004"]
  assert reasons["000000005"] == "no instruction record for this key"
  assert reasons["000000007"] == "instruction record has no image in the shards"


def test_brace_patterns_expand_to_existing_files(tmp_path):
  for name in ("a00.tar", "a01.tar", "a03.tar", "b.tar"):
    (tmp_path / name).write_bytes(b"")
  assert [os.path.basename(p) for p in builders.expand_pattern(
      str(tmp_path / "a{00..03}.tar"))] == ["a00.tar", "a01.tar", "a03.tar"]
  assert len(builders.expand_pattern(str(tmp_path / "{a,b}*.tar"))) == 4
  with pytest.raises(FileNotFoundError, match="no webdataset shard files match"):
    list(builders.webdataset_records(str(tmp_path / "none*.tar"), write_jsonl(
        str(tmp_path / "i.jsonl"), [])))


def ip2p_parquet(path, n=4, bad_row=None):
  images = [jpeg(i) for i in range(n)]
  edited = [jpeg(100 + i) if i != bad_row else TRUNCATED for i in range(n)]
  return write_parquet(path, {
      "original_prompt": [texts(i)["input_caption"] for i in range(n)],
      "original_image": [image_struct(b) for b in images],
      "edit_prompt": [texts(i)["instruction"] for i in range(n)],
      "edited_prompt": [texts(i)["edited_caption"] for i in range(n)],
      "edited_image": [image_struct(b) for b in edited],
  }), images, edited


def test_ip2p_parquet_with_reverse_instructions(tmp_path):
  (tmp_path / "pq").mkdir()
  path, images, edited = ip2p_parquet(str(tmp_path / "pq" / "part-0.parquet"), bad_row=2)
  reverse = write_jsonl(str(tmp_path / "rev.jsonl"), [
      {"id": "part-0-000000", "reverse_instruction": "by id"},
      {"input_caption": texts(1)["input_caption"], "instruction": texts(1)["instruction"],
       "reverse_instruction": "by text"},
      {"id": "part-0-000002", "reverse_instruction": "bad image row"},
  ])
  out = str(tmp_path / "data")
  assert cli_main(["data", "build", "ip2p", "--parquet", str(tmp_path / "pq" / "*.parquet"),
                   "--reverse-instructions", reverse, "--out", out]) == 0
  records, info = read_all(out, "ip2p")
  assert info.metadata["has_reverse"] is True
  assert sorted(records) == ["part-0-000000", "part-0-000001"]   # 2: corrupt, 3: no reverse
  assert records["part-0-000000"]["reverse_instruction"] == b"by id"
  assert records["part-0-000001"]["reverse_instruction"] == b"by text"
  assert records["part-0-000001"]["edited_image"] == edited[1]
  assert records["part-0-000001"]["image"] == images[1]           # original bytes kept


def test_ip2p_without_reverse_is_for_the_supervised_baseline_only(tmp_path):
  path, _, _ = ip2p_parquet(str(tmp_path / "p.parquet"), n=2)
  out = str(tmp_path / "data")
  report = builders.build("ip2p", lambda: builders.ip2p_records(path), out,
                          metadata={"has_reverse": False})
  assert report.written == 2
  records, _ = read_all(out, "ip2p")
  assert records["p-000000"]["reverse_instruction"] == b""
  from uip2p_jax.data.loader import LoaderConfig, make_dataset
  with pytest.raises(ValueError, match="without reverse instructions"):
    make_dataset(LoaderConfig(out, kind="ip2p", num_workers=0))
  make_dataset(LoaderConfig(out, kind="ip2p", num_workers=0, require_reverse=False))


def test_parquet_schema_errors_name_the_missing_columns(tmp_path):
  path = write_parquet(str(tmp_path / "x.parquet"), {"original_prompt": ["a"]})
  with pytest.raises(ValueError, match=r"missing columns \['original_image'"):
    list(builders.ip2p_records(path))


def test_magicbrush_turns_and_descriptions(tmp_path):
  rows = [("327726", 1), ("327726", 2), ("327726", 3), ("99", 1)]
  path = write_parquet(str(tmp_path / "test-0.parquet"), {
      "img_id": [r[0] for r in rows], "turn_index": [r[1] for r in rows],
      "source_img": [image_struct(jpeg(i)) for i in range(4)],
      "mask_img": [image_struct(jpeg(50 + i)) for i in range(4)],
      "target_img": [image_struct(jpeg(10 + i) if i != 2 else TRUNCATED) for i in range(4)],
      "instruction": ["add a hat", "make it red", "remove the dog", "add snow"],
  })
  descriptions = tmp_path / "global_descriptions.json"
  descriptions.write_text(json.dumps({
      "327726": {"327726-input.png": "a dog", "327726-output1.png": "a dog with a hat",
                 "327726-output2.png": "a red dog with a hat",
                 "327726-output3.png": "a hat"},
      "99": {"99-input.png": "a road", "99-output1.png": "a snowy road"}}))
  out = str(tmp_path / "data")
  assert cli_main(["data", "build", "magicbrush", "--parquet", path, "--descriptions",
                   str(descriptions), "--out", out]) == 0
  records, info = read_all(out, "magicbrush")   # the "test" split
  assert sorted(records) == ["327726-1", "327726-2", "99-1"]
  second = records["327726-2"]
  assert second["turn_index"] == 2 and second["img_id"] == b"327726"
  assert second["input_caption"] == b"a dog with a hat"
  assert second["edited_caption"] == b"a red dog with a hat"
  assert second["target_image"] == jpeg(11)


def test_rebuild_over_partial_build_and_existing_dataset(tmp_path, sample_data):
  out = tmp_path / "data"
  stale = out / "uip2p_captions" / "incomplete.ABC123_1.0.0"
  stale.mkdir(parents=True)
  (stale / "uip2p_captions-train.array_record-00000-of-00001").write_bytes(b"half written")
  assert builders.build_sample(str(out)).written == 12
  assert not stale.exists()
  with pytest.raises(FileExistsError, match="--overwrite"):
    builders.build_sample(str(out))
  assert builders.build_sample(str(out), overwrite=True).written == 12
  assert len(read_all(str(out), "captions")[0]) == 12


def test_opening_the_wrong_kind_or_nothing_is_a_clear_error(tmp_path, sample_data):
  with pytest.raises(ValueError, match="holds 'captions' records, expected 'ip2p'"):
    builders.open_split(builders.dataset_dir(sample_data, "captions"), "ip2p")
  with pytest.raises(FileNotFoundError, match="uip2p data build magicbrush"):
    builders.open_split(str(tmp_path), "magicbrush")
