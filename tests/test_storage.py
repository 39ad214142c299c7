"""A workdir, export and eval output in a bucket (uip2p_jax.storage, through etils.epath): gs://
paths are served from memory here, and nothing may land in a local ./gs: folder."""

import io
import json
import os
import struct
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from uip2p_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  """gs:// in memory (fsspec's MemoryFileSystem; like GCS it refuses appends). The test runs in
  tmp_path, where a gs:// path mangled into a local one would appear as ./gs:."""
  from etils.epath import backend, gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs",)
    store, pseudo_dirs = {}, [""]

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("a GCS object cannot be appended to")
      return super()._open(path, mode, **kwargs)

  fs = FakeGCS(skip_instance_cache=True)
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: fs)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's gfile otherwise
  monkeypatch.setattr(storage, "url_problem", lambda path: None)  # no gcsfs needed
  monkeypatch.chdir(tmp_path)
  yield fs
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written as a local folder"


def test_helpers_read_and_write_a_bucket(bucket, tmp_path):
  run = "gs://b/run"
  assert storage.absolute(run) == run and storage.absolute("x") == os.path.abspath("x")
  storage.makedirs(run)
  storage.write_text_atomic(f"{run}/a.json", "{}")
  storage.append_text(f"{run}/log.jsonl", "1\n")
  storage.append_text(f"{run}/log.jsonl", "2\n")
  assert storage.read_text(f"{run}/log.jsonl") == "1\n2\n"
  storage.rename(f"{run}/a.json", f"{run}/b.json")
  assert sorted(storage.listdir(run)) == ["b.json", "log.jsonl"]
  assert storage.isfile(f"{run}/b.json") and not storage.isfile(run) and storage.isdir(run)
  storage.copy_file(f"{run}/b.json", tmp_path / "b.json")   # across filesystems, both ways
  storage.copy_file(tmp_path / "b.json", f"{run}/c.json")
  assert storage.read_text(f"{run}/c.json") == "{}"
  with storage.local_folder(f"{run}/export") as folder:
    assert not storage.is_remote(folder)
    os.makedirs(os.path.join(folder, "unet"))
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
      f.write("{}")
  assert storage.read_text(f"{run}/export/unet/config.json") == "{}"
  assert not os.path.exists(folder)  # the staging folder is gone
  with storage.local_folder(str(tmp_path / "local")) as folder:
    assert folder == str(tmp_path / "local")  # a local path is written in place


def test_urls_are_refused_by_name_without_their_library():
  assert storage.url_problem("runs/x") is None
  assert "ftp:// is not a storage" in storage.url_problem("ftp://host/run")
  with mock.patch("fsspec.get_filesystem_class", side_effect=ImportError("no gcsfs")), \
       mock.patch("importlib.util.find_spec", return_value=None):
    assert "pip install gcsfs" in storage.url_problem("gs://b/run")


def event_records(data: bytes) -> list:
  """The Events of a TensorBoard event file's bytes (TFRecord framing: length, its CRC, data,
  its CRC)."""
  from tensorboardX.proto import event_pb2
  events, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_a_run_in_a_bucket_keeps_its_urls(bucket):
  import jax
  from uip2p_jax import model_card
  from uip2p_jax.image_io import save_image_atomic
  from uip2p_jax.train import config as run_config
  from uip2p_jax.train.checkpoint import Checkpoints
  from uip2p_jax.train.loop import _record_provenance
  from uip2p_jax.train.metric_writer import MetricWriter

  run = "gs://b/run"
  command = run_config.parse_command_line(["--config", SMOKE, "--workdir", run,
                                           "--config.data.dir=gs://b/data"])
  assert command.workdir == run and command.config.data.dir == "gs://b/data"
  assert run_config.run_data_dir(command.config, run) == "gs://b/data"
  with pytest.raises(run_config.ConfigError, match="sample photos into the workdir"):
    run_config.parse_command_line(["--config", SMOKE, "--workdir", run])

  metrics = dict(loss=0.5, learning_rate=1e-4, grad_norm=1.0, images_per_second=2.0,
                 step_time=0.5, skipped_updates=0.0)
  # In a bucket, lines wait for a flush (each checkpoint's, or flush_secs), not a whole rewrite
  # per line; each TensorBoard flush rewrites the current part (one object while it is small)...
  def write_run(run):
    writer = MetricWriter(run, 0, flush_secs=3600)
    writer.scalars(1, metrics)
    assert not storage.exists(f"{run}/metrics.jsonl")
    writer.flush()
    assert storage.read_text(f"{run}/metrics.jsonl").count("\n") == 1
    writer.scalars(2, metrics)
    writer.image("samples", np.zeros((4, 4, 3), np.uint8), 2)
    writer.close()
    assert [json.loads(line)["step"] for line in
            storage.read_text(f"{run}/metrics.jsonl").splitlines()] == [1, 2]
    events = sorted(storage.listdir(f"{run}/tensorboard"))
    assert events == [events[0]] + [
        f"{events[0]}.{part:05d}" for part in range(1, len(events))], events
    assert all("tfevents" in name for name in events)  # what TensorBoard reads, in name order
    read = [event_records(bucket.cat(f"{run}/tensorboard/{name}")) for name in events]
    assert read[0][0].file_version.startswith("brain.Event")  # the parts read as one file
    scalars = [(e.step, v.tag) for part in read for e in part for v in e.summary.value]
    assert [step for step, tag in scalars if tag == "train/loss"] == [1, 2]
    assert scalars[-1][1] == "samples" and all(read), scalars  # no empty part
    return events

  assert len(write_run(run)) == 1
  # ... and once a part is full, the next flush starts a new one (never re-uploading the old).
  from uip2p_jax.train import metric_writer
  part_bytes, metric_writer._BucketEventFile.PART_BYTES = (
      metric_writer._BucketEventFile.PART_BYTES, 1)
  try:
    assert len(write_run("gs://b/run_parts")) >= 2
  finally:
    metric_writer._BucketEventFile.PART_BYTES = part_bytes
  MetricWriter(run, 1).close()  # a resume from step 1 drops step 2
  assert storage.read_text(f"{run}/metrics.jsonl").count("\n") == 1

  _record_provenance(run, 0)
  _record_provenance(run, 2)
  assert [json.loads(line)["step"] for line in
          storage.read_text(f"{run}/provenance.jsonl").splitlines()] == [0, 2]
  save_image_atomic(Image.new("RGB", (4, 4)), f"{run}/samples/step_0000002.png")
  assert Image.open(io.BytesIO(bucket.cat(f"{run}/samples/step_0000002.png"))).size == (4, 4)

  # Checkpoints: orbax is given the URL; a garbled metrics file is set aside in the bucket.
  storage.write_text_atomic(f"{run}/checkpoints/5/metrics/metrics", "{not json")
  abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
  with mock.patch.object(Checkpoints, "_open", lambda self: None):
    checkpoints = Checkpoints(f"{run}/checkpoints", command.config, abstract)
  assert checkpoints.directory == f"{run}/checkpoints"
  assert storage.listdir(f"{run}/checkpoints") == ["5.unreadable-0"]

  # The model card: written into the export, naming it by its URL, with an eval beside it.
  export = f"{run}/export"
  storage.write_text_atomic(f"{run}/eval_magicbrush/summary.json", "{}")
  storage.write_text_atomic(f"{run}/eval_magicbrush/summary.md", "# MagicBrush\n| table |\n")
  model_card.write_training_record(export, command.config, 2, run)
  card = storage.read_text(model_card.write_card(export))
  assert f"--model {export} " in card and "| table |" in card
  with pytest.raises(model_card.PushError, match="in a bucket"):
    model_card.push_to_hub(export, "owner/name")


def test_magicbrush_outputs_in_a_bucket(bucket):
  from uip2p_jax.eval import magicbrush
  out = "gs://b/eval"
  encoded = io.BytesIO()
  Image.new("RGB", (8, 8), "red").save(encoded, format="PNG")
  turns = [{"id": f"s-{n}", "img_id": "s", "turn": n, "instruction": "x",
            "image": encoded.getvalue()} for n in (1, 2)]
  seen = []

  def edit(images, instructions, seeds):
    seen.extend(image.getpixel((0, 0)) for image in images)
    return [Image.new("RGB", (8, 8), "blue") for _ in images]
  settings = {"model": "m"}
  magicbrush.check_edit_settings(out, settings)
  magicbrush.record_edit_settings(out, settings)
  report = magicbrush.run_edits(turns, edit, out, "multi", 2, 0, progress=False)
  assert report.made == 2 and seen == [(255, 0, 0), (0, 0, 255)]  # turn 2 read turn 1's edit
  assert magicbrush.run_edits(turns, edit, out, "multi", 2, 0, progress=False).on_disk == 2
  with pytest.raises(ValueError, match="made with model 'm'"):
    magicbrush.check_edit_settings(out, {"model": "other"})
  rows = [{"id": "s-1", "img_id": "s", "turn": 1, "instruction": "x, \"y\"",
           **{m: 0.5 for m in magicbrush.METRICS}}]
  magicbrush.write_csv(rows, f"{out}/multi_turn.csv")
  assert magicbrush.read_csv(f"{out}/multi_turn.csv") == rows
  magicbrush.write_summary(magicbrush.summarise({"single": rows}), out, "m")
  assert "| single |" in magicbrush.compare(out, out)
