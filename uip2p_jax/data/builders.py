"""TFDS dataset writer (array_record files) for the three record kinds (readers: ``sources.py``).

``build`` reads a source's shards (``sources.ShardedSource``) in parallel worker processes
(``workers``; spawned, so JAX is never imported there: nor by ``uip2p_jax.cli``, which they
re-import when the build runs from the ``uip2p`` script) and writes each input shard's good
records to its own array_record file, ``<name>-<split>.array_record-<i>-of-<n>``, committed
when the shard is complete: a rename of the attempt's own ``.partial.*`` file locally, a copy
from local scratch for a ``gs://`` output (any URL ``etils.epath`` opens). A per-shard marker in
``build_state/`` beside it holds what the shard wrote and skipped, so a killed build run again
with the same inputs and settings resumes at the shards not yet committed (a damaged marker:
that shard again). One build at a time writes a folder (an flock on ``build_state/lock``; for
a URL, on a local file named after it): a second is refused. A worker whose main process was
killed stops at its next record, uncommitted; a rerun removes the ``.partial.*`` files left.
When every shard is done, ids repeated across shards are dropped (first kept, in input order)
and ``dataset_info.json`` / ``features.json`` are written last: a folder with
``dataset_info.json`` is a finished dataset, which only ``overwrite`` replaces. The records
and the skip report depend on the inputs alone, in input order, whatever ``workers`` is.

``build`` returns a :class:`SkipReport` of the records not written, also written to
``skipped.jsonl`` next to the data (``{"id", "where", "reason"}`` per line; ``id`` is null for a
line that is not a JSON object). A build in which no record can be written raises
:class:`NothingWritten` (still writing ``skipped.jsonl``). Exit status of ``uip2p data build``:
0 when every record was written, 3 when the dataset was written but ``report.num_skipped > 0``,
2 on an error (missing input, nothing written, an existing dataset without ``--overwrite``,
another build writing the folder).
Images are validated (fully decoded) at build time and stored as their original JPEG/PNG bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import queue
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from uip2p_jax import storage
from uip2p_jax.data.sources import (TEXT_FIELDS, BadRecord, Record, Shard, ShardedSource,
                                    manifest_records, sample_manifest)
from uip2p_jax.storage import is_remote

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
STATE_DIR = "build_state"   # an unfinished build's plan and shard markers (removed when done)
LOCK = "lock"               # in STATE_DIR: held (flock) by the build writing the folder
MARKER_KEYS = {"records", "num_bytes", "written", "skipped", "lacking"}
PLAN_FORMAT = 1


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


def dataset_dir(data_dir: str, kind: str) -> str:
  return os.path.join(data_dir, DATASET_NAME[kind], VERSION)


def _write_skipped(target: epath.Path, report: SkipReport) -> str:
  target.mkdir(parents=True, exist_ok=True)
  path = target / "skipped.jsonl"
  path.write_text("".join(json.dumps(skip._asdict()) + "\n" for skip in report.skipped),
                  encoding="utf-8")
  return str(path)


def _read_json(path: epath.Path):
  """The JSON in `path`; None when there is no such file, a ValueError naming it when it is
  not JSON."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# One shard, in a worker process (or in the main one when workers == 1).

@dataclasses.dataclass(frozen=True)
class _ShardJob:
  index: int
  shard: Shard
  kind: str
  data_file: str           # the committed array_record file
  marker: str              # its marker, written after it
  flags: tuple[str, ...]   # DERIVED_FLAGS the build decides from its records


_worker: dict = {}   # per process: the progress queue and stop event (pool) or callback


def _init_worker(progress_queue, stop_event) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
  _worker.update(queue=progress_queue, stop=stop_event)


class _Stopped(Exception):
  """The main process asked the workers to stop (an error elsewhere, or Ctrl-C)."""


class _Orphaned(Exception):
  """The main process is gone (killed): the worker stops without committing its shard."""


def _check_parent() -> None:
  """Raises _Orphaned in a pool worker whose main process has died: a spawned worker is not
  ended with it, and must not commit a shard that a rerun of the build is writing too."""
  if "callback" in _worker:  # the shard runs in the main process itself
    return
  parent = multiprocessing.parent_process()
  if parent is not None and not parent.is_alive():
    raise _Orphaned()


class _Ticker:
  """Counts a shard's records for the progress bar: every half second to the main process."""

  def __init__(self, index: int):
    self.index, self.pending, self.last = index, 0, time.monotonic()

  def tick(self, final: bool = False) -> None:
    self.pending += not final
    if "callback" in _worker:
      _worker["callback"](self.pending)
      self.pending = 0
      return
    if _worker["stop"].is_set():
      raise _Stopped()
    now = time.monotonic()
    if final or now - self.last > 0.5:
      _check_parent()
      if self.pending:
        _worker["queue"].put((self.index, self.pending))
      self.pending, self.last = 0, now


_SERIALIZERS: dict = {}


def _serializer(kind: str) -> Callable[[dict], bytes]:
  if kind not in _SERIALIZERS:
    from tensorflow_datasets.core import example_serializer
    spec = features(kind)
    encoder = example_serializer.ExampleSerializer(spec.get_serialized_info())
    # deterministic: a tf.Example's feature map is otherwise written in an order that differs
    # between processes, and a shard's bytes would depend on the worker that wrote it.
    _SERIALIZERS[kind] = lambda example: encoder.get_tf_example(
        spec.encode_example(example)).SerializeToString(deterministic=True)
  return _SERIALIZERS[kind]


def _build_shard(job: _ShardJob) -> dict:
  """Writes the shard's good records; returns (and commits) its marker: the records written
  ([position in the shard, id, where]), the skipped ones ([position, id, where, reason]), and
  per derived flag the written records that lack its fields."""
  from array_record.python import array_record_module
  serialize, ticker = _serializer(job.kind), _Ticker(job.index)
  if is_remote(job.data_file):  # array_record writes local files: copy it up when whole
    fd, partial = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
  else:  # this attempt's own name (not mkstemp's: the file keeps the umask's permissions), so
    # that a killed build's orphaned worker never writes the file its rerun writes
    partial = f"{job.data_file}.partial.{os.getpid()}-{uuid.uuid4().hex[:8]}"
  writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
  written, skipped, lacking, num_bytes, count = [], [], {f: [] for f in job.flags}, 0, 0
  try:
    for count, (rid, where, fields) in enumerate(job.shard.read(*job.shard.args), 1):
      ticker.tick()
      if isinstance(fields, BadRecord):
        skipped.append([count - 1, rid, where, str(fields)])
        continue
      data = serialize({"id": rid, **fields})
      writer.write(data)
      num_bytes += len(data)
      for flag in job.flags:
        if not all(fields[name] for name in DERIVED_FLAGS[flag]):
          lacking[flag].append(len(written))
      written.append([count - 1, rid, where])
    writer.close()
    _check_parent()
    if is_remote(job.data_file):
      storage.copy_file(partial, job.data_file)
    else:
      os.replace(partial, job.data_file)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  marker = {"records": count, "num_bytes": num_bytes, "written": written, "skipped": skipped,
            "lacking": lacking}
  storage.write_text_atomic(job.marker, json.dumps(marker))
  ticker.tick(final=True)
  return marker


def _pool_shard(job: _ShardJob) -> dict:
  """_build_shard in a pool worker, which exits when its main process has died."""
  try:
    return _build_shard(job)
  except _Orphaned:
    os._exit(1)  # (its partial file is removed): idle, it would wait for jobs forever


# ---------------------------------------------------------------------------------------------
# The build.

# Called in the main process after each shard is committed (tests stop a build with it).
_after_shard: Callable[[int], None] | None = None


def _data_file(target: epath.Path, kind: str, split: str, index: int, count: int) -> str:
  return str(target / f"{DATASET_NAME[kind]}-{split}.array_record-{index:05d}-of-{count:05d}")


def _marker(target: epath.Path, index: int) -> epath.Path:
  return target / STATE_DIR / f"shard-{index:05d}.json"


def _read_marker(target: epath.Path, index: int) -> dict:
  """Shard `index`'s marker; a ValueError naming its file when it is missing or damaged."""
  path = _marker(target, index)
  marker = _read_json(path)
  if not isinstance(marker, dict) or not MARKER_KEYS <= marker.keys():
    raise ValueError(f"{path} is {'missing' if marker is None else 'not a shard marker'}")
  return marker


def _committed_marker(target: epath.Path, index: int) -> dict:
  """The marker of a shard this build committed (or found committed)."""
  try:
    return _read_marker(target, index)
  except ValueError as e:
    raise ValueError(f"{e}: the build's state changed while it ran (another build writing "
                     f"{target}?); run the build again to rebuild that shard") from None


def _plan(kind: str, split: str, metadata: dict, source: ShardedSource) -> dict:
  """What decides a build's records (as JSON reads it back): a rerun with another plan starts
  over."""
  return json.loads(json.dumps({
      "format": PLAN_FORMAT, "kind": kind, "split": split, "metadata": metadata,
      "settings": source.settings, "resumable": source.resumable,
      "shards": [[shard.label, shard.num_bytes] for shard in source.shards]}))


def _refuse_foreign(target: epath.Path) -> None:
  """Raises when `target` holds files but is neither a dataset nor an unfinished build."""
  if (not target.is_dir() or (target / "dataset_info.json").exists()
      or (target / STATE_DIR / "plan.json").exists()):
    return
  leftovers = {p.name for p in target.iterdir()} - {"skipped.jsonl", STATE_DIR}
  if leftovers:
    raise FileExistsError(f"{target} holds {sorted(leftovers)[:5]} but no dataset_info.json; "
                          "it is not a dataset this code built: move it away first")


@contextlib.contextmanager
def _build_lock(target: epath.Path):
  """Held while a build writes `target`, so that a second build of it started beside it is
  refused rather than mixed in: an flock on build_state/lock, released by the kernel however the
  process ends (so not held by a killed build's workers: they stop at their next check that
  their parent is alive, and each shard attempt writes its own .partial file). An object store has no
  locks: for a URL target the lock file is local scratch named after the URL, which keeps out
  the builds of this machine only (the case of a killed build run again)."""
  if is_remote(target):
    digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"uip2p_jax-build-{digest}.lock")
  else:
    path = str(target / STATE_DIR / LOCK)
  while True:
    if not is_remote(target):  # again each try: a build that has just finished removed it
      (target / STATE_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise BlockingIOError(f"another build is writing {target} (pid {holder}); wait for it "
                            "to end, or end it, and run this one again") from None
    try:
      current = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      current = False
    if current:
      break
    os.close(fd)  # a build that has just finished removed the file: lock the one there now
  try:
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    yield
  finally:
    os.close(fd)  # (the file itself goes with build_state when the build is done)


def _prepare_target(target: epath.Path, plan: dict) -> list[int]:
  """Makes `target` ready for `plan`; returns the shards an earlier run of it committed (a
  built dataset there is replaced: `build` has checked `overwrite`)."""
  if target.is_dir() and not (target / "dataset_info.json").exists():
    try:
      earlier = _read_json(target / STATE_DIR / "plan.json")
    except ValueError as e:
      earlier = None
      print(f"{target}: {e}; starting over", file=sys.stderr)
    if earlier == plan and plan["resumable"]:
      done = []
      for i in range(len(plan["shards"])):
        if _marker(target, i).exists():
          try:
            _read_marker(target, i)
            done.append(i)
          except ValueError as e:
            print(f"{e}: building shard {i} again", file=sys.stderr)
            _marker(target, i).unlink(missing_ok=True)
      # A killed build's unfinished files (its orphaned workers' too: they stop uncommitted).
      for stale in target.glob("*.partial*"):
        stale.unlink(missing_ok=True)
      if done:
        print(f"{target}: resuming an unfinished build ({len(done)} of {len(plan['shards'])} "
              "shards done)", file=sys.stderr)
      return done
    if earlier is not None and earlier != plan:
      print(f"{target}: an unfinished build of other inputs or settings is there; starting over",
            file=sys.stderr)
  _clear(target, plan)
  return []


def _clear(target: epath.Path, plan: dict) -> None:
  """Empties `target` (a built dataset: overwrite; an unresumable or other build; a skip list)
  for a build of `plan`, keeping the lock, in an order that leaves a folder a rerun can use
  wherever a kill stops it: the markers, then the new plan (resuming from no shard done), then
  dataset_info.json (until then the finished dataset is still whole), then the rest."""
  def remove(path: epath.Path) -> None:
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink(missing_ok=True)
  state = target / STATE_DIR
  if state.is_dir():
    for path in state.iterdir():
      if path.name not in (LOCK, "plan.json"):
        remove(path)
  state.mkdir(parents=True, exist_ok=True)
  storage.write_text_atomic(state / "plan.json", json.dumps(plan))
  remove(target / "dataset_info.json")
  for path in target.iterdir():
    if path.name != STATE_DIR:
      remove(path)


def build(kind: str, records: Callable[[], Iterator[Record] | ShardedSource], data_dir: str, *,
          split: str | None = None, metadata: dict | None = None, overwrite: bool = False,
          workers: int = 1, progress: bool = False) -> SkipReport:
  """Writes ``records()`` as a TFDS array_record dataset under ``data_dir``; returns the report.

  ``records()`` is called before anything is created or removed, so a missing input file is an
  error that leaves ``data_dir`` as it was. It returns a ``ShardedSource`` (its shards read by
  ``workers`` processes) or any iterator of records (read here, and not resumable). A
  ``metadata`` flag of DERIVED_FLAGS set to None is decided by the records written. Raises
  :class:`NothingWritten` when no record could be written (``skipped.jsonl`` still lists why).
  """
  if kind not in KINDS:
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  target = epath.Path(dataset_dir(data_dir, kind))
  if (target / "dataset_info.json").exists() and not overwrite:
    raise FileExistsError(f"{target} already holds a built dataset; pass overwrite "
                          "(--overwrite) to rebuild it")
  source = records()  # opens the inputs: fails here, before any folder changes
  if not isinstance(source, ShardedSource):
    source = ShardedSource([Shard("records", iter, (source,))], resumable=False)
  split = split or DEFAULT_SPLIT[kind]
  metadata = {"kind": kind, **(metadata or {})}
  data_dir_existed = epath.Path(data_dir).is_dir()
  _refuse_foreign(target)
  with _build_lock(target):
    # Again under the lock: a build that held it until now may have just finished this one.
    if (target / "dataset_info.json").exists() and not overwrite:
      raise FileExistsError(f"{target} already holds a built dataset (a build beside this one "
                            "has just finished it); pass overwrite (--overwrite) to rebuild it")
    return _build_locked(kind, source, data_dir, data_dir_existed, target, split, metadata,
                         workers, progress)


def _build_locked(kind: str, source: ShardedSource, data_dir: str, data_dir_existed: bool,
                  target: epath.Path, split: str, metadata: dict, workers: int,
                  progress: bool) -> SkipReport:
  """`build`, from the target's preparation on, under its lock."""
  done = set(_prepare_target(target, _plan(kind, split, metadata, source)))
  for stale in target.parent.glob("incomplete.*"):  # what a killed TFDS-era build left
    stale.rmtree(missing_ok=True)
  flags = tuple(flag for flag, value in metadata.items()
                if value is None and flag in DERIVED_FLAGS)
  count = len(source.shards)
  jobs = [_ShardJob(i, shard, kind, _data_file(target, kind, split, i, count),
                    str(_marker(target, i)), flags)
          for i, shard in enumerate(source.shards) if i not in done]
  with tempfile.TemporaryDirectory() as scratch:
    prelude = source.prepare(scratch)
    _run_shards(jobs, source, done, target, workers if source.resumable else 1, progress, kind)
    report, derived, lengths, num_bytes = _merge(target, kind, split, source, prelude, flags,
                                                 scratch)
  if not report.written:
    raise _nothing_written(target, kind, report, data_dir, data_dir_existed)
  metadata.update(derived)
  _write_skipped(target, report)
  _write_info(target, kind, split, metadata, lengths, num_bytes)
  (target / STATE_DIR).rmtree(missing_ok=True)
  return report


def _run_shards(jobs: list[_ShardJob], source: ShardedSource, done: set[int],
                target: epath.Path, workers: int, progress: bool, kind: str) -> None:
  """Runs the jobs (in `workers` spawned processes, or here when 1), with a progress bar."""
  from tqdm import tqdm
  sizes = [shard.size for shard in source.shards]
  records_done = {i: _committed_marker(target, i)["records"] for i in done}
  ticked = dict.fromkeys(range(len(sizes)), 0)  # records counted so far, per running shard

  def estimate_total():  # unknown sizes (tar shards): the mean of the finished ones
    known = [records_done.get(i, size) for i, size in enumerate(sizes)]
    measured = [records_done[i] for i, size in enumerate(sizes)
                if size is None and i in records_done]
    if None in known and not measured:
      return None
    mean = sum(measured) / max(1, len(measured))
    return round(sum(mean if n is None else n for n in known))

  bar = tqdm(total=estimate_total(), initial=sum(records_done.values()), unit="rec",
             desc=f"build {kind}", disable=not progress,
             mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.05)

  def shard_done(job: _ShardJob, marker: dict) -> None:
    bar.update(marker["records"] - ticked.pop(job.index))
    records_done[job.index] = marker["records"]
    bar.total = estimate_total()
    if _after_shard is not None:
      _after_shard(job.index)

  def on_tick(index: int, n: int) -> None:
    if index in ticked:  # (a worker's last count can arrive after its shard's result)
      ticked[index] += n
      bar.update(n)

  try:
    if workers == 1 or len(jobs) <= 1:
      for job in jobs:
        _worker["callback"] = lambda n, index=job.index: on_tick(index, n)
        try:
          marker = _build_shard(job)
        finally:
          _worker.pop("callback", None)
        shard_done(job, marker)
    else:
      _run_pool(jobs, workers, on_tick, shard_done)
  finally:
    bar.close()


def _run_pool(jobs: list[_ShardJob], workers: int, on_tick: Callable, shard_done: Callable):
  # spawn: a fork of a process that has JAX (or any threads) loaded is unsafe.
  context = multiprocessing.get_context("spawn")
  progress_queue, stop = context.Queue(), context.Event()

  def drain():
    while True:
      try:
        index, n = progress_queue.get_nowait()
      except queue.Empty:
        return
      on_tick(index, n)
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(jobs)), mp_context=context, initializer=_init_worker,
      initargs=(progress_queue, stop)) as pool:
    futures = {pool.submit(_pool_shard, job): job for job in jobs}
    try:
      pending = set(futures)
      while pending:
        finished, pending = concurrent.futures.wait(
            pending, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
        drain()
        for future in sorted(finished, key=lambda f: futures[f].index):
          shard_done(futures[future], future.result())
    except BaseException:
      stop.set()  # the running shards stop at their next record (their markers stay unwritten)
      for future in futures:
        future.cancel()
      raise
  drain()


def _merge(target: epath.Path, kind: str, split: str, source: ShardedSource, prelude: list,
           flags: tuple[str, ...], scratch: str) -> tuple[SkipReport, dict, list[int], int]:
  """The report in input order, the derived flags, each shard's length and the bytes written.

  Drops the records whose id an earlier record (in input order) was written with, rewriting
  their shard files: within one shard or across shards, as a single pass over the input
  would."""
  report = SkipReport()
  for rid, where, reason in prelude:
    report.add(rid, where, str(reason))
  ids = sqlite3.connect(os.path.join(scratch, "written.sqlite"))  # 12 M ids need not fit in RAM
  ids.execute("CREATE TABLE written (id TEXT PRIMARY KEY, place TEXT)")
  derived = dict.fromkeys(flags, True)
  lengths, num_bytes, count = [], 0, len(source.shards)
  for index in range(count):
    marker = _committed_marker(target, index)
    dropped, events = set(), [tuple(skip) for skip in marker["skipped"]]
    with ids:
      for position, (seq, rid, where) in enumerate(marker["written"]):
        if not ids.execute("INSERT OR IGNORE INTO written VALUES (?, ?)", (rid, where)).rowcount:
          first = ids.execute("SELECT place FROM written WHERE id = ?", (rid,)).fetchone()[0]
          dropped.add(position)
          events.append((seq, rid, where, f"duplicate id (first kept: {first})"))
    for _, rid, where, reason in sorted(events, key=lambda event: event[0]):
      report.add(rid, where, reason)
    for flag in derived:
      if any(position not in dropped for position in marker["lacking"][flag]):
        derived[flag] = False
    data_file = _data_file(target, kind, split, index, count)
    shard_bytes = marker["num_bytes"]
    if dropped:
      shard_bytes = _drop_records(data_file, dropped, len(marker["written"]))
    lengths.append(len(marker["written"]) - len(dropped))
    num_bytes += shard_bytes
  ids.close()
  report.written = sum(lengths)
  if source.unmatched:
    def seen():
      for index in range(count):
        marker = _committed_marker(target, index)
        for entry in marker["written"] + marker["skipped"]:
          if entry[1] is not None:
            yield entry[1]
    for rid, where, reason in source.finish(seen()):
      report.add(rid, where, str(reason))
  return report, derived, lengths, num_bytes


def _drop_records(data_file: str, positions: set[int], written: int) -> int:
  """Rewrites a shard file without the records at `positions`; returns its bytes. Done already
  (a build killed after it) when the file has `written - len(positions)` records."""
  from array_record.python import array_record_module
  with tempfile.TemporaryDirectory() as scratch:
    local = data_file
    if is_remote(data_file):
      local = os.path.join(scratch, "shard")
      storage.copy_file(data_file, local)
    reader = array_record_module.ArrayRecordReader(local)
    records = reader.read_all()
    reader.close()
    if len(records) == written - len(positions):
      return sum(map(len, records))
    if len(records) != written:
      raise ValueError(f"{data_file} holds {len(records)} records; its marker says {written}")
    kept = [record for position, record in enumerate(records) if position not in positions]
    partial = os.path.join(scratch, "kept") if is_remote(data_file) else data_file + ".partial"
    writer = array_record_module.ArrayRecordWriter(partial, "group_size:1")
    for record in kept:
      writer.write(record)
    writer.close()
    if is_remote(data_file):
      storage.copy_file(partial, data_file)
    else:
      os.replace(partial, data_file)
  return sum(map(len, kept))


def _write_info(target: epath.Path, kind: str, split: str, metadata: dict, lengths: list[int],
                num_bytes: int) -> None:
  """dataset_info.json (written last: it marks the dataset finished) and features.json."""
  name = DATASET_NAME[kind]
  identity = tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(VERSION),
                                       data_dir=str(target), module_name=__name__)
  info = tfds.core.DatasetInfo(builder=identity, features=features(kind),
                               metadata=tfds.core.MetadataDict(metadata),
                               description=f"uip2p_jax {kind} records")
  template = tfds.core.ShardedFileTemplate(data_dir=target, dataset_name=name, split=split,
                                           filetype_suffix="array_record")
  info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name=split, shard_lengths=lengths, num_bytes=num_bytes, filename_template=template)]))
  info.set_file_format("array_record")
  info.write_to_directory(target)


def _nothing_written(target: epath.Path, kind: str, report: SkipReport, data_dir: str,
                     data_dir_existed: bool) -> NothingWritten:
  """The error of a build that wrote nothing, its folder left with the skip list alone."""
  target.rmtree(missing_ok=True)
  if not report.num_skipped:
    for folder in [target.parent] + ([] if data_dir_existed else [epath.Path(data_dir)]):
      try:  # leave no empty folders behind for an empty source
        folder.rmdir()
      except OSError:
        pass
    return NothingWritten(f"no {kind} records to write: the source is empty", report)
  skipped_file = _write_skipped(target, report)
  first = "; ".join(describe_skip(skip) for skip in report.skipped[:3])
  return NothingWritten(
      f"all {report.num_skipped} {kind} records were skipped, nothing written; first: {first}"
      f" (full list: {skipped_file})", report)


def open_split(data_dir: str, kind: str, split: str | None = None):
  """(array_record data source with images left encoded, DatasetInfo) of a built dataset.

  ``data_dir`` is what was passed to ``build`` (or the dataset's version folder itself).
  """
  path = data_dir
  if not (epath.Path(path) / "dataset_info.json").is_file():
    path = dataset_dir(data_dir, kind)
  if not (epath.Path(path) / "dataset_info.json").is_file():
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
