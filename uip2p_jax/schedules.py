"""Noise schedules and samplers as pure functions, step for step equal to diffusers' schedulers.

A `Sampler` is a pytree of per-step tables computed once in numpy (exactly as diffusers'
`set_timesteps` does) plus pure functions of (tables, step index, sample, model output, noise):

    sampler = make_sampler("euler_ancestral", schedule, num_steps=20)
    latents = noise * sampler.init_noise_sigma
    def body(i, latents):
      eps = unet(sampler.scale_model_input(latents, i), sampler.timesteps[i], ...)
      return sampler.step(i, latents, eps, jax.random.normal(jax.random.fold_in(key, i), ...))
    latents = jax.lax.fori_loop(0, sampler.num_steps, body, latents)

The step index may be traced, so a whole sampling loop runs inside one `jit`. Stochastic
samplers take the noise as an array (the same arrays give the same trajectory as diffusers).
The identities the samplers share with training (`add_noise`, `predict_x0`, `predict_epsilon`,
`v_target`, `training_target`, `ddim_renoise`) are plain functions here, the one copy the CEC edits and losses use too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("euler_ancestral", "euler", "ddim", "ddpm")
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet's output is (diffusers' names)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The training noise schedule of a diffusers `scheduler_config.json`."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"
  steps_offset: int = 0
  # None: the sampler's own diffusers default (as `XScheduler.from_config(config)` would use):
  # spacing "linspace" for Euler, "leading" for DDIM/DDPM; clip_sample and set_alpha_to_one
  # true for DDIM/DDPM.
  timestep_spacing: str | None = None
  clip_sample: bool | None = None
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool | None = None

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> "NoiseSchedule":
    if config.get("trained_betas") is not None:
      raise ValueError("scheduler config: trained_betas is not supported (expected null)")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding",
                "rescale_betas_zero_snr"):
      if config.get(key):
        raise ValueError(f"scheduler config: {key}=true is not supported (expected false)")
    fields = {f.name for f in dataclasses.fields(cls)}
    # diffusers records which values were defaults of the class that wrote the config; like
    # `OtherScheduler.from_config`, leave those to each sampler's own default.
    defaulted = set(config.get("_use_default_values", ()))
    schedule = cls(**{k: v for k, v in config.items() if k in fields and k not in defaulted})
    if schedule.beta_schedule not in ("scaled_linear", "linear"):
      raise ValueError(f"scheduler config: beta_schedule {schedule.beta_schedule!r} not supported; "
                       "expected 'scaled_linear' or 'linear'")
    if schedule.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"scheduler config: prediction_type {schedule.prediction_type!r} not "
                       "supported; expected 'epsilon' or 'v_prediction'")
    return schedule

  @classmethod
  def from_folder(cls, folder: str) -> "NoiseSchedule":
    path = os.path.join(folder, "scheduler_config.json")
    try:
      with open(path) as f:
        return cls.from_diffusers(json.load(f))
    except FileNotFoundError:
      raise FileNotFoundError(f"{folder}: no scheduler_config.json") from None

  def to_diffusers(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def save(self, folder: str, sampler_class: str = "EulerAncestralDiscreteScheduler") -> None:
    """folder/scheduler_config.json (diffusers'), naming the sampler class a pipeline uses."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
      json.dump({"_class_name": sampler_class, **self.to_diffusers()}, f, indent=2)

  def write_prediction_type(self, folder: str) -> None:
    """Sets folder/scheduler_config.json's prediction_type to this schedule's, keeping the file's
    other keys (a copied base pipeline's scheduler, under a UNet trained to another type)."""
    path = os.path.join(folder, "scheduler_config.json")
    with open(path) as f:
      config = json.load(f)
    config["prediction_type"] = self.prediction_type
    if "_use_default_values" in config:  # a key listed there is read as the class default
      config["_use_default_values"] = [k for k in config["_use_default_values"]
                                       if k != "prediction_type"]
    with open(path, "w") as f:
      json.dump(config, f, indent=2)

  def alphas_cumprod(self) -> np.ndarray:
    """(num_train_timesteps,) float32, computed in float32 as diffusers does."""
    n = self.num_train_timesteps
    if self.beta_schedule == "scaled_linear":
      betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2
    else:
      betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
    return np.cumprod(1.0 - betas, dtype=np.float32)


# timbrooks/instruct-pix2pix's scheduler: Euler ancestral over SD's scaled-linear betas.
IP2P_SCHEDULE = NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1)

# The models this repository trains from a preset (ShapesWorld's, the tiny ones): the same
# schedule, but DDIM/DDPM must not clip x0 to [-1, 1], diffusers' default for a config without
# clip_sample: latents are not images (SD's own scheduler config sets it false too). Clipped, the
# world's v-prediction IP2P sampled with DDIM lands at pixel L1 1.50 from the true edits (0.060
# unclipped, as with Euler).
PRESET_SCHEDULE = dataclasses.replace(IP2P_SCHEDULE, clip_sample=False)


def inference_timesteps(schedule: NoiseSchedule, num_steps: int, default_spacing: str) -> np.ndarray:
  """diffusers' `set_timesteps` timesteps (descending), as float32."""
  n = schedule.num_train_timesteps
  spacing = schedule.timestep_spacing or default_spacing
  if num_steps < 1 or num_steps > n:
    raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
  if spacing == "linspace":
    return np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1].copy()
  if spacing == "leading":
    ratio = n // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + schedule.steps_offset
  if spacing == "trailing":
    return np.arange(n, 0, -n / num_steps).round().astype(np.float32) - 1
  raise ValueError(f"timestep_spacing {spacing!r}; expected 'linspace', 'leading' or 'trailing'")


# ---------------------------------------------------------------------------------------------
# The diffusion identities every caller shares (samplers, the CEC edits, the training losses).
# `alpha` is alphas_cumprod at the step: a scalar, or per example (B,) via `alpha_at`.

def alpha_at(alphas_cumprod: jax.Array, timesteps: jax.Array, ndim: int = 4) -> jax.Array:
  """alphas_cumprod at integer training timesteps (B,), shaped (B, 1, ...) to broadcast over
  (B, ...) arrays of rank `ndim`. The gather clamps out-of-range timesteps silently: callers
  check their timestep range against alphas_cumprod.shape[0] before tracing."""
  return alphas_cumprod[timesteps].reshape((-1,) + (1,) * (ndim - 1))


def add_noise(alphas_cumprod: jax.Array, latents: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """Forward diffusion q(z_t | z_0) at integer training timesteps (B,): DDPM's `add_noise`,
  sqrt(a_t) * z_0 + sqrt(1 - a_t) * noise."""
  alpha = alpha_at(alphas_cumprod, timesteps, latents.ndim)
  return jnp.sqrt(alpha) * latents + jnp.sqrt(1 - alpha) * noise


def v_target(alpha: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity a v-prediction model is trained to output for z_t = sqrt(a) x0 + sqrt(1-a)
  noise: sqrt(a) * noise - sqrt(1 - a) * x0 (Salimans & Ho 2022; diffusers' `get_velocity`)."""
  return jnp.sqrt(alpha) * noise - jnp.sqrt(1 - alpha) * x0


def training_target(alpha: jax.Array, x0: jax.Array, noise: jax.Array,
                    prediction_type: str = "epsilon") -> jax.Array:
  """What a model of `prediction_type` should output for the noisy sample of (x0, noise)."""
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return v_target(alpha, x0, noise)
  raise ValueError(f"prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def predict_x0(alpha: jax.Array, sample: jax.Array, model_output: jax.Array,
               prediction_type: str = "epsilon") -> jax.Array:
  """The clean-latent (x0) prediction from a noisy sample at cumulative alpha `alpha`."""
  if prediction_type == "epsilon":
    return (sample - jnp.sqrt(1 - alpha) * model_output) / jnp.sqrt(alpha)
  if prediction_type == "v_prediction":
    return jnp.sqrt(alpha) * sample - jnp.sqrt(1 - alpha) * model_output
  raise ValueError(f"prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def predict_epsilon(alpha: jax.Array, sample: jax.Array, model_output: jax.Array,
                    prediction_type: str = "epsilon") -> jax.Array:
  """The noise (epsilon) prediction from a noisy sample at cumulative alpha `alpha`."""
  if prediction_type == "epsilon":
    return model_output
  if prediction_type == "v_prediction":
    return jnp.sqrt(alpha) * model_output + jnp.sqrt(1 - alpha) * sample
  raise ValueError(f"prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def ddim_renoise(alpha_prev: jax.Array, x0: jax.Array, eps: jax.Array,
                 std: jax.Array | float = 0.0) -> jax.Array:
  """DDIM's move to cumulative alpha `alpha_prev` (before its stochastic part `std * noise`):
  sqrt(a_prev) * x0 + sqrt(1 - a_prev - std^2) * eps."""
  return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev - std ** 2) * eps


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Per-step tables (arrays, traced) and the sampler's kind/settings (static).

  timesteps: (n,) float32, what the UNet receives at step i.
  sigmas: (n + 1,) Euler-family noise levels (sigma = sqrt((1 - a) / a)); zeros otherwise.
  alpha, alpha_prev: (n,) cumulative alphas at step i and at the step it moves to.
  """
  kind: str
  prediction_type: str
  eta: float
  clip_sample: float | None  # clip range for x0 (DDIM/DDPM), None = no clipping
  init_noise_sigma: float
  timesteps: jax.Array
  sigmas: jax.Array
  alpha: jax.Array
  alpha_prev: jax.Array

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]

  @property
  def stochastic(self) -> bool:
    return self.kind in ("euler_ancestral", "ddpm") or (self.kind == "ddim" and self.eta > 0)

  def scale_model_input(self, sample: jax.Array, i) -> jax.Array:
    if self.kind in ("euler", "euler_ancestral"):
      return sample / jnp.sqrt(self.sigmas[i] ** 2 + 1)
    return sample

  def predict_original(self, i, sample: jax.Array, model_output: jax.Array) -> jax.Array:
    """The x0 (clean latent) prediction at step i, as the sampler's own step computes it."""
    if self.kind in ("euler", "euler_ancestral"):
      sigma = self.sigmas[i]
      if self.prediction_type == "epsilon":
        return sample - sigma * model_output
      return model_output * (-sigma / jnp.sqrt(sigma ** 2 + 1)) + sample / (sigma ** 2 + 1)
    x0 = predict_x0(self.alpha[i], sample, model_output, self.prediction_type)
    if self.clip_sample is not None:
      x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
    return x0

  def step(self, i, sample: jax.Array, model_output: jax.Array,
           noise: jax.Array | None = None) -> jax.Array:
    """One denoising step from step i to i + 1; `noise` (same shape) for stochastic samplers."""
    if self.stochastic and noise is None:
      raise ValueError(f"the {self.kind} sampler (eta={self.eta}) needs a noise array")
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    x0 = self.predict_original(i, sample, model_output)
    if self.kind in ("euler", "euler_ancestral"):
      sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
      derivative = (sample - x0) / sigma
      if self.kind == "euler":
        return sample + derivative * (sigma_next - sigma)
      sigma_up = jnp.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
      sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
      return sample + derivative * (sigma_down - sigma) + noise * sigma_up
    alpha, alpha_prev = self.alpha[i], self.alpha_prev[i]
    if self.kind == "ddim":
      eps = predict_epsilon(alpha, sample, model_output, self.prediction_type)
      variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
      std = self.eta * jnp.sqrt(variance)
      prev = ddim_renoise(alpha_prev, x0, eps, std)
      return prev + std * noise if self.eta > 0 else prev
    # DDPM ("fixed_small" variance)
    current_alpha = alpha / alpha_prev
    current_beta = 1 - current_alpha
    mean = (jnp.sqrt(alpha_prev) * current_beta / (1 - alpha) * x0
            + jnp.sqrt(current_alpha) * (1 - alpha_prev) / (1 - alpha) * sample)
    variance = jnp.maximum((1 - alpha_prev) / (1 - alpha) * current_beta, 1e-20)
    is_last = self.timesteps[i] <= 0
    return mean + jnp.where(is_last, 0.0, jnp.sqrt(variance)) * noise


jax.tree_util.register_dataclass(
    Sampler, data_fields=["timesteps", "sigmas", "alpha", "alpha_prev"],
    meta_fields=["kind", "prediction_type", "eta", "clip_sample", "init_noise_sigma"])


def make_sampler(kind: str, schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0) -> Sampler:
  """Tables for `num_steps` steps of sampler `kind` (one of SAMPLERS) under `schedule`."""
  if kind not in SAMPLERS:
    raise ValueError(f"unknown sampler {kind!r}; expected one of {SAMPLERS}")
  if eta and kind != "ddim":
    raise ValueError(f"eta applies to the ddim sampler only (got eta={eta} for {kind})")
  alphas_cumprod = schedule.alphas_cumprod()
  n_train = schedule.num_train_timesteps
  if kind in ("euler", "euler_ancestral"):
    timesteps = inference_timesteps(schedule, num_steps, "linspace")
    train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = np.interp(timesteps, np.arange(n_train), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    spacing = schedule.timestep_spacing or "linspace"
    init = float(sigmas.max()) if spacing in ("linspace", "trailing") else float(
        np.sqrt(np.float32(sigmas.max()) ** 2 + 1))
    alpha = alpha_prev = np.zeros(num_steps, np.float32)
    clip = None
  else:
    # DDIM/DDPM index the training schedule, so their timesteps are integers (rounded).
    timesteps = inference_timesteps(schedule, num_steps, "leading").round()
    int_steps = timesteps.astype(np.int64)
    if kind == "ddim":
      prev_steps = int_steps - n_train // num_steps
    else:  # DDPM moves to the next listed timestep (-1 after the last)
      prev_steps = np.concatenate([int_steps[1:], [-1]])
    set_alpha_to_one = schedule.set_alpha_to_one in (None, True)
    final = np.float32(1.0) if kind == "ddpm" or set_alpha_to_one else alphas_cumprod[0]
    alpha = alphas_cumprod[int_steps]
    alpha_prev = np.where(prev_steps >= 0, alphas_cumprod[np.maximum(prev_steps, 0)], final)
    sigmas = np.zeros(num_steps + 1, np.float32)
    init = 1.0
    clip = schedule.clip_sample_range if schedule.clip_sample in (None, True) else None
  return Sampler(kind=kind, prediction_type=schedule.prediction_type, eta=float(eta),
                 clip_sample=clip, init_noise_sigma=init,
                 timesteps=jnp.asarray(timesteps, jnp.float32),
                 sigmas=jnp.asarray(sigmas, jnp.float32),
                 alpha=jnp.asarray(alpha, jnp.float32),
                 alpha_prev=jnp.asarray(alpha_prev, jnp.float32))
