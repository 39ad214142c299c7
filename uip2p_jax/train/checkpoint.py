"""Checkpoints (orbax) and preemption.

A checkpoint holds the train state and every process's data-iterator position, so a resumed
run continues exactly. Retention: the last `checkpoint.keep` plus the best by training loss
(the loss is stored in each checkpoint's metadata, so a resumed run still knows which is best).
A latest checkpoint that cannot be read (truncated array file, garbled metadata or iterator
state) is named in a warning, set aside as `STEP.unreadable-N` (renamed, never deleted) and the
run resumes from the checkpoint before it; `checkpoint.strict_resume=true` refuses instead.
"""

from __future__ import annotations

import os
import signal
import sys

import jax

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGINT; run again to resume


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored (with checkpoint.strict_resume)."""


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


class Checkpoints:
  """The run's checkpoint folder: save, restore the latest readable step, retention."""

  def __init__(self, directory: str, config):
    self.directory = os.path.abspath(directory)
    self._config = config.checkpoint
    self._manager = self._open()

  def _open(self):
    import orbax.checkpoint as ocp
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

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, loader, loss: float, force: bool = False) -> bool:
    import grain
    import orbax.checkpoint as ocp
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(_LoaderSnapshot(loader.get_state()))),
        metrics={"loss": float(loss)}, force=force)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def _restore(self, step: int, abstract_state, loader):
    import grain
    import orbax.checkpoint as ocp
    snapshot = _LoaderSnapshot()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(snapshot)))
    loader.set_state(snapshot.state)
    return restored["state"]

  def restore_latest(self, abstract_state, loader):
    """(state, step) of the latest readable checkpoint, or (None, None) when there is none."""
    for step in reversed(self.steps()):
      try:
        return self._restore(step, abstract_state, loader), step
      except Exception as e:  # orbax/tensorstore/json raise many kinds for a damaged file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        where = os.path.join(self.directory, str(step))
        if self._config.strict_resume:
          raise CheckpointError(
              f"checkpoint {where} cannot be restored ({reason}); checkpoint.strict_resume is "
              "set, so the run stops (unset it to resume from the previous checkpoint)") from e
        _quiet_closed_event_loops()
        aside = self._set_aside(step)
        print(f"train: warning: checkpoint {where} cannot be restored ({reason}); moved it to "
              f"{aside} and trying the one before", file=sys.stderr, flush=True)
    return None, None

  def _set_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    n = 0
    while os.path.exists(f"{source}.unreadable-{n}"):
      n += 1
    target = f"{source}.unreadable-{n}"
    if jax.process_index() == 0:
      os.rename(source, target)
    _sync(f"set aside checkpoint {step}")
    self._manager.close()
    self._manager = self._open()  # forget the step it had listed
    return target

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class Preemption:
  """SIGTERM (TPU maintenance or preemption, SLURM's time limit) and the first Ctrl-C (SIGINT)
  become a flag: the loop finishes its step, saves and exits with EXIT_PREEMPTED. A second
  Ctrl-C interrupts at once."""

  def __init__(self):
    self.requested = False
    self._previous = {sig: signal.signal(sig, self._handle)
                      for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.requested = True
    if signum == signal.SIGINT:
      print("\ntrain: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)",
            file=sys.stderr, flush=True)
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
