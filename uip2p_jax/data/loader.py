"""The training input pipeline: array_record -> grain -> per-host batches (numpy; the trainer
makes global arrays with `sharding.global_batch`).

Per JAX process: its slice of the records (``process_index::process_count``), a seeded global
shuffle reshuffled every epoch, decode + IP2P augmentation (random resized crop, horizontal flip)
+ tokenization in worker processes, fixed-size batches. Everything random is derived from the
seed and the record's position, so the iterator state (``get_state``) restores the exact stream.

With ``holdout`` > 0, that many records of the split (a fixed choice: `heldout_indices`) are
left out of every process's stream; `heldout_batch` reads them, with a fixed centre crop, for
the trainer's sample grids: the same examples at every step and after every resume.

A record whose image fails to decode is skipped and counted (``Loader.skipped_records``, and
``skipped_records`` per batch: the batch whose assembly passed over it; a finite stream's final
partial batch is dropped with its count); ``strict=True`` raises instead.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading

import grain
from absl import flags
import jax
import numpy as np
import PIL.Image

from uip2p_jax.data import builders, sources
from uip2p_jax.tokenizer import MAX_LENGTH, load_tokenizer, tokenize

_INVALID = "__invalid__"
# Token-id fields of a training batch, from the record's text fields.
TEXT_IDS = {name: f"{name}_ids" for name in sources.TEXT_FIELDS["captions"]}


class DataError(ValueError):
  """A record that cannot be read (strict mode), or a saved stream state that is not this
  config's stream."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  data_dir: str
  # "captions" (cycle-edit records), "ip2p" (pairs), or "world": ShapesWorld scenes rendered on
  # the fly (image, caption ids, attribute labels; no data_dir), for the world's own models.
  kind: str = "captions"
  split: str | None = None          # default: the kind's split ("train")
  resolution: int = 256
  batch_size: int = 8               # per JAX process
  seed: int = 0
  num_epochs: int | None = None     # None: repeat forever (reshuffled every epoch)
  shuffle: bool = True
  # Random resized crop as in InstructPix2Pix: shorter side resized to resolution * U(min, max),
  # then a random square crop (256 -> 256..288 by default).
  min_scale: float = 1.0
  max_scale: float = 1.125
  flip: bool = True
  num_workers: int = 2              # decoding processes per host (0: in the main process)
  worker_buffer: int = 2            # batches buffered per worker
  strict: bool = False
  tokenizer: str | None = None      # a tokenizer folder / Hub repo; None: offline CLIP default
  require_reverse: bool = True      # CEC needs reverse instructions; the supervised baseline not
  holdout: int = 0                  # records left out of the stream (`heldout_batch` reads them)

  def __post_init__(self):
    if self.kind not in ("captions", "ip2p", "world"):
      raise ValueError(f"training data kind must be 'captions', 'ip2p' or 'world', got "
                       f"{self.kind!r}")
    if self.resolution % 8 or self.resolution <= 0:
      raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
    if not 1.0 <= self.min_scale <= self.max_scale:
      raise ValueError(f"need 1 <= min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.holdout < 0:
      raise ValueError(f"holdout must be >= 0, got {self.holdout}")


_TOKENIZERS: dict = {}
_TOKENIZER_LOCK = threading.Lock()


def _tokenizer(name: str | None):
  # One per worker process, built on first use (not pickled across processes). grain reads with
  # several threads, and transformers' lazy imports are not thread-safe: build under a lock.
  with _TOKENIZER_LOCK:
    if name not in _TOKENIZERS:
      _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def decode_image(data: bytes, min_side: int) -> PIL.Image.Image:
  """RGB image; JPEGs are decoded at the smallest DCT scale that keeps ``min_side`` (fast)."""
  image = PIL.Image.open(io.BytesIO(data))
  if image.format == "JPEG":
    w, h = image.size
    scale = min_side / min(w, h)
    image.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
  return image.convert("RGB")


def random_resized_crop(images: list[PIL.Image.Image], resolution: int, rng: np.random.Generator,
                        min_scale: float, max_scale: float, flip: bool,
                        center: bool = False) -> list[np.ndarray]:
  """The same random resize/crop/flip applied to every image (input/edited pairs stay aligned).
  `center`: no randomness: shorter side to resolution * min_scale, the centre crop, no flip."""
  if center:
    short, fx, fy, do_flip = resolution * min_scale, 0.5, 0.5, False
  else:
    short = resolution * rng.uniform(min_scale, max_scale)
    fx, fy, do_flip = rng.random(), rng.random(), flip and rng.random() < 0.5
  out = []
  for image in images:
    w, h = image.size
    scale = short / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = int(fx * (nw - resolution)), int(fy * (nh - resolution))
    # Resize only the region that survives the crop: cheaper, and the same pixels.
    box = (left / scale, top / scale, (left + resolution) / scale, (top + resolution) / scale)
    crop = image.resize((resolution, resolution), PIL.Image.BICUBIC, box=box, reducing_gap=3.0)
    array = np.asarray(crop, dtype=np.uint8)
    out.append(array[:, ::-1] if do_flip else array)
  return out


class _DecodeAugmentTokenize:
  """Record -> training example (uint8 images, int32 token ids), or an invalid marker."""

  def __init__(self, config: LoaderConfig, center: bool = False):
    self.config = config
    self.image_fields = image_fields(config.kind)
    self.center = center  # the held-out examples: a fixed centre crop

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    c = self.config
    rid = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    try:
      images = [decode_image(record[name], c.resolution) for name in self.image_fields]
    except Exception as e:  # PIL raises many types for bad bytes
      reason = f"record {rid}: undecodable image ({type(e).__name__}: {e})"
      if c.strict:
        raise DataError(reason) from None
      logging.warning("skipping %s", reason)
      return {_INVALID: reason}
    arrays = random_resized_crop(images, c.resolution, rng, c.min_scale, c.max_scale, c.flip,
                                 self.center)
    example = {"id": np.bytes_(rid.encode()),
               **{name: array for name, array in zip(self.image_fields, arrays)}}
    texts = [record[f].decode() if isinstance(record[f], bytes) else record[f] for f in TEXT_IDS]
    ids = tokenize(_tokenizer(c.tokenizer), texts, MAX_LENGTH)
    example.update({key: row for key, row in zip(TEXT_IDS.values(), ids)})
    return example


class _RenderWorldScene:
  """World scene index -> training example: the rendered scene, its caption's ids, its labels."""

  def __init__(self, config: LoaderConfig):
    self.config = config

  def __call__(self, index: int) -> dict:
    from uip2p_jax.data import shapes
    scene = shapes.world_scene(self.config.seed, int(index))
    ids = tokenize(_tokenizer(self.config.tokenizer), [shapes.caption(scene)], MAX_LENGTH)[0]
    return {"id": np.bytes_(f"world-{index}".encode()),
            "image": shapes.render(scene, self.config.resolution),
            "input_caption_ids": ids, "labels": shapes.scene_labels(scene)}


# Scene indices of the rendered world: more than any run draws (an epoch is never finished).
WORLD_SCENES = 2 ** 31 - 1


def image_fields(kind: str) -> tuple[str, ...]:
  return ("image",) if kind == "world" else builders.IMAGE_FIELDS[kind]


class _ValidBatchIterator(grain.DatasetIterator):
  """Fixed-size batches of valid examples; counts the invalid ones it passed over."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __next__(self) -> dict:
    examples, skipped = [], 0
    while len(examples) < self._batch_size:
      example = next(self._parent)  # StopIteration ends the stream; a partial batch is dropped
      if _INVALID in example:
        skipped += 1
      else:
        examples.append(example)
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    batch["skipped_records"] = np.int32(skipped)
    return batch

  # Batches end exactly where the parent's state is taken, so its state is the batcher's.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _ValidBatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self) -> _ValidBatchIterator:
    return _ValidBatchIterator(self._parent.__iter__(), self._batch_size)


# The fixed choice of held-out records: its own generator, not the run's seed.
HOLDOUT_SEED = 20_241_219


def heldout_indices(num_records: int, count: int) -> np.ndarray:
  """The sorted indices of the `count` records of a split of `num_records` that are held out
  of training (a fixed choice spread over the split: the same for a given split size)."""
  if count >= num_records:
    raise ValueError(f"{num_records} records: holding {count} out for samples leaves none to "
                     "train on (lower config.sample.count)")
  return np.sort(np.random.default_rng(HOLDOUT_SEED).choice(num_records, count, replace=False))


class _Without:
  """A random-access source without some of its indices."""

  def __init__(self, source, removed: np.ndarray):
    self._source = source
    self._kept = np.setdiff1d(np.arange(len(source)), removed)

  def __len__(self) -> int:
    return len(self._kept)

  def __getitem__(self, index):
    return self._source[int(self._kept[index])]


def _open_source(config: LoaderConfig):
  """(the split's random-access source, its DatasetInfo), checked for the run's objective."""
  source, info = builders.open_split(config.data_dir, config.kind, config.split)
  if config.kind == "ip2p" and config.require_reverse and not info.metadata.get("has_reverse"):
    raise ValueError(f"{config.data_dir}: these IP2P pairs were built without reverse "
                     "instructions (CEC needs them); rebuild with --reverse-instructions (`data "
                     "build pairs`: a reverse_instruction on every pair), or set "
                     "require_reverse=False for the supervised baseline")
  if config.kind == "ip2p" and config.require_reverse and not info.metadata.get("has_captions",
                                                                               True):
    raise ValueError(f"{config.data_dir}: some of these pairs have no input or edited caption "
                     "(CEC's CLIP losses need both): give input_caption and edited_caption on "
                     "every pair, or train the supervised objective (ip2p)")
  return source, info


def make_dataset(config: LoaderConfig, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """The grain pipeline of one JAX process (defaults: this process of ``jax.process_count()``)."""
  return _make_dataset(config, process_index, process_count)[0]


def _make_dataset(config: LoaderConfig, process_index: int | None,
                  process_count: int | None) -> tuple[grain.IterDataset, int | None]:
  """(make_dataset's pipeline, the number of records in the split; None for a world)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if config.kind == "world":  # each index is its own random scene: no shuffle needed
    # (Held-out scenes are drawn past this range: `heldout_batch`.)
    ds = grain.MapDataset.range(WORLD_SCENES)[process_index::process_count]
    ds = _ValidBatchDataset(ds.map(_RenderWorldScene(config)).to_iter_dataset(),
                            config.batch_size)
    return _prefetch(ds, config), None
  source, _ = _open_source(config)
  records = len(source)
  if config.holdout:
    source = _Without(source, heldout_indices(len(source), config.holdout))
  if len(source) < process_count:
    raise ValueError(f"{len(source)} records cannot be split over {process_count} processes")
  ds = grain.MapDataset.source(source)[process_index::process_count].seed(config.seed)
  if config.shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(config.num_epochs).random_map(_DecodeAugmentTokenize(config))
  ds = _ValidBatchDataset(ds.to_iter_dataset(), config.batch_size)
  return _prefetch(ds, config), records


def heldout_batch(config: LoaderConfig) -> dict[str, np.ndarray]:
  """The `config.holdout` held-out examples as one host batch (as `Loader` gives them, with
  their record ids), centre-cropped: the same on every process and after every resume.
  A rendered world's are scenes past the training range. A held-out record that does not
  decode is left out (strict: an error)."""
  if config.holdout < 1:
    raise ValueError("heldout_batch needs a config with holdout >= 1")
  if config.kind == "world":
    render = _RenderWorldScene(config)
    examples = [render(WORLD_SCENES + i) for i in range(config.holdout)]
  else:
    source, _ = _open_source(config)
    decode = _DecodeAugmentTokenize(config, center=True)
    examples = [decode(source[int(i)], np.random.default_rng(0))
                for i in heldout_indices(len(source), config.holdout)]
    examples = [e for e in examples if _INVALID not in e]
    if not examples:
      raise DataError(f"{config.data_dir}: none of the {config.holdout} held-out records "
                      "decodes (see the warnings above)")
  return _images_to_signed({key: np.stack([e[key] for e in examples]) for key in examples[0]},
                           config.kind)


def _images_to_signed(batch: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
  """The batch's uint8 images [0, 255] -> float32 [-1, 1], in place (what the trainer takes)."""
  for name in image_fields(kind):
    batch[name] = batch[name].astype(np.float32) * (2 / 255) - 1
  return batch


def _prefetch(ds: grain.IterDataset, config: LoaderConfig) -> grain.IterDataset:
  if config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()   # (tests, notebooks) take their defaults
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer))
  return ds


class Loader:
  """Host batches: images float32 in [-1, 1] (B, R, R, 3), token ids int32 (B, 77), record ids
  (B,) bytes (host only: ``sharding.global_batch`` leaves them out).

  ``get_state()`` is a JSON string (saved with the training checkpoint); ``set_state`` on a
  loader built from the same config (same ``num_workers``) continues the exact stream. The state
  records the held-out count and the split's size, the two things that change which record
  each position of the stream is: ``set_state`` refuses a state whose stream was another
  (a DataError saying what differs).
  """

  def __init__(self, config: LoaderConfig, process_index: int | None = None,
               process_count: int | None = None):
    self.config = config
    dataset, self.records = _make_dataset(config, process_index, process_count)
    self._iterator = iter(dataset)
    self.skipped_records = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._iterator))
    self.skipped_records += int(batch.pop("skipped_records"))
    return _images_to_signed(batch, self.config.kind)

  def get_state(self) -> str:
    return json.dumps({"grain": self._iterator.get_state(), "skipped": self.skipped_records,
                       "holdout": self.config.holdout, "records": self.records})

  def set_state(self, state: str) -> None:
    state = json.loads(state)
    self._check_same_stream(state)
    self._iterator.set_state(state["grain"])
    self.skipped_records = state["skipped"]

  def _check_same_stream(self, state: dict) -> None:
    """A DataError unless `state` was taken from this config's stream: the same held-out count
    (config.sample.count) and split size. A world's stream does not depend on its held-out
    scenes (they are drawn past its range)."""
    holdout = self.config.holdout
    if self.config.kind != "world" and "holdout" not in state and holdout:
      raise DataError(
          "the checkpoint's data stream was saved before records were held out for samples "
          f"(it trained on every record); this run holds config.sample.count={holdout} out, "
          "so the stream would not continue where it stopped. Resume with "
          "--config.sample.count=0 --config.sample.every=0 --config.final_edit=False (no "
          "sample grids), or start a new --workdir")
    saved = state.get("holdout", 0)
    if self.config.kind != "world" and saved != holdout:
      raise DataError(
          f"the checkpoint's data stream holds config.sample.count={saved} records out for "
          f"samples, this run {holdout}: the stream would not continue where it stopped. Set "
          f"--config.sample.count={saved} to resume, or start a new --workdir")
    records = state.get("records")
    if records is not None and self.records is not None and records != self.records:
      raise DataError(
          f"the checkpoint's data stream read a split of {records} records, "
          f"{self.config.data_dir} now has {self.records}: the dataset changed since it was "
          "saved. Resume with the dataset it trained on, or start a new --workdir")

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close:
      close()


__all__ = ["DataError", "Loader", "LoaderConfig", "TEXT_IDS", "decode_image", "heldout_batch",
           "heldout_indices", "make_dataset", "random_resized_crop"]
