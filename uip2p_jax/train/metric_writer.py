"""Training metrics: metrics.jsonl, TensorBoard scalars and images, and the console line.

Only process 0 writes. A resumed run first drops what an interrupted run logged after the
restored step (metrics.jsonl rows are rewritten; TensorBoard is told to purge those steps), so
each step appears once. A workdir in a bucket (gs://) is written through etils.epath, TensorBoard
events included (`_BucketEventFiles`).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

from uip2p_jax import storage


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch whenever
  it is installed, only to recognise torch tensors (never logged here): 2.6-4.4 s of every
  `uip2p train` start on a 2-core CPU, against 0.3 s without. Done when this module is imported,
  before any loader thread exists: while `sys.modules["torch"]` is None, `import torch` fails
  in every thread of the process."""
  if "torch" in sys.modules:  # already paid for (the tests' reference models)
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


SummaryWriter = _import_summary_writer()


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps the rows of `path` with step <= last_step (atomically); returns how many it dropped."""
  if not storage.isfile(path):
    return 0
  kept, dropped = [], 0
  with storage.open_file(path) as f:
    for line in f:
      try:
        step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):  # a line cut off by a kill
        dropped += 1
        continue
      if step <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    storage.write_text_atomic(path, "".join(kept))
  return dropped


class _BucketEventFile:
  """A TensorBoard event file in a bucket. An object cannot be appended to: each flush (every
  flush_secs, and at close) rewrites the current part, `<event file>`, with everything written
  to it so far; once a part holds PART_BYTES the next flush starts `<event file>.00001`, ...
  TensorBoard reads every file whose name holds "tfevents", in name order, so the parts read as
  the one file. Uploads stay linear in the run's length (rewriting the whole file at each flush,
  as tensorboardX's own gs:// writer does, is quadratic: gigabytes over a months-long run), and
  the objects stay few (one per flush would be thousands over a week)."""

  PART_BYTES = 32 << 20

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()  # the current part, whole
    self.uploaded = 0  # of it
    self.parts = 0  # finished parts before it

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    data = self.buffer.getvalue()
    if len(data) == self.uploaded:
      return
    storage.write_bytes(self.path if self.parts == 0 else f"{self.path}.{self.parts:05d}", data)
    self.uploaded = len(data)
    if len(data) >= self.PART_BYTES:
      self.parts += 1
      self.buffer, self.uploaded = io.BytesIO(), 0

  def close(self) -> None:
    self.flush()


class _BucketEventFiles:
  """tensorboardX's writer factory (record_writer.register_writer_factory) for one URL scheme."""

  def open(self, path: str) -> _BucketEventFile:
    return _BucketEventFile(path)

  def directory_check(self, path: str) -> None:
    storage.makedirs(path)


class MetricWriter:
  """Writes a run's metrics from `start_step` on (0 for a new run).

  In a bucket, metrics.jsonl (rewritten whole to add lines: an object cannot be appended to) is
  written at most every `flush_secs`, at each `flush()` (the loop calls it before each checkpoint
  save, so no line up to a checkpoint's step can be lost) and at close."""

  def __init__(self, workdir: str, start_step: int, enabled: bool = True,
               flush_secs: float = 120.0):
    self.enabled = enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    self._buffered = storage.is_remote(workdir)
    self._pending: list[str] = []
    self._flush_secs = flush_secs
    self._last_flush = time.monotonic()
    if enabled:
      if storage.is_remote(workdir):
        from tensorboardX import record_writer
        record_writer.register_writer_factory(workdir.split("://")[0], _BucketEventFiles())
      truncate_jsonl(self.jsonl, start_step)
      # purge_step: TensorBoard discards events at or after it (written by an interrupted run).
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                        purge_step=start_step + 1, flush_secs=flush_secs)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"train/{name}", value, step)
    self._pending.append(json.dumps({"step": step, **metrics}) + "\n")
    if not self._buffered or time.monotonic() - self._last_flush >= self._flush_secs:
      self._write_pending()
    mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    print(f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e}"
          f" | grad {metrics['grad_norm']:.3f} | {metrics['images_per_second']:.1f} img/s"
          f" | {metrics['step_time'] * 1000:.0f} ms/step{mfu}"
          f" | skipped {int(metrics['skipped_updates'])}", flush=True)

  def _write_pending(self) -> None:
    if self._pending:
      storage.append_text(self.jsonl, "".join(self._pending))
      self._pending = []
    self._last_flush = time.monotonic()

  def flush(self) -> None:
    """Writes every logged line now, and flushes TensorBoard's writer (events still queued in
    tensorboardX's logger thread may wait for its next flush)."""
    if self.enabled:
      self._write_pending()
      self._tensorboard.flush()

  def image(self, name: str, image, step: int) -> None:
    """An (H, W, 3) uint8 image."""
    if self.enabled:
      self._tensorboard.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._write_pending()
    if self._tensorboard is not None:
      self._tensorboard.close()
