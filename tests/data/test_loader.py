"""The grain input pipeline: batches, augmentation, per-process sharding, skipping, exact resume."""

import jax
import numpy as np
import pytest

from raw_files import TRUNCATED, image_struct, jpeg, texts, write_parquet
from uip2p_jax.data import builders, sources
from uip2p_jax.data.loader import DataError, Loader, LoaderConfig
from uip2p_jax.tokenizer import default_tokenizer, tokenize


def take(loader, n):
  return [next(loader) for _ in range(n)]


def test_batches_hold_augmented_images_and_token_ids(sample_data):
  loader = Loader(LoaderConfig(sample_data, batch_size=4, resolution=64, num_workers=0))
  batch = next(loader)
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0
  records = {r["id"]: r for r in map(__import__("json").loads,
                                     open(sources.sample_manifest()))}
  for row, rid in enumerate(batch["id"]):
    record = records[rid.decode()]
    for field in ("input_caption", "instruction", "edited_caption", "reverse_instruction"):
      np.testing.assert_array_equal(batch[f"{field}_ids"][row],
                                    tokenize(default_tokenizer(), [record[field]])[0])
  assert loader.skipped_records == 0


def test_stream_is_seeded_and_reshuffled_every_epoch(sample_data):
  config = LoaderConfig(sample_data, batch_size=12, resolution=32, num_workers=0, seed=3)
  first, second = take(Loader(config), 2)
  again = next(Loader(config))
  np.testing.assert_array_equal(first["image"], again["image"])
  assert sorted(first["id"]) == sorted(second["id"])        # each epoch sees every record once
  assert list(first["id"]) != list(second["id"])            # in a new order
  other = next(Loader(LoaderConfig(sample_data, batch_size=12, resolution=32, num_workers=0,
                                   seed=4)))
  assert list(other["id"]) != list(first["id"])


def test_flip_and_crop_are_per_record_random(sample_data):
  config = LoaderConfig(sample_data, batch_size=12, resolution=32, num_workers=0, shuffle=False,
                        num_epochs=2, min_scale=1.0, max_scale=1.0)
  a, b = take(Loader(config), 2)        # the same records in the same order, two epochs
  assert list(a["id"]) == list(b["id"])
  flipped = [np.allclose(x, y[:, ::-1], atol=1e-6) for x, y in zip(a["image"], b["image"])]
  same = [np.allclose(x, y, atol=1e-6) for x, y in zip(a["image"], b["image"])]
  assert any(flipped) and not all(same)


def test_processes_see_disjoint_slices_covering_every_record(sample_data):
  seen = []
  for index in range(4):
    config = LoaderConfig(sample_data, batch_size=1, resolution=32, num_workers=0, num_epochs=1)
    loader = Loader(config, process_index=index, process_count=4)
    ids = [bytes(b["id"][0]) for b in loader]
    assert len(ids) == 3
    seen += ids
  assert len(seen) == len(set(seen)) == 12


def test_resume_continues_the_exact_stream_with_worker_processes(sample_data):
  config = LoaderConfig(sample_data, batch_size=2, resolution=32, num_workers=2, seed=7)
  loader = Loader(config)
  take(loader, 3)
  state = loader.get_state()
  expected = take(loader, 5)   # crosses an epoch boundary (12 records, 2 per batch, 2 workers)
  loader.close()
  resumed = Loader(config)
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 5)):
    assert list(want["id"]) == list(got["id"])
    np.testing.assert_array_equal(want["image"], got["image"])
  resumed.close()


def corrupt_dataset(tmp_path):
  """Records whose image bytes pass the build unchecked but fail to decode at read time."""
  def records():
    for i in range(6):
      image = TRUNCATED if i in (1, 4) else jpeg(i)
      yield f"r{i}", f"test:{i}", {"image": image, **texts(i)}
  out = str(tmp_path / "data")
  builders.build("captions", records, out)
  return out


def test_undecodable_records_are_counted_and_skipped(tmp_path):
  out = corrupt_dataset(tmp_path)
  loader = Loader(LoaderConfig(out, batch_size=2, resolution=32, num_workers=0, shuffle=False))
  ids = [i for batch in take(loader, 4) for i in batch["id"]]   # two epochs of 4 valid records
  assert ids[:4] == ids[4:] == [b"r0", b"r2", b"r3", b"r5"]      # the build keeps input order
  assert loader.skipped_records == 4     # counted as the stream passes over them: 2 per epoch
  strict = Loader(LoaderConfig(out, batch_size=2, resolution=32, num_workers=0, strict=True,
                               shuffle=False))
  with pytest.raises(DataError, match="record r1: undecodable image"):
    take(strict, 3)


def test_ip2p_pairs_share_one_crop_and_flip(tmp_path):
  images = [image_struct(jpeg(i, size=(48, 40))) for i in range(3)]
  path = write_parquet(str(tmp_path / "p.parquet"), {
      "original_prompt": ["a"] * 3, "original_image": images, "edit_prompt": ["b"] * 3,
      "edited_prompt": ["c"] * 3, "edited_image": images})
  out = str(tmp_path / "data")
  builders.build("ip2p", lambda: sources.ip2p_records(path), out, metadata={"has_reverse": False})
  batch = next(Loader(LoaderConfig(out, kind="ip2p", batch_size=3, resolution=32, num_workers=0,
                                   require_reverse=False, max_scale=1.5)))
  np.testing.assert_array_equal(batch["image"], batch["edited_image"])


def test_host_batches_become_sharded_global_arrays(sample_data):
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
  batch = next(Loader(LoaderConfig(sample_data, batch_size=2, resolution=32, num_workers=0)))
  from uip2p_jax import sharding
  arrays = sharding.global_batch(batch, sharding.batch_sharding(mesh))
  assert "id" not in arrays
  assert arrays["image"].shape == (2, 32, 32, 3)
  assert arrays["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_held_out_records_are_fixed_and_never_trained_on(sample_data):
  """The sample records: a fixed choice, centre-cropped (the same batch every time it is read,
  e.g. after a resume), left out of every process's stream; a world's are scenes past it."""
  from uip2p_jax.data.loader import WORLD_SCENES, heldout_batch, heldout_indices
  config = LoaderConfig(sample_data, batch_size=1, resolution=32, num_workers=0, num_epochs=1,
                        holdout=3)
  held = heldout_batch(config)
  again = heldout_batch(LoaderConfig(sample_data, resolution=32, holdout=3, seed=5))
  assert list(held["id"]) == list(again["id"]) and len(set(held["id"])) == 3
  np.testing.assert_array_equal(held["image"], again["image"])
  assert held["image"].shape == (3, 32, 32, 3) and held["instruction_ids"].shape == (3, 77)
  trained = [bytes(b["id"][0]) for index in range(3)
             for b in Loader(config, process_index=index, process_count=3)]
  assert len(trained) == 9 and not set(trained) & set(held["id"])
  np.testing.assert_array_equal(heldout_indices(12, 3), heldout_indices(12, 3))
  with pytest.raises(ValueError, match="lower config.sample.count"):
    heldout_indices(12, 12)
  world = heldout_batch(LoaderConfig("", kind="world", resolution=32, holdout=2))
  assert list(world["id"]) == [f"world-{WORLD_SCENES + i}".encode() for i in range(2)]


def test_resume_refuses_another_held_out_count_or_split(sample_data):
  """The state names the held-out count and the split's size: a checkpoint of another
  config.sample.count (or from before records were held out) or dataset is refused."""
  import json
  config = LoaderConfig(sample_data, batch_size=2, resolution=32, num_workers=0, holdout=2)
  state = json.loads(Loader(config).get_state())
  assert state["holdout"] == 2 and state["records"] == 12
  Loader(config).set_state(json.dumps(state))
  other = Loader(LoaderConfig(sample_data, batch_size=2, resolution=32, num_workers=0,
                              holdout=3))
  with pytest.raises(DataError, match=r"config.sample.count=2 records out .* this run 3"):
    other.set_state(json.dumps(state))
  with pytest.raises(DataError, match="saved before records were held out"):
    Loader(config).set_state(json.dumps({k: state[k] for k in ("grain", "skipped")}))
  with pytest.raises(DataError, match="read a split of 13 records"):
    Loader(config).set_state(json.dumps({**state, "records": 13}))
