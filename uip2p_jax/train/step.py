"""The train state, the optimizer and the jitted, sharded train step.

`train_step` is a plain module-level function (a test can call it directly, jitted or not);
`make_step_functions` binds it to a run's losses, optimizer and mesh and jits it with explicit
in/out shardings and a donated state; `lower_step` lowers that jit on abstract shapes, for the
loop (which compiles it) and for `uip2p plan` (which reads its memory and FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from uip2p_jax import sharding as shd
from uip2p_jax.cycle import cycle_losses, ip2p_losses
from uip2p_jax.model_set import ModelSet
from uip2p_jax.models.lora import dropout_key as lora_dropout_key
from uip2p_jax.schedules import NoiseSchedule
from uip2p_jax.train import config as run_config


@struct.dataclass
class TrainState:
  step: jax.Array             # () int32: updates applied or skipped so far
  params: Any                 # the trained module's parameters, float32 (pure dict)
  ema_params: Any             # their exponential moving average (`ema_dtype`; None: no EMA)
  opt_state: Any
  rng: jax.Array              # (2,) uint32 base key; step keys are fold_in(rng, step)
  skipped_updates: jax.Array  # () int32: steps whose loss or gradient was not finite


def learning_rate_schedule(optim) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then `schedule`: `constant`; `cosine` (to
  `end_lr_factor` x lr over `decay_steps`); or `wsd` (warmup-stable-decay: held at lr until step
  `decay_start`, then linear to `end_lr_factor` x lr over `decay_steps`, held there). `wsd`
  cools down a run that trained at a held lr: resume it with `decay_start` = its step
  (RESULTS.md, ShapesWorld IP2P)."""
  warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, max(optim.decay_steps, 1),
                                        alpha=optim.end_lr_factor)
  elif optim.schedule == "wsd":
    hold = optim.decay_start - optim.warmup_steps
    after = optax.join_schedules(
        [optax.constant_schedule(optim.lr),
         optax.linear_schedule(optim.lr, optim.lr * optim.end_lr_factor, optim.decay_steps)],
        [hold])
  else:
    raise ValueError(f"optim.schedule {optim.schedule!r}; expected one of {LR_SCHEDULES}")
  return optax.join_schedules([warmup, after], [optim.warmup_steps])


LR_SCHEDULES = ("constant", "cosine", "wsd")

OPTIMIZERS = ("adamw", "adafactor")


def scale_image_channels(inner: optax.GradientTransformation,
                         multiplier: float) -> optax.GradientTransformation:
  """`inner`, then the updates of `conv_in.kernel`'s image-condition input channels (the second
  half of an edit UNet's input channels, HWIO kernel) scaled by `multiplier`. The optimizer
  state is `inner`'s, unchanged: a run can change the multiplier and resume.

  InstructPix2Pix adds them to a text-to-image UNet as zeros: Adam moves each weight by about the
  learning rate per step, so they grow no faster than any other weight, and at high noise the
  image enters conv_in's outputs several times weaker than the noisy latent it is mixed with
  (RESULTS.md, ShapesWorld: mean |w| 0.028 vs 0.126 after 10000 steps)."""

  def scale(path, u):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if names[:2] != ["conv_in", "kernel"]:
      return u
    return u.at[:, :, u.shape[2] // 2:, :].multiply(multiplier)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(inner.init, update)


def make_optimizer(optim) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping, then AdamW (first moment in `optim.mu_dtype`: bfloat16 halves it) or
  Adafactor (factored second moments: O(rows + columns) per matrix instead of O(rows x columns);
  `weight_decay` is its decoupled decay rate); then `optim.image_channels_lr_multiplier`
  (`scale_image_channels`), when it is not 1."""
  from uip2p_jax.model_set import dtype_of
  schedule = learning_rate_schedule(optim)
  if optim.name == "adamw":
    update = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         mu_dtype=dtype_of(optim.mu_dtype), weight_decay=optim.weight_decay)
  elif optim.name == "adafactor":
    update = optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None)
  else:
    raise ValueError(f"optim.name {optim.name!r}; expected one of {OPTIMIZERS}")
  optimizer = optax.chain(optax.clip_by_global_norm(optim.grad_clip), update)
  multiplier = optim.get("image_channels_lr_multiplier", 1.0)
  if multiplier != 1.0:
    optimizer = scale_image_channels(optimizer, multiplier)
  return optimizer, schedule


# Per objective: the module it trains and the frozen modules its loss reads. cec and ip2p train
# the edit UNet; t2i a text-to-image UNet; vae, clip and probe train a world's own models.
OBJECTIVES = {"cec": ("unet", ("vae", "text_encoder", "clip")),
              "ip2p": ("unet", ("vae", "text_encoder")),
              "t2i": ("unet", ("vae", "text_encoder")),
              "vae": ("vae", ()), "clip": ("clip", ()), "probe": ("probe", ())}


def trained_module(objective: str) -> str:
  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r}; expected one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[objective][0]


def split_models(models: ModelSet, objective: str = "cec"):
  """(graphdefs, trained parameters, frozen parameters) of `objective` as pure dicts of arrays
  (or shapes): the trained module (`trained_module(objective)`) and the frozen ones its loss
  and samples read. A UNet with LoRA layers is trained through its factors only: they are the
  trained parameters and its base joins the frozen ones (under the same name; see
  `merge_module`)."""
  from uip2p_jax.models.lora import LoRAParam, has_lora
  trained = trained_module(objective)
  graphs, frozen, params = {}, {}, None
  for name in (trained,) + OBJECTIVES[objective][1]:
    module = getattr(models, name)
    if module is None:
      raise ValueError(f"objective {objective!r} needs the model set's {name}, which was not "
                       "built")
    if name == trained and has_lora(module):
      graph, lora_state, base_state = nnx.split(module, LoRAParam, ...)
      graphs[name] = graph
      params, frozen[name] = nnx.to_pure_dict(lora_state), nnx.to_pure_dict(base_state)
      continue
    graph, state = nnx.split(module)
    graphs[name] = graph
    if name == trained:
      params = nnx.to_pure_dict(state)
    else:
      frozen[name] = nnx.to_pure_dict(state)
  return graphs, params, frozen


def merge_module(graph, params=None, frozen=None):
  """A module from `split_models`' pieces: its trained `params`, its `frozen` parameters, or
  both (a LoRA UNet: the factors, then the frozen base)."""
  return nnx.merge(graph, *[state for state in (params, frozen) if state is not None])


LORA_DROPOUT_STREAM = 0x10AA  # fold_in of the step key that seeds LoRA dropout


def loss_function(config, graphs, alphas_cumprod, empty_ids,
                  prediction_type: str = "epsilon") -> Callable:
  """(params, frozen, batch, key) -> (loss, metrics) for the run's objective. `empty_ids`:
  (1, 77) int32, the run's tokenizer's ids of "" (the unconditional text); `prediction_type`:
  what the UNet outputs (the run's schedule's), for the objectives that train or run one."""
  from uip2p_jax import pretraining
  objective = config.objective
  trained = trained_module(objective)
  if objective == "cec":
    cycle, weights = run_config.cycle_config(config), run_config.loss_config(config)
  pretrain = run_config.pretrain_config(config)
  lora = run_config.lora_config(config)

  def compute(params, frozen, batch, key):
    if lora is not None and lora.dropout:  # the LoRA layers' dropout masks come from this key
      with lora_dropout_key(jax.random.fold_in(key, LORA_DROPOUT_STREAM)):
        return losses(params, frozen, batch, key)
    return losses(params, frozen, batch, key)

  def losses(params, frozen, batch, key):
    module = lambda name: merge_module(graphs[name], params if name == trained else None,
                                       frozen.get(name))
    if objective == "cec":
      return cycle_losses(module("unet"), module("vae"), module("text_encoder"), module("clip"),
                          batch, key, alphas_cumprod, cycle, weights, empty_ids=empty_ids,
                          prediction_type=prediction_type)
    if objective == "ip2p":
      return ip2p_losses(module("unet"), module("vae"), module("text_encoder"), batch, key,
                         alphas_cumprod, config.ip2p.conditioning_dropout, empty_ids=empty_ids,
                         noise_offset=config.ip2p.noise_offset,
                         loss_weighting=config.ip2p.loss_weighting,
                         edit_region_weight=config.ip2p.edit_region_weight,
                         prediction_type=prediction_type)
    if objective == "t2i":
      return pretraining.t2i_losses(module("unet"), module("vae"), module("text_encoder"), batch,
                                    key, alphas_cumprod, pretrain, empty_ids=empty_ids,
                                    prediction_type=prediction_type)
    world_losses = {"vae": pretraining.vae_losses, "clip": pretraining.clip_losses,
                    "probe": pretraining.probe_losses}[objective]
    return world_losses(module(trained), batch, key, pretrain)
  return compute


def _gradients(compute_loss, params, frozen_params, batch, key, accumulate: int, mesh):
  """(metrics, gradients) of the mean loss; with accumulate > 1, averaged over microbatches
  i, i + A, i + 2A, ... (every device then holds a slice of every microbatch)."""
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  if accumulate == 1:
    (_, metrics), grads = grad_fn(params, frozen_params, batch, key)
    return metrics, grads

  def split(x):
    x = x.reshape((x.shape[0] // accumulate, accumulate) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES)))
  micro = jax.tree.map(split, batch)

  def accumulate_one(carry, inputs):
    grads_sum, metrics_sum = carry
    index, microbatch = inputs
    (_, m), g = grad_fn(params, frozen_params, microbatch, jax.random.fold_in(key, index))
    return (jax.tree.map(jnp.add, grads_sum, g), jax.tree.map(jnp.add, metrics_sum, m)), None
  metric_shapes = jax.eval_shape(
      lambda: grad_fn(params, frozen_params, jax.tree.map(lambda x: x[0], micro), key)[0][1])
  zeros = (jax.tree.map(jnp.zeros_like, params),
           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
  (grads, metrics), _ = jax.lax.scan(accumulate_one, zeros, (jnp.arange(accumulate), micro))
  return (jax.tree.map(lambda m: m / accumulate, metrics),
          jax.tree.map(lambda g: g / accumulate, grads))


def train_step(state: TrainState, frozen_params, batch, *, compute_loss: Callable,
               optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
               accumulate: int = 1, ema_decay: float = 0.9999, mesh=None):
  """One update: gradients of `compute_loss` for the trained module only (frozen models are
  differentiated through, never updated), AdamW, EMA. A non-finite loss or gradient norm
  leaves parameters, EMA and optimizer state unchanged and is counted in skipped_updates."""
  key = jax.random.fold_in(state.rng, state.step)
  metrics, grads = _gradients(compute_loss, state.params, frozen_params, batch, key,
                              accumulate, mesh)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_params = keep(new_params, state.params)
  new_opt_state = keep(new_opt_state, state.opt_state)
  # diffusers' EMA warm-up: decay min(ema_decay, (1 + n) / (10 + n)) after n updates; the
  # average is computed in float32 and stored in its own dtype (bfloat16 halves it).
  n = state.step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1 + n) / (10 + n))
  new_ema = None if state.ema_params is None else jax.tree.map(
      lambda e, p: jnp.where(finite, decay * e.astype(jnp.float32) + (1 - decay) * p,
                             e).astype(e.dtype), state.ema_params, new_params)
  skipped = state.skipped_updates + (~finite).astype(jnp.int32)
  metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                 skipped_updates=skipped, update_skipped=(~finite).astype(jnp.int32))
  return TrainState(state.step + 1, new_params, new_ema, new_opt_state, state.rng,
                    skipped), metrics


@dataclasses.dataclass
class StepFunctions:
  """What a run compiles: the jitted train step and the shardings of its arguments."""
  step: Callable                     # (state, frozen, batch) -> (state, metrics)
  state_shardings: Any
  frozen_shardings: Any
  batch_sharding: NamedSharding
  abstract_state: Any                # ShapeDtypeStructs with shardings (restore target)
  init_state: Callable               # (UNet params, seed) -> TrainState


def make_step_functions(config, graphs, params, frozen, schedule: NoiseSchedule, tokenizer,
                        mesh) -> StepFunctions:
  """Builds the jitted train step for `mesh` from `split_models`' pieces (arrays or shapes)
  and the run's schedule and tokenizer."""
  from uip2p_jax.tokenizer import tokenize
  if config.objective == "ip2p":  # the resolved type: config.model.prediction_type may be "auto"
    from uip2p_jax.cycle import check_ip2p_loss_weighting
    try:
      check_ip2p_loss_weighting(config.ip2p.loss_weighting, schedule.prediction_type)
    except ValueError as e:
      raise run_config.ConfigError(f"{e} (config.model.prediction_type="
                                   f"{config.model.prediction_type!r})") from None
  alphas_cumprod = jnp.asarray(schedule.alphas_cumprod(), jnp.float32)
  if config.objective == "cec" and config.cycle.timestep_max > alphas_cumprod.shape[0]:
    raise run_config.ConfigError(
        f"config.cycle.timestep_max={config.cycle.timestep_max} is beyond the model's "
        f"{alphas_cumprod.shape[0]}-step noise schedule (expected <= {alphas_cumprod.shape[0]})")
  optimizer, lr_schedule = make_optimizer(config.optim)
  bound_step = functools.partial(
      train_step, compute_loss=loss_function(config, graphs, alphas_cumprod,
                                             tokenize(tokenizer, [""]),
                                             schedule.prediction_type),
      optimizer=optimizer, lr_schedule=lr_schedule, accumulate=config.optim.accumulate,
      ema_decay=config.ema_decay, mesh=mesh)

  def step_under_mesh(state, frozen_params, batch):
    # The abstract mesh lets the models pin activations to the batch axes (`shard_batch`).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return bound_step(state, frozen_params, batch)
  step_under_mesh.__name__ = "train_step"  # the HLO module name plan reads: jit_train_step

  from uip2p_jax.model_set import dtype_of
  ema_dtype = dtype_of(config.ema_dtype) if config.ema_decay else None  # None: no EMA kept
  param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  ema_shapes = None if ema_dtype is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, ema_dtype), params)
  opt_shapes = jax.eval_shape(optimizer.init, param_shapes)
  replicated = shd.replicated(mesh)
  state_shardings = TrainState(
      step=replicated, params=shd.parameter_shardings(param_shapes, mesh),
      ema_params=None if ema_dtype is None else shd.parameter_shardings(ema_shapes, mesh),
      opt_state=shd.parameter_shardings(opt_shapes, mesh), rng=replicated,
      skipped_updates=replicated)
  frozen_shardings = shd.parameter_shardings(frozen, mesh)
  batch_sharding = shd.batch_sharding(mesh)
  abstract_state = jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      TrainState(jax.ShapeDtypeStruct((), jnp.int32), param_shapes, ema_shapes, opt_shapes,
                 jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((), jnp.int32)),
      state_shardings)
  step = jax.jit(step_under_mesh,
                 in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  def _init(params, seed):
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    ema = None if ema_dtype is None else jax.tree.map(lambda p: p.astype(ema_dtype), params)
    return TrainState(jnp.zeros((), jnp.int32), params, ema, optimizer.init(params),
                      jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32))
  init = jax.jit(_init, out_shardings=state_shardings)  # compiled once per step functions

  def init_state(params, seed: int) -> TrainState:
    return init(shd.place(jax.tree.map(np.asarray, params), state_shardings.params), seed)

  return StepFunctions(step, state_shardings, frozen_shardings, batch_sharding, abstract_state,
                       init_state)


def lower_step(config, graphs, params, frozen, schedule: NoiseSchedule, tokenizer, mesh,
               global_batch: int):
  """(step functions, the step lowered on abstract shapes) for a global batch on `mesh`."""
  functions = make_step_functions(config, graphs, params, frozen, schedule, tokenizer, mesh)
  abstract_frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 frozen, functions.frozen_shardings)
  batch = abstract_batch(config, global_batch, functions.batch_sharding,
                         _run_latent_shape(config, graphs, frozen))
  return functions, functions.step.lower(functions.abstract_state, abstract_frozen, batch)


def flops_of(cost) -> float:
  """XLA's FLOP count from a cost analysis (one dict, or one per device in older jax)."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def model_flops(config, lowered, graphs, params, frozen, schedule, tokenizer, mesh) -> float:
  """Per-device FLOPs of one step without activation recomputation: the unoptimised program
  (lowered, not compiled) of the same step with remat off, divided over the devices.
  `lowered` is the run's step; the other arguments are `lower_step`'s."""
  if config.model.remat != "none":
    from uip2p_jax.models.partitioning import set_remat
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    trained = trained_module(config.objective)
    plain_graphs = {}
    for name, graph in graphs.items():
      module = merge_module(graph, shapes(params) if name == trained else None,
                            shapes(frozen[name]) if name in frozen else None)
      if name != "text_encoder":  # the modules build_models set a remat policy on
        set_remat(module, "none")
      plain_graphs[name] = nnx.split(module)[0]
    _, lowered = lower_step(config, plain_graphs, params, frozen, schedule, tokenizer, mesh,
                            config.batch_size)
  return flops_of(lowered.cost_analysis()) / mesh.size


def check_batch_size(global_batch: int, devices: int, accumulate: int, processes: int = 1):
  """Every microbatch splits evenly over the devices, and the batch over the processes."""
  if global_batch % (devices * accumulate) or global_batch % processes:
    raise ValueError(f"batch_size {global_batch} must divide by devices x accumulate "
                     f"({devices} x {accumulate}) and by the {processes} processes")


_CAPTION_FIELDS = ("image", "input_caption_ids", "instruction_ids", "edited_caption_ids",
                   "reverse_instruction_ids")
BATCH_FIELDS = {"cec": _CAPTION_FIELDS, "ip2p": _CAPTION_FIELDS + ("edited_image",),
                "t2i": ("image", "input_caption_ids"), "clip": ("image", "input_caption_ids"),
                "vae": ("image",), "probe": ("image", "labels")}


def batch_fields(objective: str, cached_latents: bool = False) -> tuple[str, ...]:
  """The batch fields the step of `objective` reads; `cached_latents`: with the images that
  `train.latent_cache` serves replaced by their posteriors' mean and log-variance."""
  from uip2p_jax.train import latent_cache
  fields = BATCH_FIELDS[objective]
  if not cached_latents:
    return fields
  cached = latent_cache.CACHED_FIELDS[objective]
  return tuple(f for f in fields if f not in cached) + tuple(
      field + suffix for field in cached for suffix in latent_cache.SUFFIXES)


def run_batch_fields(config) -> tuple[str, ...]:
  """`batch_fields` of the run `config` (its objective, with or without the latent cache)."""
  return batch_fields(config.objective, bool(config.data.get("cache_latents", False)))


def latent_shape(graphs, frozen, resolution: int) -> tuple[int, int, int]:
  """(h, w, channels) of the frozen VAE's latent of a `resolution` image."""
  image = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  out = jax.eval_shape(lambda p, x: merge_module(graphs["vae"], p).encode(x).mean,
                       frozen["vae"], image)
  return tuple(out.shape[1:])


def _run_latent_shape(config, graphs, frozen) -> tuple[int, int, int] | None:
  """`latent_shape` for a run with `data.cache_latents` (None for any other)."""
  if not config.data.get("cache_latents", False):
    return None
  return latent_shape(graphs, frozen, config.data.resolution)


def abstract_batch(config, global_batch: int, sharding,
                   latents: tuple[int, int, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one global batch of the run's objective; `latents`: the (h, w, channels) of
  cached posteriors (`latent_shape`), for a run with `data.cache_latents`."""
  from uip2p_jax.data.shapes import LABEL_NAMES
  r = config.data.resolution
  fields = run_batch_fields(config)
  if latents is None and any(name.endswith("_latent_mean") for name in fields):
    raise ValueError("a run with data.cache_latents needs the latents' shape (`latent_shape`)")

  def shape(name):
    if name.endswith(("_latent_mean", "_latent_logvar")):
      return (global_batch, *latents), jnp.float32
    if name.endswith("image"):
      return (global_batch, r, r, 3), jnp.float32
    if name == "labels":
      return (global_batch, len(LABEL_NAMES)), jnp.int32
    return (global_batch, 77), jnp.int32
  return {name: jax.ShapeDtypeStruct(*shape(name), sharding=sharding) for name in fields}


def synthetic_batch(config, global_batch: int, sharding, seed: int = 0,
                    latents: tuple[int, int, int] | None = None) -> dict[str, jax.Array]:
  """A random global batch of `abstract_batch`'s shapes, on one process (benchmarks, tests):
  images uniform in [-1, 1], token ids BOS + five random tokens + EOS padding, labels 0;
  cached posteriors (`latents`: `latent_shape`) N(0, 1) means and log-variance -4."""
  rng = np.random.default_rng(seed)
  host = {}
  for name, spec in abstract_batch(config, global_batch, None, latents).items():
    if name.endswith("_latent_mean"):
      host[name] = rng.normal(size=spec.shape).astype(np.float32)
    elif name.endswith("_latent_logvar"):
      host[name] = np.full(spec.shape, -4.0, np.float32)
    elif name.endswith("image"):
      host[name] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    elif name == "labels":
      host[name] = np.zeros(spec.shape, np.int32)
    else:
      ids = np.full(spec.shape, 49407, np.int32)
      ids[:, 0], ids[:, 1:6] = 49406, rng.integers(1000, 40000, (spec.shape[0], 5))
      host[name] = ids
  return shd.global_batch(host, sharding, run_batch_fields(config))
