"""Training: the train state, the sharded jitted step, and the loop with checkpoints and logs.

  python -m uip2p_jax.train --config experiments/FILE.py:ARGS --workdir DIR [--config.key=value]
  uip2p train ...   (the same)

The step is one `jax.jit` over a (data, fsdp) mesh: UNet parameters, EMA and optimizer state are
sharded FSDP-style by `uip2p_jax.sharding`'s rules, the batch over both axes; frozen models are
held in `model.frozen_dtype` (bfloat16) and get no optimizer state. A non-finite loss or gradient
skips the update (counted). Checkpoints (orbax, async) hold the state and every process's data
iterator, so a resumed run continues exactly; SIGTERM (TPU preemption) saves before exiting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from uip2p_jax import sharding as shd
from uip2p_jax.cycle import CycleConfig, LossConfig, cycle_losses, ip2p_losses
from uip2p_jax.models import AutoencoderKL, CLIPModel, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.models.partitioning import set_remat
from uip2p_jax.schedules import NoiseSchedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Dense bfloat16 peak FLOP/s per device, for the MFU estimate (None: unknown, MFU not shown).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12,
              "A100": 312e12, "B200": 2250e12}


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


# ---------------------------------------------------------------------------------------------
# Models

@dataclasses.dataclass
class Models:
  """The modules of a run: the trainable UNet (float32 master weights, `compute_dtype`
  compute) and the frozen VAE, text encoder and loss CLIP (`frozen_dtype`)."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  clip: CLIPModel | None  # None for the supervised baseline
  tokenizer: Any
  schedule: NoiseSchedule


def build_models(model_config, objective: str, abstract: bool = False) -> Models:
  """Loads (or, for `model.preset` runs, randomly initialises) every model of a run.

  abstract=True builds shapes only (no weights read), for planning.
  """
  from uip2p_jax import weights
  from uip2p_jax.models.random_init import random_init
  from uip2p_jax.models.presets import preset
  from uip2p_jax.tokenizer import default_tokenizer, load_tokenizer

  compute = DTYPES[model_config.compute_dtype]
  frozen = DTYPES[model_config.frozen_dtype]
  backend = model_config.attention_backend
  rngs = lambda: nnx.Rngs(0)
  pretrained = model_config.pretrained or model_config.init_from_sd
  if abstract or not pretrained:
    shapes = preset(model_config.preset)
    make = (lambda factory, seed: nnx.eval_shape(factory)) if abstract else random_init
    unet = make(lambda: UNet2DConditionModel(shapes.unet, rngs=rngs(), dtype=compute,
                                             backend=backend), model_config.seed)
    vae = make(lambda: AutoencoderKL(shapes.vae, rngs=rngs(), dtype=frozen, param_dtype=frozen),
               model_config.seed + 1)
    text_encoder = make(lambda: CLIPTextTransformer(shapes.text_encoder, rngs=rngs(),
                                                    dtype=frozen, param_dtype=frozen),
                        model_config.seed + 2)
    clip = None if objective != "cec" else make(
        lambda: CLIPModel(shapes.clip, rngs=rngs(), dtype=frozen, param_dtype=frozen),
        model_config.seed + 3)
    tokenizer, schedule = default_tokenizer(), NoiseSchedule()
  else:
    if model_config.init_from_sd:  # InstructPix2Pix's own initialisation from SD 1.x
      unet = weights.init_ip2p_from_sd(weights.load_unet(
          pretrained, dtype=compute, param_dtype=jnp.float32, backend=backend))
    else:
      unet = weights.load_unet(pretrained, dtype=compute, param_dtype=jnp.float32,
                               backend=backend)
    vae = weights.load_vae(pretrained, dtype=frozen, param_dtype=frozen)
    text_encoder = weights.load_text_encoder(pretrained, dtype=frozen, param_dtype=frozen)
    tokenizer = load_tokenizer(pretrained)
    schedule = NoiseSchedule.from_folder(weights.resolve_folder(pretrained, "scheduler"))
    clip = None
    if objective == "cec":
      if not model_config.clip:
        raise ValueError("model.clip must name the CLIP checkpoint the CEC losses use (e.g. "
                         "openai/clip-vit-large-patch14)")
      clip = weights.load_clip(model_config.clip, dtype=frozen, param_dtype=frozen)
  set_remat(unet, model_config.remat)
  set_remat(vae, model_config.remat)
  if clip is not None:
    set_remat(clip, model_config.remat)
  return Models(unet, vae, text_encoder, clip, tokenizer, schedule)


# ---------------------------------------------------------------------------------------------
# The train state and step

@struct.dataclass
class TrainState:
  step: jax.Array             # () int32: updates applied or skipped so far
  params: Any                 # UNet parameters, float32 (pure dict)
  ema_params: Any             # their exponential moving average
  opt_state: Any
  rng: jax.Array              # (2,) uint32 base key; step keys are fold_in(rng, step)
  skipped_updates: jax.Array  # () int32: steps whose loss or gradient was not finite


def learning_rate_schedule(optim) -> optax.Schedule:
  warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, max(optim.decay_steps, 1),
                                        alpha=optim.end_lr_factor)
  else:
    raise ValueError(f"optim.schedule {optim.schedule!r}; expected 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim)
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay)), schedule


@dataclasses.dataclass
class StepFunctions:
  """What a run compiles: the train step and the shardings of its arguments."""
  step: Callable                     # (state, frozen, batch) -> (state, metrics)
  state_shardings: Any
  frozen_shardings: Any
  batch_sharding: NamedSharding
  abstract_state: Any                # ShapeDtypeStructs with shardings (restore target)
  init_state: Callable               # (params, frozen-free rng seed) -> TrainState


def split_models(models: Models):
  """(graphdefs, unet params, frozen params) as pure dicts of arrays."""
  graphs, frozen = {}, {}
  for name in ("unet", "vae", "text_encoder", "clip"):
    module = getattr(models, name)
    if module is None:
      continue
    graph, state = nnx.split(module)
    graphs[name] = graph
    if name == "unet":
      params = nnx.to_pure_dict(state)
    else:
      frozen[name] = nnx.to_pure_dict(state)
  return graphs, params, frozen


def loss_function(config, graphs, alphas_cumprod):
  """(params, frozen, batch, key) -> (loss, metrics) for the run's objective."""
  objective = config.objective
  if objective == "cec":
    cycle = CycleConfig(start=config.cycle.start,
                        num_steps=(config.cycle.num_steps_min, config.cycle.num_steps_max),
                        timesteps=(config.cycle.timestep_min, config.cycle.timestep_max),
                        share_noise=config.cycle.share_noise, reencode=config.cycle.reencode,
                        attention_resolution=config.cycle.attention_resolution,
                        conditioning_dropout=config.cycle.conditioning_dropout)
    weights = LossConfig(clip=config.loss.clip, sim=config.loss.sim, attn=config.loss.attn,
                         recon=config.loss.recon, sim_kind=config.loss.sim_kind,
                         recon_kind=config.loss.recon_kind)
  elif objective != "ip2p":
    raise ValueError(f"objective {objective!r}; expected 'cec' or 'ip2p'")

  def compute(params, frozen, batch, key):
    unet = nnx.merge(graphs["unet"], params)
    vae = nnx.merge(graphs["vae"], frozen["vae"])
    text_encoder = nnx.merge(graphs["text_encoder"], frozen["text_encoder"])
    if objective == "cec":
      clip = nnx.merge(graphs["clip"], frozen["clip"])
      return cycle_losses(unet, vae, text_encoder, clip, batch, key, alphas_cumprod, cycle,
                          weights)
    return ip2p_losses(unet, vae, text_encoder, batch, key, alphas_cumprod,
                       config.ip2p.conditioning_dropout)
  return compute


def make_step_functions(config, graphs, params, frozen, schedule: NoiseSchedule,
                        mesh) -> StepFunctions:
  """Builds the jitted train step for `mesh` from `split_models`' pieces (arrays or shapes)."""
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod(), jnp.float32)
  compute_loss = loss_function(config, graphs, alphas_cumprod)
  optimizer, lr_schedule = make_optimizer(config.optim)
  accumulate = config.optim.accumulate
  ema_decay = config.ema_decay

  def train_step(state: TrainState, frozen_params, batch):
    # The abstract mesh lets the models pin activations to the batch axes (`shard_batch`).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _train_step(state, frozen_params, batch)

  def _train_step(state: TrainState, frozen_params, batch):
    key = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    if accumulate == 1:
      (_, metrics), grads = grad_fn(state.params, frozen_params, batch, key)
    else:
      # Microbatch i = examples i, i + A, ...: every device holds a slice of every microbatch.
      def split(x):
        x = x.reshape((x.shape[0] // accumulate, accumulate) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES)))
      micro = jax.tree.map(split, batch)

      def accumulate_one(carry, inputs):
        grads_sum, metrics_sum = carry
        index, microbatch = inputs
        (_, m), g = grad_fn(state.params, frozen_params, microbatch,
                            jax.random.fold_in(key, index))
        return (jax.tree.map(jnp.add, grads_sum, g), jax.tree.map(jnp.add, metrics_sum, m)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      metric_shapes = jax.eval_shape(
          lambda: grad_fn(state.params, frozen_params, jax.tree.map(lambda x: x[0], micro),
                          key)[0][1])
      metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
      (grads, metrics), _ = jax.lax.scan(accumulate_one, (zeros, metric_zeros),
                                         (jnp.arange(accumulate), micro))
      grads = jax.tree.map(lambda g: g / accumulate, grads)
      metrics = jax.tree.map(lambda m: m / accumulate, metrics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state.params)
    new_opt_state = keep(new_opt_state, state.opt_state)
    # diffusers' EMA warm-up: decay min(ema_decay, (1 + n) / (10 + n)) after n updates.
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1 + n) / (10 + n))
    new_ema = jax.tree.map(lambda e, p: jnp.where(finite, decay * e + (1 - decay) * p, e),
                           state.ema_params, new_params)
    skipped = state.skipped_updates + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   skipped_updates=skipped, update_skipped=(~finite).astype(jnp.int32))
    return TrainState(state.step + 1, new_params, new_ema, new_opt_state, state.rng,
                      skipped), metrics

  param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
  replicated = shd.replicated(mesh)
  state_shardings = TrainState(
      step=replicated, params=shd.parameter_shardings(param_shapes, mesh),
      ema_params=shd.parameter_shardings(param_shapes, mesh),
      opt_state=shd.parameter_shardings(opt_shapes, mesh), rng=replicated,
      skipped_updates=replicated)
  frozen_shardings = shd.parameter_shardings(frozen, mesh)
  batch_sharding = shd.batch_sharding(mesh)
  abstract_state = jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      TrainState(jax.ShapeDtypeStruct((), jnp.int32), param_shapes, param_shapes, opt_shapes,
                 jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32)),
      state_shardings)
  step = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def _init(params, seed):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(jnp.zeros((), jnp.int32), params,
                      jax.tree.map(jnp.copy, params), optimizer.init(params),
                      jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32))
  init = jax.jit(_init, out_shardings=state_shardings)  # compiled once per step functions

  def init_state(params, seed: int) -> TrainState:
    return init(shd.place(jax.tree.map(np.asarray, params), state_shardings.params), seed)

  return StepFunctions(step, state_shardings, frozen_shardings, batch_sharding, abstract_state,
                       init_state)


def check_batch_size(global_batch: int, devices: int, accumulate: int, processes: int = 1):
  """Every microbatch splits evenly over the devices, and the batch over the processes."""
  if global_batch % (devices * accumulate) or global_batch % processes:
    raise ValueError(f"batch_size {global_batch} must divide by devices x accumulate "
                     f"({devices} x {accumulate}) and by the {processes} processes")


def abstract_batch(config, global_batch: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch of the run's data kind."""
  r = config.data.resolution
  image = jax.ShapeDtypeStruct((global_batch, r, r, 3), jnp.float32, sharding=sharding)
  ids = jax.ShapeDtypeStruct((global_batch, 77), jnp.int32, sharding=sharding)
  batch = {"image": image, "input_caption_ids": ids, "instruction_ids": ids,
           "edited_caption_ids": ids, "reverse_instruction_ids": ids}
  if config.objective == "ip2p":
    batch["edited_image"] = image
  return batch


def device_batch(host_batch: dict[str, np.ndarray], config, sharding) -> dict[str, jax.Array]:
  """Host batch -> global arrays (only the fields the step takes)."""
  wanted = abstract_batch(config, 1, None)
  return {k: jax.make_array_from_process_local_data(sharding, host_batch[k]) for k in wanted}


# ---------------------------------------------------------------------------------------------
# Checkpoints

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


def checkpoint_manager(directory: str, config):
  import orbax.checkpoint as ocp
  from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=config.checkpoint.keep),
      pp.BestN(get_metric_fn=lambda metrics: metrics["loss"], reverse=True, n=1)])
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint.every, preservation_policy=policy,
      enable_async_checkpointing=config.checkpoint.use_async, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data"))


def save_checkpoint(manager, step: int, state: TrainState, loader, loss: float,
                    force: bool = False) -> bool:
  import grain
  import orbax.checkpoint as ocp
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_LoaderSnapshot(loader.get_state()))),
      metrics={"loss": float(loss)}, force=force)


def restore_checkpoint(manager, step: int, abstract_state, loader) -> TrainState:
  import grain
  import orbax.checkpoint as ocp
  snapshot = _LoaderSnapshot()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(snapshot)))
  loader.set_state(snapshot.state)
  return restored["state"]


# ---------------------------------------------------------------------------------------------
# Samples, export

def sample_edits(graphs, frozen, params, tokenizer, schedule, images, forward_ids, reverse_ids,
                 config, seed: int):
  """(forward edit, reconstruction) of `images` (B, H, W, 3) in [-1, 1] with `params`: the
  InstructPix2Pix sampler with guidance (config.sample), forward then reverse instruction."""
  from uip2p_jax.pipeline import edit_latents
  from uip2p_jax.schedules import make_sampler
  from uip2p_jax.tokenizer import tokenize
  unet = nnx.merge(graphs["unet"], params)
  vae = nnx.merge(graphs["vae"], frozen["vae"])
  text_encoder = nnx.merge(graphs["text_encoder"], frozen["text_encoder"])
  sampler = make_sampler("euler_ancestral", schedule, config.sample.steps)
  empty_ids = tokenize(tokenizer, [""])
  keys = jax.vmap(jax.random.key)(jnp.arange(images.shape[0], dtype=jnp.uint32) + seed)
  edit = lambda x, ids: edit_latents(unet, vae, text_encoder, x, ids, empty_ids, sampler,
                                     jnp.float32(config.sample.text_scale),
                                     jnp.float32(config.sample.image_scale), keys)
  edited = edit(images, forward_ids)
  return edited, edit(edited, reverse_ids)


def sample_grid(rows: list[tuple[np.ndarray, ...]], captions: list[str]):
  """PIL grid: one row per example (e.g. input | forward edit | reconstruction), captioned."""
  from PIL import Image, ImageDraw
  from uip2p_jax.pipeline import to_pil
  size = rows[0][0].shape[0]
  band = 28
  grid = Image.new("RGB", (len(rows[0]) * size, len(rows) * (size + band)), "white")
  draw = ImageDraw.Draw(grid)
  for r, (row, caption) in enumerate(zip(rows, captions)):
    top = r * (size + band)
    for line, text in enumerate(caption.split("\n")[:2]):
      draw.text((2, top + 1 + 13 * line), text[:120], fill="black")
    for c, image in enumerate(row):
      grid.paste(to_pil(image), (c * size, top + band))
  return grid


def host_tree(tree):
  """Global (possibly sharded, multi-host) arrays -> numpy on every process."""
  from jax.experimental import multihost_utils
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


# ---------------------------------------------------------------------------------------------
# The loop

_COMPILED: dict[tuple, tuple[StepFunctions, Any]] = {}


def _compiled_step(config, graphs, params, frozen, schedule, mesh):
  """The run's step functions and compiled step; a later run of the same config in this process
  (a resumed run, a notebook) reuses them instead of compiling again."""
  key = (config.to_json_best_effort(sort_keys=True), mesh.shape_tuple,
         tuple(d.id for d in mesh.devices.flat))
  if key not in _COMPILED:
    functions = make_step_functions(config, graphs, params, frozen, schedule, mesh)
    abstract_frozen = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), frozen,
        functions.frozen_shardings)
    batch = abstract_batch(config, config.batch_size, functions.batch_sharding)
    _COMPILED.clear()  # keep one: compiled SD-size steps are large
    _COMPILED[key] = functions, functions.step.lower(functions.abstract_state, abstract_frozen,
                                                     batch).compile()
  return _COMPILED[key]


def _resolve_data_dir(config, workdir: str) -> str:
  if config.data.dir != "sample":
    return config.data.dir
  from uip2p_jax.data import builders
  out = os.path.join(workdir, "data")
  if not os.path.isfile(os.path.join(builders.dataset_dir(out, "captions"), "dataset_info.json")):
    if jax.process_index() == 0:
      builders.build_sample(out)
    _sync("sample data")
  return out


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class _Preemption:
  """Turns SIGTERM (TPU maintenance / preemption, SLURM time limit) into a flag."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the experiment `config` in `workdir`; returns the last logged metrics."""
  from uip2p_jax.data.loader import Loader, LoaderConfig
  shd.maybe_initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  is_writer = jax.process_index() == 0
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
  global_batch = config.batch_size
  check_batch_size(global_batch, mesh.shape["data"] * mesh.shape["fsdp"],
                   config.optim.accumulate, jax.process_count())

  models = build_models(config.model, config.objective)
  graphs, params, frozen = split_models(models)
  tokenizer, schedule = models.tokenizer, models.schedule
  del models  # the arrays live on in params/frozen only
  functions, compiled = _compiled_step(config, graphs, params, frozen, schedule, mesh)
  frozen = shd.place(jax.tree.map(np.asarray, frozen), functions.frozen_shardings)
  run = RunContext(config, workdir, graphs, frozen, tokenizer, schedule, mesh)

  data_config = LoaderConfig(
      _resolve_data_dir(config, workdir), kind=config.data.kind,
      resolution=config.data.resolution, batch_size=global_batch // jax.process_count(),
      seed=config.seed, num_workers=config.data.num_workers, min_scale=config.data.min_scale,
      max_scale=config.data.max_scale, flip=config.data.flip, strict=config.data.strict,
      tokenizer=config.model.pretrained or None, require_reverse=config.objective == "cec")
  loader = Loader(data_config)
  manager = checkpoint_manager(os.path.join(workdir, "checkpoints"), config)
  latest = manager.latest_step()
  if latest is not None:
    state = restore_checkpoint(manager, latest, functions.abstract_state, loader)
    print(f"train: resumed from {workdir}/checkpoints step {latest}", flush=True)
  else:
    state = functions.init_state(params, config.seed)
  del params

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
  peak = peak_flops(jax.devices()[0])

  writer = None
  if is_writer:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  sample_batch = None
  preemption = _Preemption()
  step = int(jax.device_get(state.step))
  last_metrics: dict[str, float] = {}
  window_start, window_steps = time.perf_counter(), 0
  print(f"train: {config.objective} on {jax.device_count()} devices, mesh "
        f"{dict(mesh.shape)}, global batch {global_batch}, steps {step} -> "
        f"{config.total_steps}; {flops_per_device / 1e9:.1f} GFLOP per device per step",
        flush=True)
  try:
    while step < config.total_steps:
      host_batch = next(loader)
      if sample_batch is None:
        sample_batch = {k: v[:config.sample.count] for k, v in host_batch.items() if k != "id"}
        if jax.process_count() > 1:  # every process must place the same sample arrays
          from jax.experimental import multihost_utils
          sample_batch = multihost_utils.broadcast_one_to_all(sample_batch)
      batch = device_batch(host_batch, config, functions.batch_sharding)
      state, metrics = compiled(state, frozen, batch)
      step += 1
      window_steps += 1
      if step % config.log_every == 0 or step == config.total_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        metrics.update(step_time=step_time, images_per_second=global_batch / step_time,
                       skipped_records=float(loader.skipped_records))
        if peak and flops_per_device:
          metrics["mfu"] = flops_per_device / step_time / peak
        last_metrics = metrics
        if writer is not None:
          for name, value in metrics.items():
            writer.add_scalar(f"train/{name}", value, step)
          with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
          mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
          print(f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e}"
                f" | grad {metrics['grad_norm']:.3f} | {metrics['images_per_second']:.1f} img/s"
                f" | {step_time * 1000:.0f} ms/step{mfu} | skipped {int(metrics['skipped_updates'])}",
                flush=True)
        window_start, window_steps = time.perf_counter(), 0
      if config.sample.every and (step % config.sample.every == 0 or step == config.total_steps):
        write_samples(run, state, sample_batch, step, writer)
      loss_value = last_metrics.get("loss", float("nan"))
      if preemption.requested or manager.reached_preemption(step):
        save_checkpoint(manager, step, state, loader, loss_value, force=True)
        manager.wait_until_finished()
        print(f"train: SIGTERM: saved step {step}, exiting", flush=True)
        return last_metrics
      if step % config.checkpoint.every == 0 or step == config.total_steps:
        if not np.isfinite(loss_value):  # the save needs this step's loss for "best"
          loss_value = float(jax.device_get(metrics["loss"]))
        save_checkpoint(manager, step, state, loader, loss_value,
                        force=step == config.total_steps)
    manager.wait_until_finished()
    if config.export:
      export(run, state)
    if config.final_edit:
      final_edit(run, state, sample_batch)
  finally:
    preemption.restore()
    manager.wait_until_finished()
    manager.close()
    loader.close()
    if writer is not None:
      writer.close()
  return last_metrics


@dataclasses.dataclass
class RunContext:
  """What the loop's side tasks (samples, export, final edit) need besides the state."""
  config: Any
  workdir: str
  graphs: dict
  frozen: Any          # placed frozen parameters
  tokenizer: Any
  schedule: NoiseSchedule
  mesh: Any

  def texts(self, ids: np.ndarray) -> list[str]:
    return [self.tokenizer.decode([int(i) for i in row], skip_special_tokens=True) for row in ids]

  def replicated(self, x: np.ndarray) -> jax.Array:
    return shd.place(np.asarray(x), shd.replicated(self.mesh))


def write_samples(run: RunContext, state: TrainState, sample_batch, step: int, writer) -> None:
  """workdir/samples/step_N.png (and TensorBoard): input | forward edit | reconstruction."""
  images = sample_batch["image"]
  edited, reconstructed = host_tree(sample_edits(
      run.graphs, run.frozen, state.ema_params, run.tokenizer, run.schedule,
      run.replicated(images), run.replicated(sample_batch["instruction_ids"]),
      run.replicated(sample_batch["reverse_instruction_ids"]), run.config, run.config.seed))
  if jax.process_index() != 0:
    return
  captions = [f"fwd: {f}\nrev: {r}" for f, r in zip(
      run.texts(sample_batch["instruction_ids"]),
      run.texts(sample_batch["reverse_instruction_ids"]))]
  grid = sample_grid(list(zip(images, np.asarray(edited), np.asarray(reconstructed))), captions)
  os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
  grid.save(os.path.join(run.workdir, "samples", f"step_{step:07d}.png"))
  if writer is not None:
    writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def export(run: RunContext, state: TrainState) -> str:
  """The EMA UNet in diffusers' format at workdir/export/unet; for runs from a pretrained
  pipeline, the base pipeline's other parts are copied beside it, so workdir/export is a full
  InstructPix2Pix folder (`uip2p edit --model`, `uip2p eval`, diffusers' `from_pretrained`)."""
  import shutil
  from uip2p_jax import weights
  ema = host_tree(state.ema_params)
  out = os.path.join(run.workdir, "export")
  if jax.process_index() == 0:
    pretrained = run.config.model.pretrained  # (an init_from_sd base is no IP2P pipeline)
    if pretrained:
      root = weights.resolve_folder(pretrained)
      for name in os.listdir(root):
        source = os.path.join(root, name)
        if name == "unet" or name.startswith("."):
          continue
        if os.path.isdir(source):
          shutil.copytree(source, os.path.join(out, name), dirs_exist_ok=True)
        else:
          os.makedirs(out, exist_ok=True)
          shutil.copyfile(source, os.path.join(out, name))
    weights.save_unet(nnx.merge(run.graphs["unet"], jax.tree.map(np.asarray, ema)),
                      os.path.join(out, "unet"))
    print(f"train: exported the EMA UNet (diffusers format) to {out}/unet"
          + (" with the base pipeline's other parts" if pretrained else ""), flush=True)
  return out


def final_edit(run: RunContext, state: TrainState, sample_batch) -> None:
  """Edits the first sample image with the trained (EMA) UNet: workdir/final_edit.png."""
  from uip2p_jax.pipeline import to_pil
  ids = sample_batch["instruction_ids"][:1]
  edited, _ = sample_edits(run.graphs, run.frozen, state.ema_params, run.tokenizer,
                           run.schedule, run.replicated(sample_batch["image"][:1]),
                           run.replicated(ids), run.replicated(ids), run.config, run.config.seed)
  edited = host_tree(edited)
  if jax.process_index() == 0:
    path = os.path.join(run.workdir, "final_edit.png")
    to_pil(np.asarray(edited[0])).save(path)
    print(f"train: edited a sample image ({run.texts(ids)[0]!r}) -> {path}", flush=True)


# ---------------------------------------------------------------------------------------------
# Entry point

def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR, default
  ~/.cache/uip2p_jax/jax): a restarted or resumed run skips most of its compile time."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "uip2p_jax", "jax")
  jax.config.update("jax_compilation_cache_dir", directory)


def main(argv: list[str] | None = None) -> int:
  """`python -m uip2p_jax.train --config FILE.py[:ARGS] --workdir DIR [--config.key=value]`."""
  from absl import app, flags, logging
  from ml_collections import config_flags

  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "experiment config file (FILE.py[:ARGS])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, logs, samples, export")
  result = {}

  def run(_):
    if flags.FLAGS.config is None or not flags.FLAGS.workdir:
      raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # orbax/grain log every save at INFO
      logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    result["metrics"] = train(flags.FLAGS.config, flags.FLAGS.workdir)

  argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  try:
    app.run(run, argv=argv)
  except SystemExit as e:
    return int(e.code or 0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
