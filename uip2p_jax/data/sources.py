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

A source is a function that checks its input files when called (a missing manifest or no matching
parquet file raises before anything is written) and returns a :class:`ShardedSource`: its records,
``(id, where, fields)`` or ``(id, where, BadRecord)``, split into shards (a tar file, a parquet
file, a block of JSONL lines) that ``builders.build`` reads in parallel worker processes;
iterating it yields every record in order, as one process would. Paths may be local or any URL
``etils.epath`` opens (``gs://...`` where its filesystem library is installed). ``where`` says
where the record came from, so two records with the same id can be told apart:
``manifest.jsonl:12`` (JSONL file name and line), ``data/part-0.parquet:row 7`` (parquet path and
row), ``shards/00001.tar:000010004`` (shard path and key). Ids: a manifest line's ``id`` field,
else ``<image path>@<line>`` (one image may carry several edits); the webdataset key; ``<parquet
stem>-<row, 6 digits>`` for IP2P; ``<img_id>-<turn>`` for MagicBrush. ``builders.build`` writes
them.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import sqlite3
import tarfile
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import PIL.Image
from etils import epath

from uip2p_jax.storage import is_remote

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
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # (convert would copy)
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
  with epath.Path(path).open("r", encoding="utf-8") as f:
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
  if not is_remote(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern)))
  parts = pattern.split("/")
  magic = next((i for i, part in enumerate(parts) if re.search(r"[*?[]", part)), None)
  if magic is None:
    return [pattern] if epath.Path(pattern).exists() else []
  root = epath.Path("/".join(parts[:magic]))
  return sorted(str(p) for p in root.glob("/".join(parts[magic:])))


def _files(pattern: str, what: str) -> list[str]:
  files = expand_pattern(pattern)
  if not files:
    raise FileNotFoundError(f"no {what} files match {pattern!r}")
  return files


def _require_file(path: str, what: str) -> None:
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"{what} not found: {path}")


def _folder_of(path: str) -> str:
  """The folder of a file (local: absolute), that its relative image paths start from."""
  return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))


def _size(path: str) -> int:
  return epath.Path(path).stat().length


# ---------------------------------------------------------------------------------------------
# Sharded sources: what `builders.build` runs in parallel, one shard per worker task.

Record = tuple["str | None", str, "dict | BadRecord"]


@dataclasses.dataclass(frozen=True)
class Shard:
  """One input shard: ``read(*args)`` yields its records. Both are pickled to a worker process:
  ``read`` is a module-level function."""
  label: str                           # the input it covers: a file, or 'file lines 1-4096'
  read: Callable[..., Iterator[Record]]
  args: tuple
  num_bytes: int = 0                   # its input's size (a resumed build checks it)
  size: int | None = None              # records it yields, when known before reading it


@dataclasses.dataclass
class ShardedSource:
  """A source's records as shards, plus what is reported before and after them (a side file's
  bad lines; its keys no shard record matched). Iterating it yields every record in order."""
  shards: list[Shard]
  side: "SideTable | None" = None      # indexed by `prepare` before any shard is read
  unmatched: str | None = None         # if set: the side keys no record had, with this reason
  settings: dict = dataclasses.field(default_factory=dict)  # what else decides the records
  resumable: bool = True               # False: one in-process iterator, read from the start

  def prepare(self, folder: str) -> list[Record]:
    """Indexes the side file into `folder`; returns its bad lines (reported first)."""
    return self.side.index(folder) if self.side else []

  def finish(self, seen: Iterable[str]) -> Iterator[Record]:
    """What is reported after the shards, given the ids of every record they yielded."""
    if self.unmatched:
      for key, where in self.side.unmatched(seen):
        yield key, where, BadRecord(self.unmatched)

  def __iter__(self) -> Iterator[Record]:
    with tempfile.TemporaryDirectory() as folder:
      yield from self.prepare(folder)
      seen = []
      for shard in self.shards:
        for record in shard.read(*shard.args):
          if record[0] is not None:
            seen.append(record[0])
          yield record
      yield from self.finish(seen)


def _db_key(key) -> str:
  return key if isinstance(key, str) else "\0" + json.dumps(list(key))


class SideTable:
  """A side JSONL's objects by key (first occurrence kept), indexed in an SQLite file: every
  worker of a build reads the one copy on disk (12 M instructions held in memory by each worker
  would not fit). Pickles as the index file's path alone."""

  def __init__(self, path: str, key_of: Callable[[dict], object | None], missing: str):
    self.path, self._key_of, self._missing = path, key_of, missing
    self.db: str | None = None
    self._conn: sqlite3.Connection | None = None

  def __getstate__(self):
    return {"db": self.db}

  def __setstate__(self, state):
    self.path = self._key_of = self._missing = None
    self.db, self._conn = state["db"], None

  def index(self, folder: str) -> list[Record]:
    """Reads the JSONL into an index in `folder`; returns its bad lines as records."""
    fd, self.db = tempfile.mkstemp(suffix=".sqlite", dir=folder)
    os.close(fd)
    conn = self._conn = sqlite3.connect(self.db)
    conn.execute("CREATE TABLE rows (key TEXT PRIMARY KEY, line TEXT, place TEXT)")
    name, bad = os.path.basename(self.path), []
    with conn:  # one transaction
      for number, obj, raw in read_jsonl(self.path):
        where = f"{name}:{number}"
        key = self._key_of(obj) if obj is not None else None
        if obj is None or key is None:
          bad.append((None, where, BadRecord(jsonl_error(raw) if obj is None else self._missing)))
        elif not conn.execute("INSERT OR IGNORE INTO rows VALUES (?, ?, ?)",
                              (_db_key(key), raw, where)).rowcount:
          first = conn.execute("SELECT place FROM rows WHERE key = ?", (_db_key(key),)).fetchone()
          bad.append((None, where, BadRecord(f"duplicate of {first[0]} (first kept)")))
    return bad

  def _connection(self) -> sqlite3.Connection:
    if self._conn is None:  # a worker: read-only
      self._conn = sqlite3.connect(f"file:{urllib.parse.quote(self.db)}?mode=ro", uri=True)
    return self._conn

  def get(self, key) -> tuple[dict, str] | None:
    """(the object, 'file:line') of a key, or None."""
    row = self._connection().execute("SELECT line, place FROM rows WHERE key = ?",
                                     (_db_key(key),)).fetchone()
    return (json.loads(row[0]), row[1]) if row else None

  def unmatched(self, seen: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(key, 'file:line') of the string keys not in `seen`, sorted by key."""
    conn = self._connection()
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY)")
    conn.execute("DELETE FROM seen")
    conn.executemany("INSERT OR IGNORE INTO seen VALUES (?)", ((key,) for key in seen))
    yield from conn.execute("SELECT key, place FROM rows WHERE key NOT IN (SELECT key FROM seen)"
                            " AND substr(key, 1, 1) != char(0) ORDER BY key")


# A JSONL input is read in blocks of this many lines, one shard each.
JSONL_SHARD_LINES = 4096


def _jsonl_shards(path: str, read: Callable, args: tuple, lines_per_shard: int) -> list[Shard]:
  """Shards of ``lines_per_shard`` lines; ``read(path, offset, first line, lines, *args)``."""
  shards, name = [], os.path.basename(path)
  offset = start = first = lines = records = 0

  def close():
    shards.append(Shard(f"{name} lines {first}-{first + lines - 1}", read,
                        (path, start, first, lines) + args, offset - start, records))
  with epath.Path(path).open("rb") as f:
    for number, line in enumerate(f, 1):
      if lines == lines_per_shard:
        close()
        start, lines, records = offset, 0, 0
      if not lines:
        first = number
      lines += 1
      records += bool(line.strip())
      offset += len(line)
  if lines:
    close()
  return shards


def _jsonl_block(path: str, offset: int, first: int, lines: int
                 ) -> Iterator[tuple[int, dict | None, str]]:
  """`read_jsonl` over lines first..first+lines-1 (starting at byte `offset`); a line that is not
  UTF-8 gives (number, None, why)."""
  with epath.Path(path).open("rb") as f:
    f.seek(offset)
    for number in range(first, first + lines):
      line = f.readline()
      try:
        raw = line.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        yield number, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
        continue
      if raw.strip():
        obj, error = _parse_jsonl_line(raw)
        yield number, obj, error


def _file_shards(files: list[str], read: Callable, args: tuple,
                 sizes: list[int | None] | None = None) -> list[Shard]:
  """One shard per file; ``read(file, *args)``."""
  sizes = sizes or [None] * len(files)
  return [Shard(path, read, (path,) + args, _size(path), size) for path, size in zip(files, sizes)]


def manifest_records(manifest: str, max_side: int = 0,
                     lines_per_shard: int = JSONL_SHARD_LINES) -> ShardedSource:
  """A folder of images + JSONL manifest; image paths relative to the manifest's folder."""
  _require_file(manifest, "manifest")
  return ShardedSource(_jsonl_shards(manifest, _manifest_block, (max_side,), lines_per_shard),
                       settings={"max_side": max_side})


def _manifest_block(manifest: str, offset: int, first: int, lines: int,
                    max_side: int) -> Iterator[Record]:
  root, name = _folder_of(manifest), os.path.basename(manifest)
  for number, obj, error in _jsonl_block(manifest, offset, first, lines):
    where = f"{name}:{number}"
    if obj is None:
      yield None, where, BadRecord(error)
      continue
    rel = obj.get("image")
    rid = _line_id(obj.get("id"), rel, number, where)
    try:
      image = _image_file(root, rel, max_side)
      yield rid, where, {"image": image, **{k: _text(obj, k) for k in TEXT_FIELDS["captions"]}}
    except BadRecord as e:
      yield rid, where, e


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
  file = epath.Path(path)
  if not file.is_file():
    raise BadRecord(f"{what} file not found: {path}")
  return _named_image(file.read_bytes(), max_side, what)


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
  with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f) as tar:
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


def _instruction_key(obj: dict) -> str | None:
  return str(obj["key"]) if isinstance(obj.get("key"), (str, int)) else None


def webdataset_records(shards: str, instructions: str, max_side: int = 0) -> ShardedSource:
  """img2dataset output (jpg + txt/json per key) joined by key with generated instructions.

  ``instructions`` JSONL: ``{"key": ..., "instruction": ..., "edited_caption": ...,
  "reverse_instruction": ...}`` and optionally ``input_caption`` (else the shard's txt caption).
  """
  _require_file(instructions, "instructions file")
  shard_files = _files(shards, "webdataset shard")
  table = SideTable(instructions, _instruction_key, "no 'key' field")
  return ShardedSource(_file_shards(shard_files, _webdataset_shard, (table, max_side)), side=table,
                       unmatched="instruction record has no image in the shards",
                       settings={"instructions": instructions, "max_side": max_side,
                                 "instructions_bytes": _size(instructions)})


def _webdataset_shard(shard: str, table: SideTable, max_side: int) -> Iterator[Record]:
  try:
    samples = list(_tar_samples(shard))
  except (tarfile.TarError, OSError, EOFError) as e:
    yield None, shard, BadRecord(f"unreadable shard ({e})")
    return
  for key, sample in samples:
    short_key = os.path.basename(key)
    where = f"{shard}:{key}"
    try:
      match = table.get(short_key)
      if match is None:
        raise BadRecord("no instruction record for this key")
      image_ext = next((e for e in _IMAGE_EXTENSIONS if e in sample), None)
      if image_ext is None:
        raise BadRecord(f"no image in the sample (members: {sorted(sample)})")
      caption = match[0].get("input_caption") or sample_caption(sample)
      fields = {**match[0], "input_caption": caption}
      yield short_key, where, {"image": validated_image(sample[image_ext], max_side),
                               **{k: _text(fields, k) for k in TEXT_FIELDS["captions"]}}
    except BadRecord as e:
      yield short_key, where, e


def _parquet_file(path: str):
  import pyarrow.parquet as pq
  return pq.ParquetFile(epath.Path(path).open("rb") if is_remote(path) else path)


def _parquet_files(pattern: str, columns: list[str]) -> list[str]:
  """The files matching ``pattern``, each checked to be parquet with ``columns``."""
  files = _files(pattern, "parquet")
  for path in files:
    try:
      names = _parquet_file(path).schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; has {names}")
  return files


def _parquet_shards(files: list[str], read: Callable, args: tuple) -> list[Shard]:
  """One shard per parquet file, its size its number of rows."""
  return _file_shards(files, read, args, [_parquet_file(f).metadata.num_rows for f in files])


def _parquet_rows(files: list[str], columns: list[str]) -> Iterator[tuple[str, int, dict]]:
  """(path, row within the file, {column: value})."""
  for path in files:
    row = 0
    for batch in _parquet_file(path).iter_batches(batch_size=64, columns=columns):
      for values in batch.to_pylist():
        yield path, row, values
        row += 1


def _image_bytes(value) -> bytes | None:
  """HF `datasets` stores images as {"bytes": ..., "path": ...} structs."""
  if isinstance(value, dict):
    value = value.get("bytes")
  return value


IP2P_COLUMNS = ["original_prompt", "original_image", "edit_prompt", "edited_prompt",
                "edited_image"]


def _reverse_key(obj: dict):
  """A reverse instruction's key: its id, or (input caption, instruction)."""
  reverse = obj.get("reverse_instruction")
  if not isinstance(reverse, str) or not reverse.strip():
    return None
  if obj.get("id"):
    return str(obj["id"])
  return (str(obj.get("input_caption", "")).strip(), str(obj.get("instruction", "")).strip())


def ip2p_records(parquet: str, reverse_instructions: str | None = None,
                 max_side: int = 0) -> ShardedSource:
  """timbrooks/instructpix2pix-clip-filtered rows; ids are '<file stem>-<row, 6 digits>'.

  ``reverse_instructions`` JSONL: ``{"id": ..., "reverse_instruction": ...}`` or, keyed by text,
  ``{"input_caption": ..., "instruction": ..., "reverse_instruction": ...}``. When given, rows
  without a reverse instruction are skipped (CEC training needs one).
  """
  files = _parquet_files(parquet, IP2P_COLUMNS)
  table, settings = None, {"max_side": max_side}
  if reverse_instructions:
    _require_file(reverse_instructions, "reverse instructions file")
    table = SideTable(reverse_instructions, _reverse_key,
                      "'reverse_instruction' is missing or empty")
    settings.update(reverse_instructions=reverse_instructions,
                    reverse_bytes=_size(reverse_instructions))
  return ShardedSource(_parquet_shards(files, _ip2p_file, (table, max_side)), side=table,
                       settings=settings)


def _ip2p_file(path: str, reverse: SideTable | None, max_side: int) -> Iterator[Record]:
  for path, row, values in _parquet_rows([path], IP2P_COLUMNS):
    rid = f"{os.path.splitext(os.path.basename(path))[0]}-{row:06d}"
    where = f"{path}:row {row}"
    try:
      fields = {"input_caption": _text(values, "original_prompt"),
                "instruction": _text(values, "edit_prompt"),
                "edited_caption": _text(values, "edited_prompt")}
      match = reverse and (reverse.get(rid)
                           or reverse.get((fields["input_caption"], fields["instruction"])))
      if reverse and not match:
        raise BadRecord("no reverse instruction for this record")
      fields["reverse_instruction"] = match[0]["reverse_instruction"].strip() if match else ""
      yield rid, where, {
          "image": validated_image(_image_bytes(values["original_image"]), max_side),
          "edited_image": validated_image(_image_bytes(values["edited_image"]), max_side),
          **fields}
    except BadRecord as e:
      yield rid, where, e


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
                        max_side: int = 0,
                        lines_per_shard: int = JSONL_SHARD_LINES) -> ShardedSource:
  """Your own pairs: a JSONL file, one object per pair with the input and edited image paths
  (relative to the file's folder) and the instruction; captions and the reverse instruction
  are optional. Keys are PAIR_FIELDS' names unless `columns` (`parse_columns`) renames them.
  Ids: the line's id, else '<input image path>@<line>'."""
  _require_file(manifest, "pairs JSONL file")
  columns = {field: (columns or {}).get(field, field) for field in PAIR_FIELDS}
  return ShardedSource(_jsonl_shards(manifest, _pairs_block, (columns, max_side), lines_per_shard),
                       settings={"columns": columns, "max_side": max_side})


def _pairs_block(manifest: str, offset: int, first: int, lines: int, columns: dict[str, str],
                 max_side: int) -> Iterator[Record]:
  root, name = _folder_of(manifest), os.path.basename(manifest)
  image_of = lambda value, what: _image_file(root, value, max_side, what)
  for number, obj, error in _jsonl_block(manifest, offset, first, lines):
    where = f"{name}:{number}"
    if obj is None:
      yield None, where, BadRecord(error)
      continue
    rid = _line_id(obj.get(columns["id"]), obj.get(columns["input_image"]), number, where)
    try:
      yield rid, where, _pair_fields(obj, columns, image_of)
    except BadRecord as e:
      yield rid, where, e


def pairs_parquet_records(parquet: str, columns: dict[str, str] | None = None,
                          max_side: int = 0) -> ShardedSource:
  """Your own pairs from parquet files (e.g. a Hugging Face IP2P-style set: `columns` maps
  input_image=original_image, edited_image=edited_image, instruction=edit_prompt), images as
  bytes or {bytes, path} structs. Ids: the id column when mapped, else
  '<file stem>-<row, 6 digits>'."""
  explicit = dict(columns or {})
  columns = {field: explicit.get(field, field) for field in PAIR_FIELDS}
  files = _files(parquet, "parquet")
  try:
    available = _parquet_file(files[0]).schema_arrow.names
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
    raise ValueError(f"{files[0]}: not a readable parquet file ({e})") from None
  # Required and explicitly mapped columns must exist; the other optional fields are read when
  # the first file has a column of their name.
  wanted = sorted({columns[f] for f in PAIR_FIELDS
                   if f in REQUIRED_PAIR_FIELDS or f in explicit or columns[f] in available})
  files = _parquet_files(parquet, wanted)
  return ShardedSource(_parquet_shards(files, _pairs_parquet_file, (columns, wanted, max_side)),
                       settings={"columns": columns, "max_side": max_side})


def _pairs_parquet_file(path: str, columns: dict[str, str], wanted: list[str],
                        max_side: int) -> Iterator[Record]:
  image_of = lambda value, what: _named_image(_image_bytes(value), max_side, what)
  for path, row, values in _parquet_rows([path], wanted):
    given = values.get(columns["id"])
    rid = (str(given) if given not in (None, "") else
           f"{os.path.splitext(os.path.basename(path))[0]}-{row:06d}")
    where = f"{path}:row {row}"
    try:
      yield rid, where, _pair_fields(values, columns, image_of)
    except BadRecord as e:
      yield rid, where, e


def _magicbrush_descriptions(path: str | None) -> dict[tuple[str, int], tuple[str, str]]:
  """MagicBrush's global_descriptions.json -> {(img_id, turn): (input caption, output caption)}.

  The file maps ``img_id -> {"<id>-input.png": text, "<id>-output1.png": text, ...}``; turn t's
  input is output t-1 (the source image for turn 1).
  """
  if not path:
    return {}
  _require_file(path, "descriptions file")
  try:
    table = json.loads(epath.Path(path).read_text(encoding="utf-8"))
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


MAGICBRUSH_COLUMNS = ["img_id", "turn_index", "source_img", "target_img", "instruction"]


def magicbrush_records(parquet: str, descriptions: str | None = None,
                       max_side: int = 0) -> ShardedSource:
  """MagicBrush parquet rows (img_id, turn_index, source_img, target_img, instruction)."""
  files = _parquet_files(parquet, MAGICBRUSH_COLUMNS)
  captions = _magicbrush_descriptions(descriptions)
  return ShardedSource(
      _parquet_shards(files, _magicbrush_file, (captions, bool(descriptions), max_side)),
      settings={"descriptions": descriptions, "max_side": max_side})


def _magicbrush_file(path: str, captions: dict, need_captions: bool,
                     max_side: int) -> Iterator[Record]:
  for path, row, values in _parquet_rows([path], MAGICBRUSH_COLUMNS):
    img_id, turn = str(values["img_id"]), values["turn_index"]
    rid, where = f"{img_id}-{turn}", f"{path}:row {row}"
    try:
      if not isinstance(turn, (int, np.integer)) or turn < 1:
        raise BadRecord(f"turn_index must be a positive integer, got {turn!r}")
      input_caption, edited_caption = captions.get((img_id, int(turn)), ("", ""))
      if need_captions and not edited_caption:
        raise BadRecord("no global description for this turn")
      yield rid, where, {
          "image": validated_image(_image_bytes(values["source_img"]), max_side),
          "target_image": validated_image(_image_bytes(values["target_img"]), max_side),
          "instruction": _text(values, "instruction"), "img_id": img_id,
          "turn_index": int(turn), "input_caption": input_caption,
          "edited_caption": edited_caption}
    except BadRecord as e:
      yield rid, where, e


def sample_manifest() -> str:
  """The manifest of the CC0/public-domain sample photos shipped with the package."""
  return os.path.join(os.path.dirname(__file__), "sample", "manifest.jsonl")


__all__ = ["TEXT_FIELDS", "BadRecord", "Record", "Shard", "ShardedSource", "SideTable",
           "expand_pattern", "ip2p_records", "is_remote", "jsonl_error", "magicbrush_records",
           "manifest_records", "pairs_jsonl_records", "pairs_parquet_records", "parse_columns",
           "read_jsonl", "sample_caption", "sample_manifest", "validated_image",
           "webdataset_records"]
