"""Building each dataset kind from its raw format; bad records are skipped and reported."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from raw_files import TRUNCATED, image_struct, jpeg, texts, write_jsonl, write_parquet, write_tar
from uip2p_jax.data import builders, sources


def read_all(data_dir, kind, split=None):
  source, info = builders.open_split(data_dir, kind, split)
  return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}, info


def decoded(data: bytes) -> np.ndarray:
  return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_sample_photos_build_with_their_texts(sample_data):
  records, info = read_all(sample_data, "captions")
  assert len(records) == 12 and info.metadata["kind"] == "captions"
  manifest = [json.loads(line) for line in open(sources.sample_manifest())]
  for row in manifest:
    record = records[row["id"]]
    for field in ("input_caption", "instruction", "edited_caption", "reverse_instruction"):
      assert record[field].decode() == row[field]
    image = decoded(record["image"])
    assert image.ndim == 3 and min(image.shape[:2]) == 288
  total = sum(os.path.getsize(os.path.join(os.path.dirname(sources.sample_manifest()), f))
              for f in os.listdir(os.path.dirname(sources.sample_manifest())))
  assert total < 1_000_000


def skipped_file(out, kind):
  """skipped.jsonl as {where: entry}."""
  path = os.path.join(builders.dataset_dir(out, kind), "skipped.jsonl")
  return {r["where"]: r for r in map(json.loads, open(path))}


def test_manifest_build_skips_and_reports_bad_records(tmp_path):
  (tmp_path / "img").mkdir()
  for i in range(3):
    (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(i))
  (tmp_path / "img" / "bad.jpg").write_bytes(TRUNCATED)
  png = io.BytesIO()
  PIL.Image.new("RGBA", (30, 20), (10, 200, 30, 128)).save(png, "PNG")
  (tmp_path / "img" / "alpha.png").write_bytes(png.getvalue())
  rows = [{"image": f"img/{i}.jpg", **texts(i)} for i in range(3)]              # lines 1-3
  rows += [
      {"image": "img/bad.jpg", **texts(3)},                                   # 4: corrupt image
      {"image": "img/missing.jpg", **texts(4)},                               # 5: no file
      {"image": "img/0.jpg", **{**texts(5), "instruction": ""}, "id": "e"},   # 6: empty text
      {"image": "img/1.jpg", **{**texts(6), "edited_caption": 7}, "id": "t"},  # 7: wrong type
      {"image": "img/alpha.png", **texts(8)},                                 # 8: RGBA: converted
      "{not json",                                                            # 9
      {"image": "img/2.jpg", **texts(9)},                       # 10: line 3's image, new edit
      {"image": "img/0.jpg", **texts(10), "id": "x"},           # 11: written as "x"
      {"image": "img/bad.jpg", **texts(11), "id": "x"},         # 12: skipped, also "x"
      {"image": "img/1.jpg", **texts(12), "id": "x"},           # 13: duplicate id
  ]
  manifest = write_jsonl(str(tmp_path / "manifest.jsonl"), rows)
  out = str(tmp_path / "data")
  report = builders.build("captions", lambda: sources.manifest_records(manifest), out)
  assert (report.written, report.num_skipped) == (6, 7)
  assert "skipped manifest.jsonl:12 (id x): undecodable image" in report.summary()
  records, _ = read_all(out, "captions")
  assert sorted(records) == ["img/0.jpg@1", "img/1.jpg@2", "img/2.jpg@10", "img/2.jpg@3",
                             "img/alpha.png@8", "x"]
  assert records["img/2.jpg@10"]["instruction"] == texts(9)["instruction"].encode()
  assert records["x"]["instruction"] == texts(10)["instruction"].encode()
  assert decoded(records["img/alpha.png@8"]["image"]).shape == (20, 30, 3)
  skipped = skipped_file(out, "captions")
  assert list(skipped) == [f"manifest.jsonl:{n}" for n in (4, 5, 6, 7, 9, 12, 13)]
  assert skipped["manifest.jsonl:4"]["id"] == "img/bad.jpg@4"
  assert "undecodable image" in skipped["manifest.jsonl:4"]["reason"]
  assert "not found" in skipped["manifest.jsonl:5"]["reason"]
  assert skipped["manifest.jsonl:6"] == {"id": "e", "where": "manifest.jsonl:6",
                                         "reason": "instruction is missing or empty"}
  assert skipped["manifest.jsonl:7"]["reason"] == "edited_caption must be a string, got int"
  assert skipped["manifest.jsonl:9"]["id"] is None
  assert "invalid JSON" in skipped["manifest.jsonl:9"]["reason"]
  assert skipped["manifest.jsonl:12"]["id"] == "x"
  assert skipped["manifest.jsonl:13"]["reason"] == "duplicate id (first kept: manifest.jsonl:11)"


def test_read_jsonl_yields_bad_lines_with_their_number_and_text(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"a": 1}\n\n[1, 2]\r\n{broken\n  \n"text"')
  lines = list(sources.read_jsonl(str(path)))
  assert lines == [(1, {"a": 1}, '{"a": 1}'), (3, None, "[1, 2]"), (4, None, "{broken"),
                   (6, None, '"text"')]
  assert sources.jsonl_error("[1, 2]") == "expected a JSON object, got list"
  assert sources.jsonl_error("{broken").startswith("invalid JSON (")
  assert sources.jsonl_error('{"a": 1}') == ""


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
  rows.append({**rows[0], "instruction": "a second instruction for key 0"})   # line 7
  rows.append({"instruction": "no key"})                                      # line 8
  instructions = write_jsonl(str(tmp_path / "instructions.jsonl"), rows)
  out = str(tmp_path / "data")
  report = builders.build("captions", lambda: sources.webdataset_records(
      str(shards / "{00000..00001}.tar"), instructions), out)
  records, _ = read_all(out, "captions")
  assert sorted(records) == ["000000000", "000000001", "000000003"]
  assert records["000000000"]["input_caption"] == b"caption zero"   # txt wins over json
  assert records["000000000"]["instruction"] == texts(0)["instruction"].encode()  # first kept
  assert records["000000001"]["input_caption"] == b"caption one"    # json caption
  assert records["000000003"]["reverse_instruction"] == b"undo red 3"
  reasons = {skip.where: (skip.id, skip.reason) for skip in report.skipped}
  assert reasons == {
      "instructions.jsonl:7": (None, "duplicate of instructions.jsonl:1 (first kept)"),
      "instructions.jsonl:8": (None, "no 'key' field"),
      f"{shards}/00000.tar:000000002": ("000000002", reasons[f"{shards}/00000.tar:000000002"][1]),
      f"{shards}/00001.tar:000000004": ("000000004", reasons[f"{shards}/00001.tar:000000004"][1]),
      f"{shards}/00001.tar:000000005": ("000000005", "no instruction record for this key"),
      "instructions.jsonl:6": ("000000007", "instruction record has no image in the shards")}
  assert "undecodable" in reasons[f"{shards}/00000.tar:000000002"][1]
  assert "no image" in reasons[f"{shards}/00001.tar:000000004"][1]


def test_brace_patterns_expand_to_existing_files(tmp_path):
  for name in ("a00.tar", "a01.tar", "a03.tar", "b.tar"):
    (tmp_path / name).write_bytes(b"")
  assert [os.path.basename(p) for p in sources.expand_pattern(
      str(tmp_path / "a{00..03}.tar"))] == ["a00.tar", "a01.tar", "a03.tar"]
  assert len(sources.expand_pattern(str(tmp_path / "{a,b}*.tar"))) == 4
  with pytest.raises(FileNotFoundError, match="no webdataset shard files match"):
    list(sources.webdataset_records(str(tmp_path / "none*.tar"), write_jsonl(
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
  report = builders.build("ip2p", lambda: sources.ip2p_records(
      str(tmp_path / "pq" / "*.parquet"), reverse), out, metadata={"has_reverse": True})
  records, info = read_all(out, "ip2p")
  assert info.metadata["has_reverse"] is True
  assert sorted(records) == ["part-0-000000", "part-0-000001"]   # 2: corrupt, 3: no reverse
  assert [(skip.id, skip.where) for skip in report.skipped] == [
      ("part-0-000002", f"{path}:row 2"), ("part-0-000003", f"{path}:row 3")]
  assert report.skipped[1].reason == "no reverse instruction for this record"
  assert records["part-0-000000"]["reverse_instruction"] == b"by id"
  assert records["part-0-000001"]["reverse_instruction"] == b"by text"
  assert records["part-0-000001"]["edited_image"] == edited[1]
  assert records["part-0-000001"]["image"] == images[1]           # original bytes kept


def test_ip2p_without_reverse_is_for_the_supervised_baseline_only(tmp_path):
  path, _, _ = ip2p_parquet(str(tmp_path / "p.parquet"), n=2)
  out = str(tmp_path / "data")
  report = builders.build("ip2p", lambda: sources.ip2p_records(path), out,
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
    list(sources.ip2p_records(path))


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
  report = builders.build("magicbrush", lambda: sources.magicbrush_records(
      path, str(descriptions)), out)
  records, info = read_all(out, "magicbrush")   # the "test" split
  assert sorted(records) == ["327726-1", "327726-2", "99-1"]
  assert [(skip.id, skip.where) for skip in report.skipped] == [("327726-3", f"{path}:row 2")]
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


def test_missing_inputs_fail_before_anything_is_written(tmp_path):
  out = tmp_path / "data"
  manifest = write_jsonl(str(tmp_path / "m.jsonl"), [])
  parquet, _, _ = ip2p_parquet(str(tmp_path / "p.parquet"), n=1)
  missing = str(tmp_path / "missing.jsonl")
  cases = [
      ("captions", lambda: sources.manifest_records(missing), "manifest not found"),
      ("captions", lambda: sources.webdataset_records(str(tmp_path / "*.tar"), manifest),
       "no webdataset shard files match"),
      ("captions", lambda: sources.webdataset_records(str(tmp_path / "*.tar"), missing),
       "instructions file not found"),
      ("ip2p", lambda: sources.ip2p_records(str(tmp_path / "none-*.parquet")),
       "no parquet files match"),
      ("ip2p", lambda: sources.ip2p_records(parquet, missing),
       "reverse instructions file not found"),
      ("magicbrush", lambda: sources.magicbrush_records(parquet), r"missing columns \['img_id'"),
  ]
  for kind, source, message in cases:
    with pytest.raises((FileNotFoundError, ValueError), match=message):
      builders.build(kind, source, str(out))
    assert not out.exists(), message


def test_a_build_with_no_good_record_is_an_error_and_still_lists_why(tmp_path):
  (tmp_path / "bad.jpg").write_bytes(TRUNCATED)
  manifest = write_jsonl(str(tmp_path / "m.jsonl"), [
      {"image": "bad.jpg", **texts(0)}, {"image": "gone.jpg", **texts(1)}, "[]"])
  out = str(tmp_path / "data")
  with pytest.raises(builders.NothingWritten,
                     match=r"all 3 captions records were skipped, nothing written; first: "
                           r"m.jsonl:1 \(id bad.jpg@1\): undecodable image.*m.jsonl:2 .*"
                           r"image file not found.*skipped.jsonl") as error:
    builders.build("captions", lambda: sources.manifest_records(manifest), out)
  assert error.value.report.num_skipped == 3 and error.value.report.written == 0
  assert list(skipped_file(out, "captions")) == ["m.jsonl:1", "m.jsonl:2", "m.jsonl:3"]
  assert os.listdir(os.path.join(out, "uip2p_captions")) == ["1.0.0"]   # no incomplete.* left
  # Fixing the input and building again needs no --overwrite: nothing was built.
  (tmp_path / "bad.jpg").write_bytes(jpeg(0))
  assert builders.build("captions", lambda: sources.manifest_records(manifest), out).written == 1
  # An empty source is the same error, and leaves no folder behind.
  empty, empty_out = write_jsonl(str(tmp_path / "empty.jsonl"), []), tmp_path / "empty_out"
  with pytest.raises(builders.NothingWritten, match="the source is empty"):
    builders.build("captions", lambda: sources.manifest_records(empty), str(empty_out))
  assert not empty_out.exists()


def test_a_missing_input_leaves_an_existing_dataset_alone(tmp_path):
  out = str(tmp_path / "data")
  (tmp_path / "a.jpg").write_bytes(jpeg(0))
  manifest = write_jsonl(str(tmp_path / "m.jsonl"), [{"image": "a.jpg", **texts(0)}])
  builders.build("captions", lambda: sources.manifest_records(manifest), out)
  with pytest.raises(FileNotFoundError, match="manifest not found"):
    builders.build("captions", lambda: sources.manifest_records(str(tmp_path / "x.jsonl")), out,
                   overwrite=True)
  assert list(read_all(out, "captions")[0]) == ["a.jpg@1"]


def test_own_pairs_from_a_folder_and_jsonl(tmp_path, capsys):
  """`data build pairs --manifest`: ip2p records; a missing or undecodable edited image (or
  instruction) is skipped and reported; captions and reverse are optional (CEC needs them)."""
  from uip2p_jax import cli
  for i in range(3):
    (tmp_path / f"in{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / f"out{i}.jpg").write_bytes(jpeg(10 + i))
  (tmp_path / "broken.jpg").write_bytes(TRUNCATED)
  pair = lambda i, **extra: {"input_image": f"in{i}.jpg", "edited_image": f"out{i}.jpg",
                             "instruction": f"edit {i}", **extra}
  manifest = write_jsonl(str(tmp_path / "pairs.jsonl"), [
      pair(0, input_caption="a cat", edited_caption="a dog"),          # 1
      pair(1, id="mine"),                                               # 2
      pair(2, edited_image="gone.jpg"),                                 # 3: no edited image
      pair(2, edited_image="broken.jpg"),                               # 4: undecodable
      pair(2, instruction=""),                                          # 5: no instruction
      pair(2),                                                          # 6
  ])
  out = str(tmp_path / "data")
  assert cli.main(["data", "build", "pairs", "--manifest", manifest, "--out", out]) == 3
  printed = capsys.readouterr().out
  assert "3 records written, 3 skipped" in printed
  assert "pairs.jsonl:3 (id in2.jpg@3): edited_image file not found" in printed
  assert "pairs.jsonl:4 (id in2.jpg@4): edited_image: undecodable image" in printed
  assert "cec needs a reverse_instruction" in printed
  records, info = read_all(out, "ip2p")
  assert sorted(records) == ["in0.jpg@1", "in2.jpg@6", "mine"]
  assert records["mine"]["edited_image"] == jpeg(11) and records["mine"]["image"] == jpeg(1)
  assert records["in0.jpg@1"]["edited_caption"] == b"a dog"
  assert records["mine"]["input_caption"] == b"" and records["mine"]["instruction"] == b"edit 1"
  assert info.metadata["has_reverse"] is False and info.metadata["has_captions"] is False
  assert list(skipped_file(out, "ip2p")) == ["pairs.jsonl:3", "pairs.jsonl:4", "pairs.jsonl:5"]


def test_own_pairs_from_parquet_with_column_names(tmp_path, capsys):
  """Hugging Face's small IP2P sets' layout: images as {bytes, path} structs or bytes,
  mapped by --columns; with captions and reverse on every pair the set trains CEC too."""
  from uip2p_jax import cli
  from uip2p_jax.data.loader import LoaderConfig, make_dataset
  n = 3
  path = write_parquet(str(tmp_path / "train-0.parquet"), {
      "original_image": [image_struct(jpeg(i)) for i in range(n)],
      "edited_image": [jpeg(20), None, TRUNCATED],                      # bytes, missing, bad
      "edit_prompt": [f"edit {i}" for i in range(n)],
      "original_prompt": [f"before {i}" for i in range(n)],
      "edited_prompt": [f"after {i}" for i in range(n)],
      "undo": [f"undo {i}" for i in range(n)],
  })
  out = str(tmp_path / "data")
  columns = ("input_image=original_image,edited_image=edited_image,instruction=edit_prompt,"
             "input_caption=original_prompt,edited_caption=edited_prompt,"
             "reverse_instruction=undo")
  argv = ["data", "build", "pairs", "--parquet", str(tmp_path / "*.parquet"), "--out", out,
          "--columns", columns]
  assert cli.main(argv) == 3
  printed = capsys.readouterr().out
  assert f"{path}:row 1 (id train-0-000001): edited_image: image is missing" in printed
  assert f"{path}:row 2 (id train-0-000002): edited_image: undecodable image" in printed
  assert "objectives: ip2p and cec" in printed
  records, info = read_all(out, "ip2p")
  assert list(records) == ["train-0-000000"] and info.metadata["has_reverse"] is True
  assert records["train-0-000000"]["reverse_instruction"] == b"undo 0"
  make_dataset(LoaderConfig(out, kind="ip2p", num_workers=0))     # CEC accepts it
  # A mapped column the files lack, or an unknown field, is an error naming it.
  assert cli.main(argv[:-1] + [columns.replace("=edit_prompt", "=prompt"), "--overwrite"]) == 2
  assert "missing columns ['prompt']" in capsys.readouterr().err
  assert cli.main(argv[:-1] + ["caption=x"]) == 2
  assert "FIELD one of id, input_image" in capsys.readouterr().err
  # Refused for the kinds that do not take it (captions would read its manifest without it).
  assert cli.main(["data", "build", "captions", "--manifest", "m.jsonl", "--out", out,
                   "--columns", columns]) == 2
  assert "--columns is for `data build pairs` only, not captions" in capsys.readouterr().err


def dataset_files(out, kind):
  """{file name: bytes} of a built dataset's folder."""
  target = builders.dataset_dir(out, kind)
  return {name: open(os.path.join(target, name), "rb").read() for name in os.listdir(target)}


def test_workers_give_the_same_dataset_and_skip_report(tmp_path, capsys):
  """Shards (tar files) built by 3 spawned workers, through the CLI: the same files and skip
  report as one process, ids repeated across shards dropped in input order."""
  from uip2p_jax import cli
  shards = tmp_path / "shards"
  shards.mkdir()
  samples = lambda *keys: {f"{k:09d}": {"jpg": jpeg(k) if k != 6 else TRUNCATED,
                                        "txt": f"caption {k}".encode()} for k in keys}
  write_tar(str(shards / "00000.tar"), samples(0, 1, 2))
  write_tar(str(shards / "00001.tar"), samples(3, 1, 4))     # 1 again: a duplicate id
  write_tar(str(shards / "00002.tar"), samples(5, 6, 7))     # 6: corrupt; 7: no instruction
  write_tar(str(shards / "00003.tar"), samples(8))
  rows = [{"key": f"{k:09d}", **{f: v for f, v in texts(k).items() if f != "input_caption"}}
          for k in (0, 1, 2, 3, 4, 5, 6, 8, 9)]                # 9: no image in the shards
  rows.insert(2, "{broken")
  instructions = write_jsonl(str(tmp_path / "instructions.jsonl"), rows)
  pattern = str(shards / "*.tar")
  one = str(tmp_path / "one")
  report = builders.build("captions", lambda: sources.webdataset_records(pattern, instructions),
                          one, metadata={"source": pattern})
  three = str(tmp_path / "three")
  assert cli.main(["data", "build", "captions", "--webdataset", pattern, "--instructions",
                   instructions, "--out", three, "--workers", "3", "--no-progress"]) == 3
  assert "7 records written, 5 skipped" in capsys.readouterr().out
  files = dataset_files(one, "captions")
  assert files == dataset_files(three, "captions")
  assert sorted(files)[-1] == "uip2p_captions-train.array_record-00003-of-00004"
  assert [(skip.id, skip.where) for skip in report.skipped] == [
      (None, "instructions.jsonl:3"), ("000000001", f"{shards}/00001.tar:000000001"),
      ("000000006", f"{shards}/00002.tar:000000006"),
      ("000000007", f"{shards}/00002.tar:000000007"), ("000000009", "instructions.jsonl:10")]
  assert report.skipped[1].reason == f"duplicate id (first kept: {shards}/00000.tar:000000001)"
  assert list(skipped_file(three, "captions")) == [skip.where for skip in report.skipped]
  records, _ = read_all(three, "captions")
  assert sorted(records) == [f"{k:09d}" for k in (0, 1, 2, 3, 4, 5, 8)]
  assert records["000000001"]["input_caption"] == b"caption 1"


def test_spawned_workers_import_no_jax():
  """A spawned worker re-imports the main module: through the `uip2p` script, uip2p_jax.cli."""
  code = ("import sys, uip2p_jax.cli, uip2p_jax.data.builders; "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))")
  found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
  assert found.strip() == "[]"


def test_a_killed_build_resumes_at_its_first_unfinished_shard(tmp_path, monkeypatch, capsys):
  """Stopped after two of four shards, with the third half written: the rerun builds shards
  2 and 3 only and gives the uninterrupted build's files; a finished one needs overwrite."""
  for i in range(4):
    (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
  rows = [{"image": f"{i % 4}.jpg", **texts(i), "id": f"r{i}"} for i in range(8)]
  rows[5]["id"] = "r1"                                                  # across shards
  rows[6]["image"] = "gone.jpg"
  manifest = write_jsonl(str(tmp_path / "m.jsonl"), rows)
  source = lambda: sources.manifest_records(manifest, lines_per_shard=2)
  whole = str(tmp_path / "whole")
  builders.build("captions", source, whole)
  ran = []

  def stop_after_two(index):
    ran.append(index)
    if len(ran) == 2:
      raise KeyboardInterrupt
  monkeypatch.setattr(builders, "_after_shard", stop_after_two)
  out = str(tmp_path / "out")
  with pytest.raises(KeyboardInterrupt):
    builders.build("captions", source, out)
  target = builders.dataset_dir(out, "captions")
  third = os.path.join(target, "uip2p_captions-train.array_record-00002-of-00004")
  # Killed while writing or committing shard 2 (its worker, or an orphaned one's, own file).
  for path in (third, third + ".partial", third + ".partial.123-0a1b2c3d"):
    open(path, "wb").write(b"half written")
  assert not os.path.exists(os.path.join(target, "dataset_info.json"))
  ran.clear()
  monkeypatch.setattr(builders, "_after_shard", ran.append)
  report = builders.build("captions", source, out)
  assert ran == [2, 3] and "resuming an unfinished build (2 of 4 shards" in capsys.readouterr().err
  assert report.written == 6
  assert [skip.where for skip in report.skipped] == ["m.jsonl:6", "m.jsonl:7"]
  assert dataset_files(out, "captions") == dataset_files(whole, "captions")
  with pytest.raises(FileExistsError, match="already holds a built dataset.*--overwrite"):
    builders.build("captions", source, out)
  # Other settings start over: an unfinished build is never mixed with another's shards.
  monkeypatch.setattr(builders, "_after_shard", stop_after_two)
  ran.clear()
  with pytest.raises(KeyboardInterrupt):
    builders.build("captions", source, out, overwrite=True)
  monkeypatch.setattr(builders, "_after_shard", None)
  builders.build("captions", lambda: sources.manifest_records(manifest, lines_per_shard=3), out)
  assert "starting over" in capsys.readouterr().err
  assert read_all(out, "captions")[0].keys() == read_all(whole, "captions")[0].keys()


def test_one_build_at_a_time_and_damaged_state_files(tmp_path, monkeypatch, capsys):
  """A second build of a folder being written is refused; a damaged marker's shard is built
  again; a damaged plan starts the build over; a worker whose main process died commits
  nothing."""
  for i in range(2):
    (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
  manifest = write_jsonl(str(tmp_path / "m.jsonl"),
                         [{"image": f"{i % 2}.jpg", **texts(i)} for i in range(4)])
  source = lambda: sources.manifest_records(manifest, lines_per_shard=2)
  out = str(tmp_path / "out")
  target = builders.dataset_dir(out, "captions")
  from etils import epath
  with builders._build_lock(epath.Path(target)):
    with pytest.raises(BlockingIOError, match=rf"another build is writing {target} \(pid "
                       rf"{os.getpid()}\)"):
      builders.build("captions", source, out)

  def stop(index):
    raise KeyboardInterrupt
  monkeypatch.setattr(builders, "_after_shard", stop)
  with pytest.raises(KeyboardInterrupt):
    builders.build("captions", source, out)
  marker = os.path.join(target, builders.STATE_DIR, "shard-00000.json")
  open(marker, "w").write('{"records": 2, "writ')
  ran = []
  monkeypatch.setattr(builders, "_after_shard", ran.append)
  assert builders.build("captions", source, out).written == 4 and ran == [0, 1]
  assert f"{marker} is not JSON" in capsys.readouterr().err

  monkeypatch.setattr(builders, "_after_shard", stop)
  with pytest.raises(KeyboardInterrupt):
    builders.build("captions", source, out, overwrite=True)
  plan = os.path.join(target, builders.STATE_DIR, "plan.json")
  open(plan, "w").write("[1,")
  monkeypatch.setattr(builders, "_after_shard", None)
  assert builders.build("captions", source, out).written == 4
  assert f"{target}: {plan} is not JSON" in capsys.readouterr().err

  class Dead:
    def is_alive(self):
      return False
  monkeypatch.setattr(builders.multiprocessing, "parent_process", lambda: Dead())
  data_file = str(tmp_path / "shard")
  job = builders._ShardJob(0, source().shards[0], "captions", data_file,
                           str(tmp_path / "marker.json"), ())
  monkeypatch.setitem(builders._worker, "stop", type("Never", (), {"is_set": lambda self: 0})())
  with pytest.raises(builders._Orphaned):
    builders._build_shard(job)
  assert not [name for name in os.listdir(tmp_path) if name.startswith(("shard", "marker"))]

  # A build beside this one finishes (and removes build_state/) between this one's first check
  # and its lock: the lock is taken on a new build_state/, and the finished dataset is kept.
  info, aside = os.path.join(target, "dataset_info.json"), str(tmp_path / "info")
  files = sorted(os.listdir(target))
  os.rename(info, aside)
  monkeypatch.setattr(builders, "_refuse_foreign", lambda _: os.rename(aside, info))
  with pytest.raises(FileExistsError, match="has just finished it"):
    builders.build("captions", source, out)
  assert sorted(os.listdir(target)) == sorted(files + [builders.STATE_DIR])


def test_inputs_and_output_through_epath_urls(tmp_path, monkeypatch):
  """A gs:// build (inputs and output; fsspec's in-memory filesystem standing in for gcsfs)
  writes the files a local build does."""
  from etils import epath
  from fsspec.implementations.memory import MemoryFileSystem
  if epath.gpath._is_tf_installed():
    pytest.skip("epath sends gs:// to TensorFlow's gfile when TensorFlow is installed")

  class FakeGcs(MemoryFileSystem):   # gcsfs's path convention: 'bucket/key', no protocol
    protocol, root_marker, store, pseudo_dirs = ("gs", "gcs"), "", {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
      return str(path).removeprefix("gs://").removeprefix("gcs://").rstrip("/")
  fake = FakeGcs()
  monkeypatch.setattr(epath.backend.fsspec_backend, "_get_filesystem", lambda name: fake)
  bucket = epath.Path("gs://bucket/raw")
  bucket.mkdir(parents=True)
  for i in range(3):
    (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    (bucket / f"{i}.jpg").write_bytes(jpeg(i))
  rows = [{"image": f"{i % 3}.jpg", **texts(i)} for i in range(4)] + ["[]"]
  rows[3]["id"] = "0.jpg@1"              # the first record's id, in the next shard: rewritten
  manifest = write_jsonl(str(tmp_path / "m.jsonl"), rows)
  (bucket / "m.jsonl").write_text(open(manifest).read())
  local = str(tmp_path / "local")
  builders.build("captions", lambda: sources.manifest_records(manifest, lines_per_shard=2), local)
  builders.build("captions", lambda: sources.manifest_records("gs://bucket/raw/m.jsonl",
                                                              lines_per_shard=2), "gs://bucket/out")
  remote = epath.Path(builders.dataset_dir("gs://bucket/out", "captions"))
  assert {p.name: p.read_bytes() for p in remote.iterdir()} == dataset_files(local, "captions")
  assert list(skipped_file(local, "captions")) == ["m.jsonl:4", "m.jsonl:5"]
