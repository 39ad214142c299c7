"""TFDS builders (array_record files) for the three record kinds, and their raw-source readers.

* ``captions``: cycle-edit records (image, input caption, instruction, edited caption, reverse
  instruction), from a folder + JSONL manifest or from img2dataset webdataset shards joined by key
  with a JSONL of generated instructions.
* ``ip2p``: InstructPix2Pix pairs from the parquet files of ``timbrooks/instructpix2pix-clip-
  filtered``, optionally joined with reverse instructions.
* ``magicbrush``: MagicBrush turns from its Hugging Face parquet files (turn structure kept).

A source is a function that checks its input files when called (a missing manifest or no
matching parquet file raises before anything is written) and returns an iterator of
``(id, where, fields)`` or ``(id, where, BadRecord)``. ``where`` says where the record came
from, so two records with the same id can be told apart: ``manifest.jsonl:12`` (JSONL file name
and line), ``data/part-0.parquet:row 7`` (parquet path and row), ``shards/00001.tar:000010004``
(shard path and key). Ids: a manifest line's ``id`` field, else ``<image path>@<line>`` (one
image may carry several edits); the webdataset key; ``<parquet stem>-<row, 6 digits>`` for IP2P;
``<img_id>-<turn>`` for MagicBrush.

``build`` writes the good records and returns a :class:`SkipReport` of the others, also written to
``skipped.jsonl`` next to the data (``{"id", "where", "reason"}`` per line; ``id`` is null for a
line that is not a JSON object). A build in which no record can be written raises
:class:`NothingWritten` (still writing ``skipped.jsonl``). Exit status of ``uip2p data build``:
0 when every record was written, 3 when the dataset was written but ``report.num_skipped > 0``,
2 on an error (missing input, nothing written, an existing dataset without ``--overwrite``).
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
from typing import NamedTuple

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


class SkippedRecord(NamedTuple):
  id: str | None     # the record's id; None when the line could not even be parsed
  where: str         # 'file:line', 'file:row N' or 'shard:key': unique within one build
  reason: str


@dataclasses.dataclass
class SkipReport:
  skipped: list[SkippedRecord] = dataclasses.field(default_factory=list)
  written: int = 0

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def add(self, record_id: str | None, where: str, reason: str) -> None:
    self.skipped.append(SkippedRecord(record_id, where, reason))

  def summary(self, limit: int = 20) -> str:
    lines = [f"{self.written} records written, {self.num_skipped} skipped"]
    lines += [f"  skipped {describe_skip(skip)}" for skip in self.skipped[:limit]]
    if self.num_skipped > limit:
      lines.append(f"  ... and {self.num_skipped - limit} more (see skipped.jsonl)")
    return "\n".join(lines)


def describe_skip(skip: SkippedRecord) -> str:
  """'manifest.jsonl:3 (id img/a.jpg@3): image file not found: ...'."""
  named = f" (id {skip.id})" if skip.id is not None and skip.id != skip.where else ""
  return f"{skip.where}{named}: {skip.reason}"


class NothingWritten(ValueError):
  """Every record of a build was bad (or there were none); ``report`` lists them."""

  def __init__(self, message: str, report: SkipReport):
    super().__init__(message)
    self.report = report


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


def _parse_jsonl_line(raw: str) -> tuple[dict | None, str]:
  """(object, "") for a JSON object line, else (None, why it is not one)."""
  try:
    obj = json.loads(raw)
  except json.JSONDecodeError as e:
    return None, f"invalid JSON ({e.msg} at column {e.colno})"
  if not isinstance(obj, dict):
    return None, f"expected a JSON object, got {type(obj).__name__}"
  return obj, ""


def read_jsonl(path: str) -> Iterator[tuple[int, dict | None, str]]:
  """(line number from 1, the parsed object or None when the line is not a JSON object, the raw
  line without its newline) for each non-blank line of ``path``; ``jsonl_error(raw)`` says why a
  line gave None. Bad lines are yielded, not raised, so a caller can report and skip them."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      raw = line.rstrip("\r\n")
      if raw.strip():
        yield number, _parse_jsonl_line(raw)[0], raw


def jsonl_error(raw: str) -> str:
  """Why a raw JSONL line is not a JSON object ("" if it is one)."""
  return _parse_jsonl_line(raw)[1]


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


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")


# ---------------------------------------------------------------------------------------------
# Sources: each checks its inputs when called, then yields (id, where, fields | BadRecord).

Record = tuple["str | None", str, "dict | BadRecord"]


def _jsonl_table(path: str, key_of: Callable[[dict], object | None], missing: str
                 ) -> tuple[dict, list[Record]]:
  """({key: (object, where)} of a side JSONL (first occurrence kept), [skip records])."""
  name = os.path.basename(path)
  table, bad = {}, []
  for number, obj, raw in read_jsonl(path):
    where = f"{name}:{number}"
    key = key_of(obj) if obj is not None else None
    if obj is None or key is None:
      bad.append((None, where, BadRecord(jsonl_error(raw) if obj is None else missing)))
    elif key in table:
      bad.append((None, where, BadRecord(f"duplicate of {table[key][1]} (first kept)")))
    else:
      table[key] = (obj, where)
  return table, bad


def manifest_records(manifest: str, max_side: int = 0) -> Iterator[Record]:
  """A folder of images + JSONL manifest; image paths relative to the manifest's folder."""
  _require_file(manifest, "manifest")
  root = os.path.dirname(os.path.abspath(manifest))
  name = os.path.basename(manifest)

  def records():
    for number, obj, raw in read_jsonl(manifest):
      where = f"{name}:{number}"
      if obj is None:
        yield None, where, BadRecord(jsonl_error(raw))
        continue
      rel = obj.get("image")
      # The image path alone is not unique: one image may carry several edits.
      rid = str(obj["id"]) if obj.get("id") else f"{rel}@{number}" if rel else where
      try:
        if not isinstance(rel, str) or not rel:
          raise BadRecord("image path is missing")
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
          raise BadRecord(f"image file not found: {path}")
        with open(path, "rb") as f:
          image = validated_image(f.read(), max_side)
        yield rid, where, {"image": image,
                           **{k: _text(obj, k) for k in TEXT_FIELDS["captions"]}}
      except BadRecord as e:
        yield rid, where, e
  return records()


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
  _require_file(instructions, "instructions file")
  shard_files = _files(shards, "webdataset shard")

  def records():
    key_of = lambda obj: str(obj["key"]) if isinstance(obj.get("key"), (str, int)) else None
    table, bad = _jsonl_table(instructions, key_of, "no 'key' field")
    yield from bad
    seen = set()
    for shard in shard_files:
      try:
        samples = list(_tar_samples(shard))
      except (tarfile.TarError, OSError, EOFError) as e:
        yield None, shard, BadRecord(f"unreadable shard ({e})")
        continue
      for key, sample in samples:
        short_key = os.path.basename(key)
        where = f"{shard}:{key}"
        seen.add(short_key)
        try:
          extra = table.get(short_key, (None,))[0]
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
          yield short_key, where, {"image": validated_image(sample[image_ext], max_side),
                                   **{k: _text(fields, k) for k in TEXT_FIELDS["captions"]}}
        except BadRecord as e:
          yield short_key, where, e
    for key in sorted(set(table) - seen):
      yield key, table[key][1], BadRecord("instruction record has no image in the shards")
  return records()


def _parquet_files(pattern: str, columns: list[str]) -> list[str]:
  """The files matching ``pattern``, each checked to be parquet with ``columns``."""
  import pyarrow.parquet as pq
  files = _files(pattern, "parquet")
  for path in files:
    try:
      names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; has {names}")
  return files


def _parquet_rows(files: list[str], columns: list[str]) -> Iterator[tuple[str, int, dict]]:
  """(path, row within the file, {column: value})."""
  import pyarrow.parquet as pq
  for path in files:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
      for values in batch.to_pylist():
        yield path, row, values
        row += 1


def _image_bytes(value) -> bytes | None:
  """HF `datasets` stores images as {"bytes": ..., "path": ...} structs."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return value


def ip2p_records(parquet: str, reverse_instructions: str | None = None,
                 max_side: int = 0) -> Iterator[Record]:
  """timbrooks/instructpix2pix-clip-filtered rows; ids are '<file stem>-<row, 6 digits>'.

  ``reverse_instructions`` JSONL: ``{"id": ..., "reverse_instruction": ...}`` or, keyed by text,
  ``{"input_caption": ..., "instruction": ..., "reverse_instruction": ...}``. When given, rows
  without a reverse instruction are skipped (CEC training needs one).
  """
  columns = ["original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image"]
  files = _parquet_files(parquet, columns)
  if reverse_instructions:
    _require_file(reverse_instructions, "reverse instructions file")

  def records():
    reverse_by = {}
    if reverse_instructions:
      def key_of(obj):  # by id, or by (input caption, instruction)
        reverse = obj.get("reverse_instruction")
        if not isinstance(reverse, str) or not reverse.strip():
          return None
        if obj.get("id"):
          return str(obj["id"])
        return (str(obj.get("input_caption", "")).strip(),
                str(obj.get("instruction", "")).strip())
      reverse_by, bad = _jsonl_table(reverse_instructions, key_of,
                                     "'reverse_instruction' is missing or empty")
      yield from bad
    for path, row, values in _parquet_rows(files, columns):
      rid = f"{os.path.splitext(os.path.basename(path))[0]}-{row:06d}"
      where = f"{path}:row {row}"
      try:
        fields = {"input_caption": _text(values, "original_prompt"),
                  "instruction": _text(values, "edit_prompt"),
                  "edited_caption": _text(values, "edited_prompt")}
        match = (reverse_by.get(rid)
                 or reverse_by.get((fields["input_caption"], fields["instruction"])))
        if reverse_instructions and not match:
          raise BadRecord("no reverse instruction for this record")
        fields["reverse_instruction"] = match[0]["reverse_instruction"].strip() if match else ""
        yield rid, where, {
            "image": validated_image(_image_bytes(values["original_image"]), max_side),
            "edited_image": validated_image(_image_bytes(values["edited_image"]), max_side),
            **fields}
      except BadRecord as e:
        yield rid, where, e
  return records()


def _magicbrush_descriptions(path: str | None) -> dict[tuple[str, int], tuple[str, str]]:
  """MagicBrush's global_descriptions.json -> {(img_id, turn): (input caption, output caption)}.

  The file maps ``img_id -> {"<id>-input.png": text, "<id>-output1.png": text, ...}``; turn t's
  input is output t-1 (the source image for turn 1).
  """
  if not path:
    return {}
  _require_file(path, "descriptions file")
  with open(path, encoding="utf-8") as f:
    try:
      table = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected a JSON object {{img_id: {{file name: caption}}}}, got "
                     f"{type(table).__name__}")
  out = {}
  for img_id, texts in table.items():
    by_turn = {}
    for name, text in (texts.items() if isinstance(texts, dict) else ()):
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
  columns = ["img_id", "turn_index", "source_img", "target_img", "instruction"]
  files = _parquet_files(parquet, columns)
  captions = _magicbrush_descriptions(descriptions)

  def records():
    for path, row, values in _parquet_rows(files, columns):
      img_id, turn = str(values["img_id"]), values["turn_index"]
      rid, where = f"{img_id}-{turn}", f"{path}:row {row}"
      try:
        if not isinstance(turn, (int, np.integer)) or turn < 1:
          raise BadRecord(f"turn_index must be a positive integer, got {turn!r}")
        input_caption, edited_caption = captions.get((img_id, int(turn)), ("", ""))
        if descriptions and not edited_caption:
          raise BadRecord("no global description for this turn")
        yield rid, where, {
            "image": validated_image(_image_bytes(values["source_img"]), max_side),
            "target_image": validated_image(_image_bytes(values["target_img"]), max_side),
            "instruction": _text(values, "instruction"), "img_id": img_id,
            "turn_index": int(turn), "input_caption": input_caption,
            "edited_caption": edited_caption}
      except BadRecord as e:
        yield rid, where, e
  return records()


# ---------------------------------------------------------------------------------------------
# The TFDS builder.

def features(kind: str) -> tfds.features.FeaturesDict:
  spec = {"id": tfds.features.Text()}
  spec.update({name: tfds.features.Image(shape=(None, None, 3)) for name in IMAGE_FIELDS[kind]})
  spec.update({name: tfds.features.Text() for name in TEXT_FIELDS[kind]})
  if kind == "magicbrush":
    spec.update(img_id=tfds.features.Text(), turn_index=np.int32)
  return tfds.features.FeaturesDict(spec)


class _NoRecords(Exception):
  """Raised from inside the TFDS generator when the source ends with nothing written."""


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one split from a record iterator; the iterator and kind come at construction."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, kind: str, records: Iterator[Record], split: str,
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
    first_seen = {}  # id -> where it was written
    for rid, where, fields in self._records:
      if isinstance(fields, BadRecord):
        self._report.add(rid, where, str(fields))
      elif rid in first_seen:
        self._report.add(rid, where, f"duplicate id (first kept: {first_seen[rid]})")
      else:
        first_seen[rid] = where
        self._report.written += 1
        yield rid, {"id": rid, **fields}
    if not self._report.written:  # TFDS would fail with "No examples were yielded"
      raise _NoRecords()


def dataset_dir(data_dir: str, kind: str) -> str:
  return os.path.join(data_dir, DATASET_NAME[kind], VERSION)


def _write_skipped(target: str, report: SkipReport) -> str:
  os.makedirs(target, exist_ok=True)
  path = os.path.join(target, "skipped.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for skip in report.skipped:
      f.write(json.dumps(skip._asdict()) + "\n")
  return path


def build(kind: str, records: Callable[[], Iterator[Record]], data_dir: str, *,
          split: str | None = None, metadata: dict | None = None,
          overwrite: bool = False) -> SkipReport:
  """Writes ``records()`` as a TFDS array_record dataset under ``data_dir``; returns the report.

  ``records()`` is called before anything is created or removed, so a missing input file is an
  error that leaves ``data_dir`` as it was. TFDS writes into an ``incomplete.*`` folder and
  renames it when done, so a killed build leaves no half dataset; leftovers of such a build are
  removed here before building again. Raises :class:`NothingWritten` when no record could be
  written (``skipped.jsonl`` still lists why).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
  target = dataset_dir(data_dir, kind)
  built = os.path.exists(os.path.join(target, "dataset_info.json"))
  if built and not overwrite:
    raise FileExistsError(f"{target} already holds a built dataset; pass overwrite "
                          "(--overwrite) to rebuild it")
  source = records()  # opens the inputs: fails here, before any folder changes
  data_dir_existed = os.path.isdir(data_dir)
  if os.path.isdir(target):
    leftovers = set(os.listdir(target)) - {"skipped.jsonl"}
    if not built and leftovers:
      raise FileExistsError(f"{target} holds {sorted(leftovers)[:5]} but no dataset_info.json; "
                            "it is not a dataset this code built: move it away first")
    shutil.rmtree(target)  # a built dataset (overwrite) or the skip list of a failed build
  parent = os.path.dirname(target)
  for stale in glob.glob(os.path.join(parent, "incomplete.*")):
    shutil.rmtree(stale, ignore_errors=True)
  report = SkipReport()
  builder = _RecordBuilder(kind=kind, records=source, split=split or DEFAULT_SPLIT[kind],
                           report=report, metadata={"kind": kind, **(metadata or {})},
                           data_dir=data_dir)
  try:
    with tempfile.TemporaryDirectory() as scratch:  # TFDS wants a download folder; unused
      builder.download_and_prepare(
          download_dir=scratch, download_config=tfds.download.DownloadConfig(
              download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except _NoRecords:
    for stale in glob.glob(os.path.join(parent, "incomplete.*")):
      shutil.rmtree(stale, ignore_errors=True)
    if not report.num_skipped:
      for folder in [parent] + ([] if data_dir_existed else [data_dir]):
        try:  # leave no empty folders behind for an empty source
          os.rmdir(folder)
        except OSError:
          pass
      raise NothingWritten(f"no {kind} records to write: the source is empty", report) from None
    skipped_file = _write_skipped(target, report)
    first = "; ".join(describe_skip(skip) for skip in report.skipped[:3])
    raise NothingWritten(
        f"all {report.num_skipped} {kind} records were skipped, nothing written; first: {first}"
        f" (full list: {skipped_file})", report) from None
  _write_skipped(target, report)
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


__all__ = ["KINDS", "BadRecord", "NothingWritten", "SkipReport", "SkippedRecord", "build",
           "build_sample", "dataset_dir", "describe_skip", "expand_pattern", "ip2p_records",
           "jsonl_error", "magicbrush_records", "manifest_records", "open_split", "read_jsonl",
           "sample_manifest", "validated_image", "webdataset_records"]
