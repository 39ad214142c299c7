"""TFDS builders (array_record files) for the three record kinds (readers: ``sources.py``).

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
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from uip2p_jax.data.sources import (TEXT_FIELDS, BadRecord, Record, manifest_records,
                                    sample_manifest)

VERSION = "1.0.0"
KINDS = ("captions", "ip2p", "magicbrush")
IMAGE_FIELDS = {"captions": ("image",), "ip2p": ("image", "edited_image"),
                "magicbrush": ("image", "target_image")}
# Text fields a record may leave empty (filled only when an optional side file is given).
OPTIONAL_TEXT = {"captions": (), "ip2p": ("reverse_instruction",),
                 "magicbrush": ("input_caption", "edited_caption")}
DEFAULT_SPLIT = {"captions": "train", "ip2p": "train", "magicbrush": "test"}
DATASET_NAME = {"captions": "uip2p_captions", "ip2p": "uip2p_ip2p_pairs",
                "magicbrush": "uip2p_magicbrush"}
# Metadata flags a build may leave to its records (value None in `build`'s metadata): True
# when every written record has these text fields non-empty (what CEC training needs).
DERIVED_FLAGS = {"has_reverse": ("reverse_instruction",),
                 "has_captions": ("input_caption", "edited_caption")}


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
    # Metadata flags left None are decided by the records written (every one has the fields).
    derived = {flag: True for flag, value in self._metadata.items()
               if value is None and flag in DERIVED_FLAGS}
    for rid, where, fields in self._records:
      if isinstance(fields, BadRecord):
        self._report.add(rid, where, str(fields))
      elif rid in first_seen:
        self._report.add(rid, where, f"duplicate id (first kept: {first_seen[rid]})")
      else:
        first_seen[rid] = where
        self._report.written += 1
        for flag in derived:
          derived[flag] = derived[flag] and all(fields[f] for f in DERIVED_FLAGS[flag])
        yield rid, {"id": rid, **fields}
    if not self._report.written:  # TFDS would fail with "No examples were yielded"
      raise _NoRecords()
    self.info.metadata.update(derived)  # TFDS writes dataset_info.json after the generation


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
  error that leaves ``data_dir`` as it was. A ``metadata`` flag of DERIVED_FLAGS set to None is
  decided by the records written. TFDS writes into an ``incomplete.*`` folder and
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


def build_sample(data_dir: str, overwrite: bool = False) -> SkipReport:
  """The sample photos as a ``captions`` dataset (seconds; used by the demo and tests)."""
  manifest = sample_manifest()
  return build("captions", lambda: manifest_records(manifest), data_dir,
               metadata={"source": "uip2p_jax sample photos"}, overwrite=overwrite)


__all__ = ["KINDS", "NothingWritten", "SkipReport", "SkippedRecord", "build", "build_sample",
           "dataset_dir", "describe_skip", "open_split"]
