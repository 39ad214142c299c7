"""Raw-source readers: the records of each dataset kind, read from their published formats.

* ``captions``: cycle-edit records (image, input caption, instruction, edited caption, reverse
  instruction), from a folder + JSONL manifest or from img2dataset webdataset shards joined by key
  with a JSONL of generated instructions.
* ``ip2p``: InstructPix2Pix pairs from the parquet files of ``timbrooks/instructpix2pix-clip-
  filtered``, optionally joined with reverse instructions.
* ``magicbrush``: MagicBrush turns from its Hugging Face parquet files (turn structure kept).
* ``pairs``: your own pairs (input image, edited image, instruction; captions and reverse
  instruction optional) from a folder + JSONL or from parquet with any column names, written as
  ``ip2p`` records.

A source is a function that checks its input files when called (a missing manifest or no
matching parquet file raises before anything is written) and returns an iterator of
``(id, where, fields)`` or ``(id, where, BadRecord)``. ``where`` says where the record came
from, so two records with the same id can be told apart: ``manifest.jsonl:12`` (JSONL file name
and line), ``data/part-0.parquet:row 7`` (parquet path and row), ``shards/00001.tar:000010004``
(shard path and key). Ids: a manifest line's ``id`` field, else ``<image path>@<line>`` (one
image may carry several edits); the webdataset key; ``<parquet stem>-<row, 6 digits>`` for IP2P;
``<img_id>-<turn>`` for MagicBrush. ``builders.build`` writes them.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator

import numpy as np
import PIL.Image

TEXT_FIELDS = {
    "captions": ("input_caption", "instruction", "edited_caption", "reverse_instruction"),
    "ip2p": ("input_caption", "instruction", "edited_caption", "reverse_instruction"),
    "magicbrush": ("instruction", "input_caption", "edited_caption"),
}
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadRecord(Exception):
  """One source record that cannot be written (the reason is the message)."""


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
      rid = _line_id(obj.get("id"), rel, number, where)
      try:
        image = _image_file(root, rel, max_side)
        yield rid, where, {"image": image,
                           **{k: _text(obj, k) for k in TEXT_FIELDS["captions"]}}
      except BadRecord as e:
        yield rid, where, e
  return records()


def _line_id(given, image_path, number: int, where: str) -> str:
  """A JSONL record's id: its own, else '<image path>@<line>' (the image path alone is not
  unique: one image may carry several edits)."""
  if given not in (None, ""):
    return str(given)
  return f"{image_path}@{number}" if isinstance(image_path, str) and image_path else where


def _image_file(root: str, rel, max_side: int = 0, what: str = "image") -> bytes:
  """The validated bytes of image file `rel` (relative to `root`), or BadRecord naming `what`."""
  if not isinstance(rel, str) or not rel:
    raise BadRecord(f"{what} path is missing")
  path = os.path.join(root, rel)
  if not os.path.isfile(path):
    raise BadRecord(f"{what} file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  return _named_image(data, max_side, what)


def _named_image(data, max_side: int, what: str) -> bytes:
  """validated_image, its BadRecord naming the field (a pair has two images)."""
  try:
    return validated_image(data, max_side)
  except BadRecord as e:
    if what == "image":
      raise
    raise BadRecord(f"{what}: {e}") from None


def _key_of(member: str) -> tuple[str, str]:
  """webdataset convention: 'dir/000123.jpg' -> ('dir/000123', 'jpg') (key ends at first dot)."""
  directory, base = os.path.split(member)
  stem, _, ext = base.partition(".")
  return os.path.join(directory, stem) if directory else stem, ext.lower()


def _tar_samples(path: str, extensions: tuple[str, ...] | None = None
                 ) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Groups consecutive members of a webdataset shard by key; with ``extensions``, reads only
  those members (the others are skipped over, not read: captions without the images)."""
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
      if extensions is None or ext in extensions:
        sample[ext] = tar.extractfile(member).read()
  if key is not None:
    yield key, sample


def sample_caption(sample: dict[str, bytes]) -> str | None:
  """A webdataset sample's caption: its ``txt`` member, else the ``caption`` of its ``json``."""
  caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
  if not caption and "json" in sample:
    try:
      caption = json.loads(sample["json"]).get("caption")
    except (json.JSONDecodeError, AttributeError):
      caption = None
  return caption


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
          caption = extra.get("input_caption") or sample_caption(sample)
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


# Your own pairs: the fields of a record and the names they have in the input.
PAIR_FIELDS = ("id", "input_image", "edited_image", "instruction", "input_caption",
               "edited_caption", "reverse_instruction")
REQUIRED_PAIR_FIELDS = ("input_image", "edited_image", "instruction")


def parse_columns(text: str | None) -> dict[str, str]:
  """``"input_image=original_image,instruction=edit_prompt"`` -> {field: name in the input}
  (the fields named; the others keep their own name). Unknown fields are an error."""
  columns = {}
  for item in filter(None, (part.strip() for part in (text or "").split(","))):
    field, sep, name = item.partition("=")
    field, name = field.strip(), name.strip()
    if not sep or not name or field not in PAIR_FIELDS:
      raise ValueError(f"--columns item {item!r}: expected FIELD=NAME with FIELD one of "
                       f"{', '.join(PAIR_FIELDS)}")
    columns[field] = name
  return columns


def _pair_fields(values: dict, columns: dict[str, str], image_of: Callable) -> dict:
  """A pairs record's ip2p fields from an input row (`image_of(value, label)` -> bytes)."""
  label = lambda field: (field if columns[field] == field else
                         f"{field} (column {columns[field]!r})")

  def text(field, optional=True):
    return _text({label(field): values.get(columns[field])}, label(field), optional)
  fields = {"image": image_of(values.get(columns["input_image"]), label("input_image")),
            "edited_image": image_of(values.get(columns["edited_image"]), label("edited_image")),
            "instruction": text("instruction", optional=False)}
  fields.update({name: text(name) for name in ("input_caption", "edited_caption",
                                               "reverse_instruction")})
  return fields


def pairs_jsonl_records(manifest: str, columns: dict[str, str] | None = None,
                        max_side: int = 0) -> Iterator[Record]:
  """Your own pairs: a JSONL file, one object per pair with the input and edited image paths
  (relative to the file's folder) and the instruction; captions and the reverse instruction
  are optional. Keys are PAIR_FIELDS' names unless `columns` (`parse_columns`) renames them.
  Ids: the line's id, else '<input image path>@<line>'."""
  _require_file(manifest, "pairs JSONL file")
  columns = {field: (columns or {}).get(field, field) for field in PAIR_FIELDS}
  root = os.path.dirname(os.path.abspath(manifest))
  name = os.path.basename(manifest)
  image_of = lambda value, what: _image_file(root, value, max_side, what)

  def records():
    for number, obj, raw in read_jsonl(manifest):
      where = f"{name}:{number}"
      if obj is None:
        yield None, where, BadRecord(jsonl_error(raw))
        continue
      rid = _line_id(obj.get(columns["id"]), obj.get(columns["input_image"]), number, where)
      try:
        yield rid, where, _pair_fields(obj, columns, image_of)
      except BadRecord as e:
        yield rid, where, e
  return records()


def pairs_parquet_records(parquet: str, columns: dict[str, str] | None = None,
                          max_side: int = 0) -> Iterator[Record]:
  """Your own pairs from parquet files (e.g. a Hugging Face IP2P-style set: `columns` maps
  input_image=original_image, edited_image=edited_image, instruction=edit_prompt), images as
  bytes or {bytes, path} structs. Ids: the id column when mapped, else
  '<file stem>-<row, 6 digits>'."""
  import pyarrow.parquet as pq
  explicit = dict(columns or {})
  columns = {field: explicit.get(field, field) for field in PAIR_FIELDS}
  files = _files(parquet, "parquet")
  try:
    available = pq.read_schema(files[0]).names
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
    raise ValueError(f"{files[0]}: not a readable parquet file ({e})") from None
  # Required and explicitly mapped columns must exist; the other optional fields are read when
  # the first file has a column of their name.
  wanted = sorted({columns[f] for f in PAIR_FIELDS
                   if f in REQUIRED_PAIR_FIELDS or f in explicit or columns[f] in available})
  files = _parquet_files(parquet, wanted)
  image_of = lambda value, what: _named_image(_image_bytes(value), max_side, what)

  def records():
    for path, row, values in _parquet_rows(files, wanted):
      given = values.get(columns["id"])
      rid = (str(given) if given not in (None, "") else
             f"{os.path.splitext(os.path.basename(path))[0]}-{row:06d}")
      where = f"{path}:row {row}"
      try:
        yield rid, where, _pair_fields(values, columns, image_of)
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

def sample_manifest() -> str:
  """The manifest of the CC0/public-domain sample photos shipped with the package."""
  return os.path.join(os.path.dirname(__file__), "sample", "manifest.jsonl")


__all__ = ["TEXT_FIELDS", "BadRecord", "Record", "expand_pattern", "ip2p_records", "jsonl_error",
           "magicbrush_records", "manifest_records", "pairs_jsonl_records",
           "pairs_parquet_records", "parse_columns", "read_jsonl", "sample_caption",
           "sample_manifest", "validated_image", "webdataset_records"]
