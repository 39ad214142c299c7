"""TFDS builders (array_record files) for the three record kinds, and their raw-source readers.

* ``captions``: cycle-edit records (image, input caption, instruction, edited caption, reverse
  instruction), from a folder + JSONL manifest or from img2dataset webdataset shards joined by key
  with a JSONL of generated instructions.
* ``ip2p``: InstructPix2Pix pairs from the parquet files of ``timbrooks/instructpix2pix-clip-
  filtered``, optionally joined with reverse instructions.
* ``magicbrush``: MagicBrush turns from its Hugging Face parquet files (turn structure kept).

A source yields ``(id, fields)`` or raises :class:`BadRecord` for one record; the builder writes
the good ones and a :class:`SkipReport` lists the others (``skipped.jsonl`` next to the data).
Images are validated (fully decoded) at build time and stored as their original JPEG/PNG bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

VERSION = "1.0.0"
KINDS = ("captions", "ip2p", "magicbrush")
TEXT_FIELDS = {
    "captions": ("input_caption", "instruction", "edited_caption", "reverse_instruction"),
    "ip2p": ("input_caption", "instruction", "edited_caption", "reverse_instruction"),
    "magicbrush": ("instruction", "input_caption", "edited_caption"),
}
IMAGE_FIELDS = {"captions": ("image",), "ip2p": ("image", "edited_image"),
                "magicbrush": ("image", "target_image")}
# Text fields a record may leave empty (filled only when an optional side file is given).
OPTIONAL_TEXT = {"captions": (), "ip2p": ("reverse_instruction",),
                 "magicbrush": ("input_caption", "edited_caption")}
DEFAULT_SPLIT = {"captions": "train", "ip2p": "train", "magicbrush": "test"}
DATASET_NAME = {"captions": "uip2p_captions", "ip2p": "uip2p_ip2p_pairs",
                "magicbrush": "uip2p_magicbrush"}
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadRecord(Exception):
  """One source record that cannot be written (the reason is the message)."""


@dataclasses.dataclass
class SkipReport:
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  written: int = 0

  def add(self, record_id: str, reason: str) -> None:
    self.skipped.append((record_id, reason))

  def summary(self, limit: int = 20) -> str:
    lines = [f"{self.written} records written, {len(self.skipped)} skipped"]
    lines += [f"  skipped {rid}: {why}" for rid, why in self.skipped[:limit]]
    if len(self.skipped) > limit:
      lines.append(f"  ... and {len(self.skipped) - limit} more (see skipped.jsonl)")
    return "\n".join(lines)


def validated_image(data: bytes, max_side: int = 0) -> bytes:
  """Fully decodes ``data``; returns JPEG/PNG bytes of an RGB-convertible image (or BadRecord)."""
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise BadRecord("image is missing or empty")
  try:
    image = PIL.Image.open(io.BytesIO(data))
    fmt = image.format
    image.load()  # a truncated file fails here, not at training time
    rgb = image.convert("RGB")
  except Exception as e:  # PIL raises many types for bad data
    raise BadRecord(f"undecodable image ({type(e).__name__}: {e})") from None
  if min(rgb.size) < 8:
    raise BadRecord(f"image too small ({rgb.size[0]}x{rgb.size[1]})")
  if max_side and max(rgb.size) > max_side:
    scale = max_side / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                     PIL.Image.BICUBIC)
    fmt = None
  if fmt == "JPEG" and image.mode in ("RGB", "L") or fmt == "PNG" and image.mode == "RGB":
    return bytes(data)
  out = io.BytesIO()
  rgb.save(out, format="JPEG" if fmt in ("JPEG", None, "WEBP") else "PNG", quality=95)
  return out.getvalue()


def _text(fields: dict, name: str, optional: bool = False) -> str:
  value = fields.get(name, "")
  if value is None:
    value = ""
  if not isinstance(value, str):
    raise BadRecord(f"{name} must be a string, got {type(value).__name__}")
  value = value.strip()
  if not value and not optional:
    raise BadRecord(f"{name} is missing or empty")
  return value


def _read_jsonl(path: str) -> Iterator[tuple[int, dict | None, str]]:
  """(line number, object or None, error) per non-blank line."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        yield number, None, f"invalid JSON ({e.msg})"
        continue
      if not isinstance(obj, dict):
        yield number, None, f"expected a JSON object, got {type(obj).__name__}"
        continue
      yield number, obj, ""


def expand_pattern(pattern: str) -> list[str]:
  """Shell-style braces (``{00000..00099}``, ``{a,b}``) and globs -> sorted existing files."""
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match:
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
      lo, hi = span.groups()
      options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
      options = body.split(",")
    return sorted({f for o in options
                   for f in expand_pattern(pattern[:match.start()] + o + pattern[match.end():])})
  return sorted(glob.glob(os.path.expanduser(pattern)))


def _files(pattern: str, what: str) -> list[str]:
  files = expand_pattern(pattern)
  if not files:
    raise FileNotFoundError(f"no {what} files match {pattern!r}")
  return files


# ---------------------------------------------------------------------------------------------
# Sources: each yields (id, fields) or (id, BadRecord).

Record = tuple[str, "dict | BadRecord"]


def manifest_records(manifest: str, max_side: int = 0) -> Iterator[Record]:
  """A folder of images + JSONL manifest; image paths relative to the manifest's folder."""
  root = os.path.dirname(os.path.abspath(manifest))
  for number, obj, error in _read_jsonl(manifest):
    if obj is None:
      yield f"line {number}", BadRecord(error)
      continue
    rel = obj.get("image")
    rid = str(obj.get("id") or rel or f"line {number}")
    try:
      if not isinstance(rel, str) or not rel:
        raise BadRecord("image path is missing")
      path = os.path.join(root, rel)
      if not os.path.isfile(path):
        raise BadRecord(f"image file not found: {path}")
      with open(path, "rb") as f:
        image = validated_image(f.read(), max_side)
      yield rid, {"image": image, **{k: _text(obj, k) for k in TEXT_FIELDS["captions"]}}
    except BadRecord as e:
      yield rid, e


def _key_of(member: str) -> tuple[str, str]:
  """webdataset convention: 'dir/000123.jpg' -> ('dir/000123', 'jpg') (key ends at first dot)."""
  directory, base = os.path.split(member)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem) if directory else stem, ext.lower()


def _tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Groups consecutive members of a webdataset shard by key."""
  key, sample = None, {}
  with tarfile.open(path) as tar:
    for member in tar:
      if not member.isfile():
        continue
      member_key, ext = _key_of(member.name)
      if member_key != key:
        if key is not None:
          yield key, sample
        key, sample = member_key, {}
      sample[ext] = tar.extractfile(member).read()
  if key is not None:
    yield key, sample


def webdataset_records(shards: str, instructions: str, max_side: int = 0) -> Iterator[Record]:
  """img2dataset output (jpg + txt/json per key) joined by key with generated instructions.

  ``instructions`` JSONL: ``{"key": ..., "instruction": ..., "edited_caption": ...,
  "reverse_instruction": ...}`` and optionally ``input_caption`` (else the shard's txt caption).
  """
  table: dict[str, dict] = {}
  for number, obj, error in _read_jsonl(instructions):
    if obj is None or not isinstance(obj.get("key"), (str, int)):
      yield f"{os.path.basename(instructions)}:{number}", BadRecord(error or "no 'key' field")
      continue
    table[str(obj["key"])] = obj
  seen = set()
  for shard in _files(shards, "webdataset shard"):
    try:
      samples = list(_tar_samples(shard))
    except (tarfile.TarError, OSError, EOFError) as e:
      yield os.path.basename(shard), BadRecord(f"unreadable shard ({e})")
      continue
    for key, sample in samples:
      short_key = os.path.basename(key)
      seen.add(short_key)
      try:
        extra = table.get(short_key)
        if extra is None:
          raise BadRecord("no instruction record for this key")
        image_ext = next((e for e in _IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
          raise BadRecord(f"no image in the sample (members: {sorted(sample)})")
        caption = extra.get("input_caption")
        if not caption and "txt" in sample:
          caption = sample["txt"].decode("utf-8", errors="replace")
        if not caption and "json" in sample:
          try:
            caption = json.loads(sample["json"]).get("caption")
          except (json.JSONDecodeError, AttributeError):
            caption = None
        fields = {**extra, "input_caption": caption}
        yield short_key, {"image": validated_image(sample[image_ext], max_side),
                          **{k: _text(fields, k) for k in TEXT_FIELDS["captions"]}}
      except BadRecord as e:
        yield short_key, e
  for key in sorted(set(table) - seen):
    yield key, BadRecord("instruction record has no image in the shards")


def _parquet_rows(pattern: str, columns: list[str]) -> Iterator[tuple[str, int, dict]]:
  import pyarrow.parquet as pq
  for path in _files(pattern, "parquet"):
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
      file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in file.schema_arrow.names]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; has {file.schema_arrow.names}")
    row = 0
    for batch in file.iter_batches(batch_size=64, columns=columns):
      for values in batch.to_pylist():
        yield stem, row, values
        row += 1


def _image_bytes(value) -> bytes | None:
  """HF `datasets` stores images as {"bytes": ..., "path": ...} structs."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return value


def ip2p_records(parquet: str, reverse_instructions: str | None = None,
                 max_side: int = 0) -> Iterator[Record]:
  """timbrooks/instructpix2pix-clip-filtered rows; ids are '<file stem>-<row>'.

  ``reverse_instructions`` JSONL: ``{"id": ..., "reverse_instruction": ...}`` or, keyed by text,
  ``{"input_caption": ..., "instruction": ..., "reverse_instruction": ...}``. When given, rows
  without a reverse instruction are skipped (CEC training needs one).
  """
  by_id: dict[str, str] = {}
  by_text: dict[tuple[str, str], str] = {}
  if reverse_instructions:
    for number, obj, error in _read_jsonl(reverse_instructions):
      reverse = obj and obj.get("reverse_instruction")
      if not reverse:
        yield (f"{os.path.basename(reverse_instructions)}:{number}",
               BadRecord(error or "no 'reverse_instruction'"))
      elif obj.get("id"):
        by_id[str(obj["id"])] = reverse
      else:
        by_text[(str(obj.get("input_caption", "")).strip(),
                 str(obj.get("instruction", "")).strip())] = reverse
  columns = ["original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image"]
  for stem, row, values in _parquet_rows(parquet, columns):
    rid = f"{stem}-{row:06d}"
    try:
      fields = {"input_caption": _text(values, "original_prompt"),
                "instruction": _text(values, "edit_prompt"),
                "edited_caption": _text(values, "edited_prompt")}
      reverse = by_id.get(rid) or by_text.get((fields["input_caption"], fields["instruction"]))
      if reverse_instructions and not reverse:
        raise BadRecord("no reverse instruction for this record")
      fields["reverse_instruction"] = (reverse or "").strip()
      yield rid, {"image": validated_image(_image_bytes(values["original_image"]), max_side),
                  "edited_image": validated_image(_image_bytes(values["edited_image"]), max_side),
                  **fields}
    except BadRecord as e:
      yield rid, e


def _magicbrush_descriptions(path: str | None) -> dict[tuple[str, int], tuple[str, str]]:
  """MagicBrush's global_descriptions.json -> {(img_id, turn): (input caption, output caption)}.

  The file maps ``img_id -> {"<id>-input.png": text, "<id>-output1.png": text, ...}``; turn t's
  input is output t-1 (the source image for turn 1).
  """
  if not path:
    return {}
  with open(path, encoding="utf-8") as f:
    table = json.load(f)
  out = {}
  for img_id, texts in table.items():
    by_turn = {}
    for name, text in texts.items():
      match = re.search(r"-(input|output(\d+))\.", name)
      if match:
        by_turn[0 if match.group(1) == "input" else int(match.group(2))] = text
    for turn in by_turn:
      if turn >= 1 and turn - 1 in by_turn:
        out[(str(img_id), turn)] = (by_turn[turn - 1], by_turn[turn])
  return out


def magicbrush_records(parquet: str, descriptions: str | None = None,
                       max_side: int = 0) -> Iterator[Record]:
  """MagicBrush parquet rows (img_id, turn_index, source_img, target_img, instruction)."""
  captions = _magicbrush_descriptions(descriptions)
  columns = ["img_id", "turn_index", "source_img", "target_img", "instruction"]
  for _, _, values in _parquet_rows(parquet, columns):
    img_id, turn = str(values["img_id"]), values["turn_index"]
    rid = f"{img_id}-{turn}"
    try:
      if not isinstance(turn, (int, np.integer)) or turn < 1:
        raise BadRecord(f"turn_index must be a positive integer, got {turn!r}")
      input_caption, edited_caption = captions.get((img_id, int(turn)), ("", ""))
      if descriptions and not edited_caption:
        raise BadRecord("no global description for this turn")
      yield rid, {"image": validated_image(_image_bytes(values["source_img"]), max_side),
                  "target_image": validated_image(_image_bytes(values["target_img"]), max_side),
                  "instruction": _text(values, "instruction"), "img_id": img_id,
                  "turn_index": int(turn), "input_caption": input_caption,
                  "edited_caption": edited_caption}
    except BadRecord as e:
      yield rid, e


# ---------------------------------------------------------------------------------------------
# The TFDS builder.

def features(kind: str) -> tfds.features.FeaturesDict:
  spec = {"id": tfds.features.Text()}
  spec.update({name: tfds.features.Image(shape=(None, None, 3)) for name in IMAGE_FIELDS[kind]})
  spec.update({name: tfds.features.Text() for name in TEXT_FIELDS[kind]})
  if kind == "magicbrush":
    spec.update(img_id=tfds.features.Text(), turn_index=np.int32)
  return tfds.features.FeaturesDict(spec)


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one split from a record source; the source and kind come at construction."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, kind: str, records: Callable[[], Iterator[Record]], split: str,
               report: SkipReport, metadata: dict, data_dir: str):
    self.name = DATASET_NAME[kind]
    self._kind, self._records, self._split = kind, records, split
    self._report, self._metadata = report, metadata
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(self._kind),
                                 metadata=tfds.core.MetadataDict(self._metadata),
                                 description=f"uip2p_jax {self._kind} records")

  def _split_generators(self, dl_manager):
    return {self._split: self._generate_examples()}

  def _generate_examples(self):
    seen = set()
    for rid, fields in self._records():
      if isinstance(fields, BadRecord):
        self._report.add(rid, str(fields))
      elif rid in seen:
        self._report.add(rid, "duplicate id (first occurrence kept)")
      else:
        seen.add(rid)
        self._report.written += 1
        yield rid, {"id": rid, **fields}


def dataset_dir(data_dir: str, kind: str) -> str:
  return os.path.join(data_dir, DATASET_NAME[kind], VERSION)


def build(kind: str, records: Callable[[], Iterator[Record]], data_dir: str, *,
          split: str | None = None, metadata: dict | None = None,
          overwrite: bool = False) -> SkipReport:
  """Writes ``records`` as a TFDS array_record dataset under ``data_dir``; returns the report.

  TFDS writes into an ``incomplete.*`` folder and renames it when done, so a killed build leaves
  no half dataset; leftovers of such a build are removed here before building again.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
  target = dataset_dir(data_dir, kind)
  if os.path.exists(os.path.join(target, "dataset_info.json")):
    if not overwrite:
      raise FileExistsError(f"{target} already holds a built dataset; pass overwrite "
                            "(--overwrite) to rebuild it")
    shutil.rmtree(target)
  parent = os.path.dirname(target)
  for stale in glob.glob(os.path.join(parent, "incomplete.*")):
    shutil.rmtree(stale, ignore_errors=True)
  report = SkipReport()
  builder = _RecordBuilder(kind=kind, records=records, split=split or DEFAULT_SPLIT[kind],
                           report=report, metadata={"kind": kind, **(metadata or {})},
                           data_dir=data_dir)
  with tempfile.TemporaryDirectory() as scratch:  # TFDS wants a download folder; we fetch nothing
    builder.download_and_prepare(download_dir=scratch, download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  with open(os.path.join(target, "skipped.jsonl"), "w", encoding="utf-8") as f:
    for rid, why in report.skipped:
      f.write(json.dumps({"id": rid, "reason": why}) + "\n")
  return report


def open_split(data_dir: str, kind: str, split: str | None = None):
  """(array_record data source with images left encoded, DatasetInfo) of a built dataset.

  ``data_dir`` is what was passed to ``build`` (or the dataset's version folder itself).
  """
  path = data_dir
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    path = dataset_dir(data_dir, kind)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"no built {kind} dataset in {data_dir} (looked for {path}); build it "
                            f"with `uip2p data build {kind} ... --out {data_dir}`")
  builder = tfds.builder_from_directory(path)
  found = builder.info.metadata.get("kind") if builder.info.metadata else None
  if found != kind:
    raise ValueError(f"{path} holds {found!r} records, expected {kind!r}")
  split = split or DEFAULT_SPLIT[kind]
  if split not in builder.info.splits:
    raise ValueError(f"{path} has splits {list(builder.info.splits)}, not {split!r}")
  decoders = {name: tfds.decode.SkipDecoding() for name in IMAGE_FIELDS[kind]}
  return builder.as_data_source(split, decoders=decoders), builder.info


def sample_manifest() -> str:
  """The manifest of the CC0/public-domain sample photos shipped with the package."""
  return os.path.join(os.path.dirname(__file__), "sample", "manifest.jsonl")


def build_sample(data_dir: str, overwrite: bool = False) -> SkipReport:
  """The sample photos as a ``captions`` dataset (seconds; used by the demo and tests)."""
  manifest = sample_manifest()
  return build("captions", lambda: manifest_records(manifest), data_dir,
               metadata={"source": "uip2p_jax sample photos"}, overwrite=overwrite)


__all__ = ["KINDS", "BadRecord", "SkipReport", "build", "build_sample", "dataset_dir",
           "expand_pattern", "ip2p_records", "magicbrush_records", "manifest_records",
           "open_split", "sample_manifest", "validated_image", "webdataset_records"]
