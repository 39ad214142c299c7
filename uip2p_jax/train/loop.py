"""The training loop: data -> jitted step -> metrics, samples, checkpoints; then export.

  uip2p train --config experiments/FILE.py[:ARGS] --workdir DIR [--config.key=value ...]

Exit status: 0 finished; 75 (EXIT_PREEMPTED) stopped by SIGTERM or Ctrl-C after saving a
checkpoint (run the same command to resume); 2 a config, data or checkpoint error (one line).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from uip2p_jax import sharding as shd, storage
from uip2p_jax.train import config as run_config
from uip2p_jax.train.checkpoint import EXIT_PREEMPTED, Checkpoints, Preemption, ResumeError
from uip2p_jax.train.metric_writer import MetricWriter
from uip2p_jax.train.samples import (VAE_SCALE_IMAGES, RunContext, export, final_edit,
                                     write_samples)
from uip2p_jax.train.step import (StepFunctions, check_batch_size, flops_of, lower_step,
                                  model_flops, run_batch_fields, split_models)

# Dense bfloat16 peak FLOP/s per device, for the MFU estimate (None: unknown, MFU not shown).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "B200": 2250e12}


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


@dataclasses.dataclass
class TrainResult:
  metrics: dict[str, float]   # the last logged metrics
  preempted: bool             # stopped by SIGTERM / Ctrl-C after saving a checkpoint


@dataclasses.dataclass
class CompiledStep:
  functions: StepFunctions
  step: object                     # the compiled executable
  hardware_flops: float            # per device per step, XLA's count of the optimised program
  model_flops: float               # per device per step, what the method needs (no remat recompute)


_COMPILED: dict[tuple, CompiledStep] = {}

# Steps dispatched and not yet finished. JAX returns from a step call before the step runs, so
# an unbounded loop runs ahead of the devices by every batch the loader has ready: measured,
# 30 steps on the smoke run and ~50 (10 minutes) on a 12 s ShapesWorld step with logging every
# 50 steps. A SIGTERM then waits for that whole backlog before its save, past SLURM's or a TPU
# maintenance event's grace period. Two in flight keep the device fed (one running, one queued).
MAX_STEPS_IN_FLIGHT = 2


class StepWindow:
  """Bounds the steps in flight: `dispatched(loss)` after each step call blocks until the step
  MAX_STEPS_IN_FLIGHT calls back has finished."""

  def __init__(self):
    self._pending = collections.deque()
    self._depth = MAX_STEPS_IN_FLIGHT  # read here: a benchmark may set the module's value

  def dispatched(self, loss) -> None:
    self._pending.append(loss)
    while len(self._pending) > self._depth:
      self._pending.popleft().block_until_ready()


def _compiled_step(config, graphs, params, frozen, schedule, tokenizer, mesh):
  """The run's step functions and compiled step; a later run of the same config in this process
  (a resumed run, a notebook) reuses them instead of compiling again."""
  # Only what the compiled step depends on (not checkpointing, logging, samples or export).
  step_config = {name: config[name] for name in ("objective", "batch_size", "ema_decay",
                                                  "ema_dtype", "model", "cycle", "loss", "ip2p",
                                                  "pretrain", "optim", "lora")}
  key = (ml_collections.ConfigDict(step_config).to_json_best_effort(sort_keys=True),
         config.data.resolution, config.data.get("cache_latents", False), mesh.shape_tuple,
         tuple(d.id for d in mesh.devices.flat))
  if key not in _COMPILED:
    _COMPILED.clear()  # keep one: compiled SD-size steps are large
    functions, lowered = lower_step(config, graphs, params, frozen, schedule, tokenizer, mesh,
                                    config.batch_size)
    compiled = lowered.compile()
    _COMPILED[key] = CompiledStep(functions, compiled, flops_of(compiled.cost_analysis()),
                                  model_flops(config, lowered, graphs, params, frozen, schedule,
                                              tokenizer, mesh))
  return _COMPILED[key]


def _resolve_data_dir(config, workdir: str) -> str:
  """run_config.run_data_dir(config, workdir), building the bundled sample photos there for
  "sample"."""
  from uip2p_jax.data import builders
  out = run_config.run_data_dir(config, workdir)
  if config.data.kind == "world" or config.data.dir != "sample":
    return out
  if not storage.isfile(os.path.join(builders.dataset_dir(out, "captions"), "dataset_info.json")):
    if jax.process_index() == 0:
      builders.build_sample(out)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("sample data")
  return out


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
  """Runs (or resumes) the experiment `config` in `workdir`."""
  from uip2p_jax.data.loader import Loader
  from uip2p_jax.model_set import build_models
  from uip2p_jax.data.loader import DataError
  run_config.check(config)
  shd.maybe_initialize_distributed()
  global_batch = config.batch_size
  try:
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    check_batch_size(global_batch, mesh.shape["data"] * mesh.shape["fsdp"],
                     config.optim.accumulate, jax.process_count())
  except ValueError as e:
    raise run_config.ConfigError(f"config.mesh / config.batch_size: {e}") from None
  profile = Profile(config.profile_steps, os.path.join(workdir, "profile"))
  # The data first: a missing or wrong dataset fails in seconds, not after the compile (and
  # before the workdir exists, unless the bundled sample is to be built into it).
  try:
    loader = Loader(run_config.loader_config(config, _resolve_data_dir(config, workdir),
                                             jax.process_count()))
  except (ValueError, FileNotFoundError) as e:
    raise DataError(f"config.data.dir={config.data.dir!r}: {e}") from None
  storage.makedirs(workdir)
  checkpoints = preemption = writer = None
  try:
    models = build_models(**run_config.model_kwargs(config))
    graphs, params, frozen = split_models(models, config.objective)
    tokenizer, schedule = models.tokenizer, models.schedule
    del models  # the arrays live on in params/frozen only
    cache = None
    if config.data.get("cache_latents", False):
      from uip2p_jax.train import latent_cache
      try:
        cache = latent_cache.build(loader.config, config.objective, graphs["vae"],
                                   frozen["vae"], os.path.join(workdir, "latent_cache"))
      except ValueError as e:
        raise DataError(f"config.data.dir={config.data.dir!r}: {e}") from None
    compiled = _compiled_step(config, graphs, params, frozen, schedule, tokenizer, mesh)
    functions = compiled.functions
    frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
    run = RunContext(config, workdir, graphs, frozen, tokenizer, schedule, mesh)

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), config,
                              functions.abstract_state, schedule.prediction_type)
    state, restored = checkpoints.restore_latest(loader)
    if state is None:
      state = functions.init_state(params, config.seed)
    else:
      print(f"train: resumed from {checkpoints.directory} step {restored}", flush=True)
    del params
    step = int(jax.device_get(state.step))

    peak = peak_flops(jax.devices()[0])
    is_writer = jax.process_index() == 0
    writer = MetricWriter(workdir, step, enabled=is_writer)
    if is_writer:
      storage.write_text_atomic(os.path.join(workdir, "config.json"),
                                config.to_json_best_effort(indent=2))
      _record_provenance(workdir, step)
    print(f"train: {config.objective} on {jax.device_count()} devices, mesh "
          f"{dict(mesh.shape)}, global batch {global_batch}, steps {step} -> "
          f"{config.total_steps}; per device and step {compiled.model_flops / 1e9:.1f} GFLOP "
          f"(model), {compiled.hardware_flops / 1e9:.1f} GFLOP (compiled, with recomputation)",
          flush=True)
    preemption = Preemption()
    # Samples and the final edit: the held-out records, the same after every resume.
    wants_samples = (config.sample.every and step < config.total_steps) or config.final_edit
    sample_batch = (_sample_batch(loader.config)
                    if wants_samples and run_config.sample_holdout(config) else None)
    last_metrics: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    in_flight = StepWindow()
    while step < config.total_steps:
      host_batch = next(loader)
      if cache is not None:
        host_batch = cache.replace_images(host_batch)
      batch = shd.global_batch(host_batch, functions.batch_sharding, run_batch_fields(config))
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled.step(state, frozen, batch)
      in_flight.dispatched(metrics["loss"])
      step += 1
      profile.after(step, state)
      window_steps += 1
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step_time = (time.perf_counter() - window_start) / window_steps
        metrics.update(step_time=step_time, images_per_second=global_batch / step_time,
                       skipped_records=float(loader.skipped_records))
        # MFU counts the FLOPs the method needs; recomputation is hardware work, logged apart.
        metrics["hardware_flops_per_second"] = compiled.hardware_flops / step_time
        if peak and compiled.model_flops:
          metrics["mfu"] = compiled.model_flops / step_time / peak
        last_metrics = metrics
        writer.scalars(step, metrics)
        window_start, window_steps = time.perf_counter(), 0
      if (config.sample.every and sample_batch is not None
          and (step % config.sample.every == 0 or step == config.total_steps)):
        write_samples(run, state, sample_batch, step, writer)
      preempted = preemption.requested or checkpoints.reached_preemption(step)
      if preempted or step % config.checkpoint.every == 0 or step == config.total_steps:
        # The save records this step's loss (for "best"), logged or not.
        loss = float(jax.device_get(metrics["loss"]))
        # Lines first: an async save can be complete before a later flush (lines past a
        # checkpoint are dropped on resume, lines up to it are never written again).
        writer.flush()
        checkpoints.save(step, state, loader, loss, force=preempted or step == config.total_steps)
      if config.export_every and step % config.export_every == 0 and step < config.total_steps:
        # A snapshot to evaluate while the run goes on (the final one is workdir/export).
        export(run, state, lambda: _first_images(config, workdir, VAE_SCALE_IMAGES),
               out=os.path.join(workdir, "exports", f"step_{step}"))
      if preempted:
        checkpoints.wait_until_finished()
        print(f"train: interrupted: saved step {step}; run the same command to resume "
              f"(exit status {EXIT_PREEMPTED})", flush=True)
        return TrainResult(last_metrics, preempted=True)
    checkpoints.wait_until_finished()
    if config.export:
      export(run, state, lambda: _first_images(config, workdir, VAE_SCALE_IMAGES))
    if config.final_edit and config.objective in ("cec", "ip2p"):  # (check: sample.count >= 1)
      final_edit(run, state, sample_batch)
    return TrainResult(last_metrics, preempted=False)
  finally:
    profile.stop()
    if preemption is not None:
      preemption.restore()
    if checkpoints is not None:
      checkpoints.close()
    loader.close()
    if writer is not None:
      writer.close()


class Profile:
  """`config.profile_steps = "START,COUNT"`: a jax.profiler trace of steps START..START+COUNT-1
  in workdir/profile (TensorBoard's profile tab); "" traces nothing."""

  def __init__(self, spec: str, directory: str):
    self.start, self.stop_at = run_config.profile_range(spec) or (None, None)
    self.directory = directory
    self.active = False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.stop_at:
      jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      print(f"train: profile of steps {self.start}-{self.stop_at - 1} in {self.directory}",
            flush=True)


def _record_provenance(workdir: str, step: int) -> None:
  """Appends to workdir/provenance.jsonl what started (or resumed) the run: when, at which step,
  the command line and the source commit (what shipped models record beside them)."""
  import json
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", root, "status", "--porcelain", "--",
                                 "uip2p_jax", "experiments"], capture_output=True, text=True,
                                timeout=10).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    commit, dirty = "", False
  storage.append_text(os.path.join(workdir, "provenance.jsonl"), json.dumps(
      {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "argv": sys.argv,
       "commit": commit or None, "uncommitted_changes": dirty}) + "\n")


def _first_images(config, workdir: str, count: int) -> list[np.ndarray]:
  """The first `count` images (in batches) of a fresh loader of the run's data: a fixed set."""
  from uip2p_jax.data.loader import Loader
  loader = Loader(dataclasses.replace(
      run_config.loader_config(config, _resolve_data_dir(config, workdir)), num_workers=0))
  try:
    batches, seen = [], 0
    while seen < count:
      batches.append(next(loader)["image"])
      seen += len(batches[-1])
    return batches
  finally:
    loader.close()


def _sample_batch(loader_config) -> dict:
  """The held-out examples (`loader.heldout_batch`), identical on every process."""
  from uip2p_jax.data.loader import heldout_batch
  batch = heldout_batch(loader_config)
  ids = [i.decode() for i in batch.pop("id")]
  if jax.process_index() == 0:
    print(f"train: samples from {len(ids)} held-out records: {', '.join(ids)}", flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    batch = multihost_utils.broadcast_one_to_all(batch)
  batch["id"] = np.asarray(ids)  # host only (not broadcast: strings)
  return batch


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default
  ~/.cache/uip2p_jax/jax): a restarted or resumed run skips most of its compile time."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uip2p_jax", "jax")
  jax.config.update("jax_compilation_cache_dir", directory)


def main(argv: list[str] | None = None) -> int:
  """`uip2p train --config FILE.py[:ARGS] --workdir DIR [--config.key=value ...]`."""
  from absl import logging

  from uip2p_jax import weights
  from uip2p_jax.data.loader import DataError
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] in (["-h"], ["--help"]):
    print(run_config.USAGE + "\n\n" + __doc__)
    return 0
  try:
    command = run_config.parse_command_line(argv)
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    enable_compilation_cache()
    result = train(command.config, command.workdir)
  except (run_config.ConfigError, ResumeError, DataError, FileNotFoundError,
          weights.CheckpointError) as e:
    print(f"uip2p train: error: {e}", file=sys.stderr)
    return 2
  return EXIT_PREEMPTED if result.preempted else 0
