"""Checkpoints (orbax) and preemption.

A checkpoint holds the train state and every process's data-iterator position, so a resumed
run continues exactly. Retention: the last `checkpoint.keep` plus the best by training loss
(the loss is stored in each checkpoint's metadata, so a resumed run still knows which is best).
A latest checkpoint that cannot be read (truncated array file, garbled metadata or iterator
state) is named in a warning, set aside as `STEP.unreadable-N` (renamed, never deleted) and the
run resumes from the checkpoint before it; `checkpoint.strict_resume=true` refuses instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import jax
import numpy as np

from uip2p_jax import storage

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGINT; run again to resume


class ResumeError(RuntimeError):
  """A checkpoint this run must not resume from: damaged (with checkpoint.strict_resume) or
  saved by a run with another train state."""


class _LoaderSnapshot:
  """A loader's state frozen at save time (orbax may write it after the loader moved on)."""

  def __init__(self, state: str = ""):
    self.state = state

  def get_state(self) -> bytes:
    return self.state.encode()

  def set_state(self, state: bytes) -> None:
    self.state = state.decode()

  def start_prefetch(self) -> None:  # grain's restore hook; nothing to start here
    pass


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _quiet_closed_event_loops() -> None:
  """A failed restore leaves tensorstore callbacks aimed at orbax's closed asyncio loop; each
  would print a 'RuntimeError: Event loop is closed' traceback (over a hundred for one
  truncated file) that hides the one-line warning. Drop exactly those; pass the rest on."""
  previous = sys.unraisablehook
  if getattr(previous, "_uip2p_quiet", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)
  hook._uip2p_quiet = True
  sys.unraisablehook = hook


def _save_arrays_from_one_replica(ocp) -> None:
  """Off TPU, each array is written from one replica's shards, not cut into a slice per replica.

  orbax's replica-parallel saving (its default unless JAX_PLATFORMS names a GPU) slices every
  replicated shard with one eager op per slice: on CPU and GPU that is a dispatch per array and
  device at every save, and a compile per distinct slice the first time (the test trainer's
  (data 2, fsdp 2) state: ~3300 slices, ~8 s of every save). It is the choice orbax makes
  itself for GPUs when JAX_PLATFORMS names one. The checkpoint's format is the same either way."""
  use_replica_parallel = jax.default_backend() == "tpu"
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, "_use_replica_parallel", None) == use_replica_parallel:
    return
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns of every override it is asked for
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=use_replica_parallel),
        override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


def state_signature(abstract_state) -> str:
  """A hash of the state's tree paths, shapes and dtypes: which model and optimizer it holds."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  text = ";".join(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}"
                  for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a damaged per-process file fails on one only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpoints:
  """The run's checkpoint folder: save, restore the latest readable step, retention.

  Each save records the training loss (retention keeps the best), the state's signature (its
  leaves), its tree structure and what the UNet outputs (`prediction_type`: an epsilon and a
  v-prediction UNet have the same arrays, so the signature cannot tell them apart); a checkpoint
  that differs from this run in any of them is refused, never set aside: the config changed,
  the checkpoint is fine.
  """

  def __init__(self, directory: str, config, abstract_state, prediction_type: str | None = None):
    self.directory = storage.absolute(directory)  # orbax takes gs:// itself
    self._config = config.checkpoint
    self._abstract_state = abstract_state
    self.signature = state_signature(abstract_state)
    # The signature hashes leaves only: an optimizer wrapped in another empty state (same
    # arrays, another tree) passes it and then fails orbax's restore, which must not read as
    # damage (the checkpoint would be set aside and the run start over).
    self.tree = hashlib.sha256(str(jax.tree.structure(abstract_state)).encode()).hexdigest()[:16]
    self.prediction_type = prediction_type
    # orbax reads every checkpoint's metrics when it opens the folder: a garbled one would
    # stop the run before any restore is tried.
    for step, _ in self._unreadable_metrics():
      self._damaged(step, "its metrics file is not JSON", reopen=False)
    self._manager = self._open()

  def _open(self):
    import orbax.checkpoint as ocp
    _save_arrays_from_one_replica(ocp)
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    loss = lambda metrics: metrics["loss"]
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=self._config.keep),
        pp.BestN(get_metric_fn=loss, reverse=True, n=1)])
    # best_fn makes orbax write each save's metrics into the checkpoint (without it a resumed
    # run sees checkpoints without metrics and BestN keeps every one of them).
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=self._config.every, preservation_policy=policy, best_fn=loss,
        best_mode="min", enable_async_checkpointing=self._config.use_async,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def _metrics_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step), "metrics", "metrics")

  def _unreadable_metrics(self):
    """(step, path) of checkpoints whose metrics file exists but does not parse."""
    if not storage.isdir(self.directory):
      return []
    found = []
    for name in sorted(storage.listdir(self.directory)):
      path = self._metrics_path(name)
      if name.isdigit() and storage.isfile(path):
        try:
          json.loads(storage.read_text(path))
        except (ValueError, OSError):
          found.append((int(name), path))
    return found

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, loader, loss: float, force: bool = False) -> bool:
    import grain
    import orbax.checkpoint as ocp
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_LoaderSnapshot(loader.get_state()))),
        metrics=self._record(loss), force=force)

  def _record(self, loss: float) -> dict:
    record = {"loss": float(loss), "state_signature": self.signature, "state_tree": self.tree}
    if self.prediction_type is not None:
      record["prediction_type"] = self.prediction_type
    return record

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def _check_signature(self, step: int) -> None:
    record = json.loads(storage.read_text(self._metrics_path(step)))
    saved = record.get("state_signature")
    if saved is not None and saved != self.signature:
      raise ResumeError(
          f"checkpoint {self.directory}/{step} holds another train state (signature {saved}, "
          f"this run's is {self.signature}): the model, optimizer or their dtypes changed "
          "since it was saved. Use a new --workdir, or the config that wrote it")
    saved = record.get("state_tree")
    if saved is not None and saved != self.tree:
      raise ResumeError(
          f"checkpoint {self.directory}/{step} holds the same arrays in another tree (structure "
          f"{saved}, this run's is {self.tree}): the optimizer's composition changed since it "
          "was saved. Use a new --workdir, or the config that wrote it")
    # Checkpoints from before the fields were recorded carry none: nothing to compare.
    saved = record.get("prediction_type")
    if saved is not None and self.prediction_type is not None and saved != self.prediction_type:
      raise ResumeError(
          f"checkpoint {self.directory}/{step} holds a UNet trained to predict {saved!r}, this "
          f"run's predicts {self.prediction_type!r} (config.model.prediction_type): resuming "
          "would switch its output silently. Use a new --workdir, or the config that wrote it")

  def _restore(self, step: int, loader):
    import grain
    import orbax.checkpoint as ocp
    snapshot = _LoaderSnapshot()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._abstract_state),
        data=grain.checkpoint.CheckpointRestore(snapshot)))
    loader.set_state(snapshot.state)
    return restored["state"]

  def restore_latest(self, loader):
    """(state, step) of the latest readable checkpoint, or (None, None) when there is none.
    A checkpoint whose data stream is not this config's (the loader's DataError: another
    config.sample.count or dataset) stops the run: it is not damaged, and is kept."""
    from uip2p_jax.data.loader import DataError
    for step in reversed(self.steps()):
      if storage.isfile(self._metrics_path(step)):
        self._check_signature(step)
      state, reason = None, ""
      try:
        state = self._restore(step, loader)
      except DataError as e:
        raise DataError(f"checkpoint {os.path.join(self.directory, str(step))}: {e}") from None
      except Exception as e:  # orbax/tensorstore/json raise many kinds for a damaged file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if "tree structures do not match" in str(e):  # readable, and another state: refuse
          raise ResumeError(
              f"checkpoint {os.path.join(self.directory, str(step))} holds another train state "
              f"({reason}): the model or optimizer changed since it was saved. Use a new "
              "--workdir, or the config that wrote it") from None
      if _all_processes(state is not None):
        return state, step
      self._damaged(step, reason or "another process could not read its part")
    return None, None

  def _damaged(self, step: int, reason: str, reopen: bool = True) -> None:
    """Refuses (strict_resume) or sets the checkpoint aside as STEP.unreadable-N."""
    where = os.path.join(self.directory, str(step))
    if self._config.strict_resume:
      raise ResumeError(
          f"checkpoint {where} cannot be restored ({reason}); checkpoint.strict_resume is "
          "set, so the run stops (unset it to resume from the previous checkpoint)")
    _quiet_closed_event_loops()
    n = 0
    while storage.exists(f"{where}.unreadable-{n}"):
      n += 1
    target = f"{where}.unreadable-{n}"
    if jax.process_index() == 0:
      storage.rename(where, target)
    _sync(f"set aside checkpoint {step}")
    print(f"train: warning: checkpoint {where} cannot be restored ({reason}); moved it to "
          f"{target} and trying the one before", file=sys.stderr, flush=True)
    if reopen:
      self._manager.close()
      self._manager = self._open()  # forget the step it had listed

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class Preemption:
  """SIGTERM (TPU maintenance or preemption, SLURM's time limit) and the first Ctrl-C (SIGINT)
  become a flag: the loop finishes its step, saves and exits with EXIT_PREEMPTED. A second
  Ctrl-C interrupts at once.

  With several processes SIGTERM is left to JAX: `jax.distributed` installs its own handler and
  the preemption sync service agrees on one step for every host (`Checkpoints.
  reached_preemption`); a per-process flag would let hosts that saw the signal at different
  steps split between the collective save and the next step, and hang. Ctrl-C is single-process
  only for the same reason."""

  def __init__(self):
    self.requested = False
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    self.requested = True
    if signum == signal.SIGINT:
      print("\ntrain: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
            file=sys.stderr, flush=True)
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
