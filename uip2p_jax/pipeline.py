"""The jitted InstructPix2Pix edit: encode -> guided sampling -> decode, in one compiled call.

    pipe = EditPipeline.from_pretrained("timbrooks/instruct-pix2pix", dtype=jnp.bfloat16)
    edited = pipe.edit("photo.jpg", "make it snowy", steps=20)   # a PIL image (also takes PIL)
    edited = pipe.edit(images, ["make it snowy"], steps=20)   # (B, H, W, 3) in [-1, 1] arrays

Guidance (docs/method.md, section 1), with the three branches batched into one UNet call per step:
    eps = e(z, 0, 0) + s_I (e(z, c_I, 0) - e(z, 0, 0)) + s_T (e(z, c_I, c_T) - e(z, c_I, 0))
The compiled function is cached per (batch, resolution, steps, sampler); guidance scales and
seeds are traced values, so changing them never recompiles. Each example's noise comes from its
own seed, so an image edits the same whatever batch it is in. Image files and PIL images are
converted at the edge by `uip2p_jax.image_io` (`edit` takes them and returns PIL images).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from uip2p_jax import sharding
from uip2p_jax.image_io import prepare_image
from uip2p_jax.models import AutoencoderKL, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.schedules import IP2P_SCHEDULE, NoiseSchedule, Sampler, make_sampler
from uip2p_jax.tokenizer import tokenize


def guided_noise(unet: UNet2DConditionModel, sampler: Sampler, i, latents: jax.Array,
                 image_latents: jax.Array, context: jax.Array, text_scale, image_scale):
  """Dual classifier-free guidance with the three branches in one UNet call.

  latents: (B, h, w, 4); image_latents: (B, h, w, 4) unscaled VAE modes;
  context: (3B, T, D) = [instruction, "", ""] embeddings. Returns the guided (B, h, w, 4).
  """
  model_input = sampler.scale_model_input(latents, i)
  condition = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
  unet_input = jnp.concatenate([jnp.concatenate([model_input] * 3), condition], axis=-1)
  eps_text, eps_image, eps_uncond = jnp.split(unet(unet_input, sampler.timesteps[i], context), 3)
  return (eps_uncond + image_scale * (eps_image - eps_uncond)
          + text_scale * (eps_text - eps_image))


def _per_example_normal(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def noised_start(sampler: Sampler, x0: jax.Array, noise: jax.Array, start_step: int):
  """SDEdit's start: the (scaled) latents `x0` noised to the level of the sampler's step
  `start_step` (Euler's sigma, else DDPM's alpha)."""
  if sampler.kind in ("euler", "euler_ancestral"):
    return x0 + noise * sampler.sigmas[start_step]  # diffusers' Euler add_noise
  alpha = sampler.alpha[start_step]
  return jnp.sqrt(alpha) * x0 + jnp.sqrt(1 - alpha) * noise


@nnx.jit(static_argnames=("start_step",))
def edit_latents(unet, vae, text_encoder, images, instruction_ids, empty_ids, sampler,
                 text_scale, image_scale, keys, initial_noise=None, start_step=0):
  """The whole edit as one jitted function.

  images: (B, H, W, 3) float32 in [-1, 1]; instruction_ids: (B, 77) int32; empty_ids: (1, 77);
  sampler: a `Sampler` (tables traced, kind static); keys: (B,) PRNG keys, one per example;
  initial_noise: optional (B, h, w, 4) standard-normal latents (else drawn from `keys`).
  start_step: 0 (IP2P's) starts from pure noise; k > 0 starts from the input's latent noised to
  the level of the sampler's step k and runs the remaining steps (`EditPipeline.edit`'s
  `strength`).
  Returns edited images (B, H, W, 3) float32 in [-1, 1].
  """
  text = text_encoder(instruction_ids)[0]
  empty = jnp.broadcast_to(text_encoder(empty_ids)[0], text.shape)
  context = jnp.concatenate([text, empty, empty])
  image_latents = vae.encode(images).mode()
  latent_shape = image_latents.shape[1:]
  if initial_noise is None:
    initial_noise = _per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
                                        latent_shape)
  if start_step == 0:
    latents = initial_noise * sampler.init_noise_sigma
  else:
    latents = noised_start(sampler, image_latents * vae.config.scaling_factor, initial_noise,
                           start_step)

  def denoise(i, latents):
    eps = guided_noise(unet, sampler, i, latents, image_latents, context, text_scale, image_scale)
    noise = None
    if sampler.stochastic:
      noise = _per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys),
                                  latent_shape)
    return sampler.step(i, latents, eps, noise)

  latents = jax.lax.fori_loop(start_step, sampler.num_steps, denoise, latents)
  return jnp.clip(vae.decode(latents / vae.config.scaling_factor), -1.0, 1.0)


@nnx.jit(static_argnames=("start_step",))
def generate_latents(unet, vae, text_encoder, caption_ids, empty_ids, sampler, text_scale, keys,
                     images=None, start_step=0):
  """Text-to-image with classifier-free guidance (a 4-channel UNet), as one jitted function.

  caption_ids: (B, 77) int32; keys: (B,) PRNG keys. With `images` (B, H, W, 3) in [-1, 1] this
  is SDEdit: their latents are noised to the level of the sampler's step `start_step` (0: the
  first, noisiest step) and denoised from there with the caption.
  Returns (B, H, W, 3) float32 in [-1, 1] (H, W: `images`' or the VAE's sample size).
  """
  text = text_encoder(caption_ids)[0]
  context = jnp.concatenate([text, jnp.broadcast_to(text_encoder(empty_ids)[0], text.shape)])
  scaling = vae.config.scaling_factor
  if images is not None:
    x0 = vae.encode(images).mode() * scaling
  else:
    side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    x0 = jnp.zeros((caption_ids.shape[0], side, side, vae.config.latent_channels))
  shape = x0.shape[1:]
  noise = _per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys), shape)
  if images is None:
    latents = noise * sampler.init_noise_sigma
  else:
    latents = noised_start(sampler, x0, noise, start_step)

  def denoise(i, latents):
    model_input = jnp.concatenate([sampler.scale_model_input(latents, i)] * 2)
    eps_text, eps_uncond = jnp.split(unet(model_input, sampler.timesteps[i], context), 2)
    eps = eps_uncond + text_scale * (eps_text - eps_uncond)
    step_noise = None
    if sampler.stochastic:
      step_noise = _per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys),
                                       shape)
    return sampler.step(i, latents, eps, step_noise)

  latents = jax.lax.fori_loop(start_step, sampler.num_steps, denoise, latents)
  return jnp.clip(vae.decode(latents / scaling), -1.0, 1.0)


@dataclasses.dataclass
class EditPipeline:
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  tokenizer: object
  schedule: NoiseSchedule = IP2P_SCHEDULE

  def __post_init__(self):
    if self.unet.config.in_channels != 2 * self.vae.config.latent_channels:
      raise ValueError(f"an edit UNet takes noisy + image latents: in_channels must be "
                       f"{2 * self.vae.config.latent_channels}, got {self.unet.config.in_channels}")
    self._mesh = None
    if jax.device_count() > 1:  # replicate weights; batches are split over every device
      self._mesh = sharding.make_mesh(data=-1, fsdp=1)
      replicated = sharding.replicated(self._mesh)
      for module in (self.unet, self.vae, self.text_encoder):
        nnx.update(module, jax.device_put(nnx.state(module), replicated))

  @classmethod
  def from_models(cls, models) -> "EditPipeline":
    """From a `model_set.ModelSet` (its loss CLIP, if any, is not used)."""
    return cls(models.unet, models.vae, models.text_encoder, models.tokenizer, models.schedule)

  @classmethod
  def from_pretrained(cls, path_or_repo: str, *, dtype=jnp.float32, param_dtype=None,
                      backend: str = "auto", lora: str | None = None) -> "EditPipeline":
    """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers IP2P folder.
    `lora`: a LoRA file (or its folder: a LoRA run's export/lora) merged into the UNet: the
    file's float32 factors are added to the kernels in float32, the sum cast to the UNet's
    parameter dtype."""
    from uip2p_jax.model_set import build_models
    param_dtype = param_dtype or dtype
    models = build_models(
        pretrained=path_or_repo, compute_dtype=dtype, unet_param_dtype=param_dtype,
        frozen_dtype=dtype, frozen_param_dtype=param_dtype, attention_backend=backend)
    if lora:
      from uip2p_jax import weights
      from uip2p_jax.models.lora import merge_lora
      models.unet = merge_lora(weights.load_lora(models.unet, lora, factor_dtype=jnp.float32))
    return cls.from_models(models)

  @classmethod
  def tiny_random(cls, seed: int = 0) -> "EditPipeline":
    """The embedded tiny model (`--model tiny-random`): a tiny random IP2P model, no download."""
    from uip2p_jax.model_set import build_models
    return cls.from_models(build_models(preset="tiny", seed=seed))

  @property
  def size_multiple(self) -> int:
    """Image sides must be multiples of this (VAE factor x UNet downsampling)."""
    vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

  @property
  def working_multiple(self) -> int:
    """Sides of the working size PIL images and files are edited at are multiples of this:
    `size_multiple`, at least 64 (what `uip2p edit` uses)."""
    return max(64, self.size_multiple)

  def edit(self, images, instructions: str | Sequence[str], *, steps: int = 20,
           text_scale: float = 7.5, image_scale: float = 1.5, seeds: int | Sequence[int] = 0,
           sampler: str = "euler_ancestral", eta: float = 0.0,
           initial_noise: np.ndarray | None = None, resolution: int = 512,
           pad_to: int | None = None, strength: float = 1.0):
    """Edit B images by B instructions.

    images: either
    - (B, H, W, 3) in [-1, 1] with sides multiples of `size_multiple`: returns (B, H, W, 3)
      float32 in [-1, 1];
    - PIL images or image file paths, one or a list (diffusers' habit): each is edited at its
      working size (aspect kept, longest side `resolution`, sides multiples of
      `working_multiple`: `uip2p edit`'s sizes; images of several sizes run in one batch per
      size) and returned as a PIL image of that size, one or a list as given.
    instructions: one per image (a str for a single image).
    seeds: one int per example (or one int for all, offset by the example's index).
    pad_to: run a batch of this size (the first example repeated), so that every batch of a
    loop compiles once; the padding is dropped from the result. PIL images or paths of one
    working size are run in batches of at most `pad_to`.
    strength: 1 (IP2P's) samples from pure noise; s < 1 starts from the input's latent noised
    to the level of step round(steps x (1 - s)) and runs only the remaining steps (SDEdit's
    start: what is not edited starts where it is).
    """
    if isinstance(instructions, str):
      instructions = [instructions]
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength {strength}; expected a fraction in (0, 1]")
    start_step = int(round(steps * (1.0 - strength)))
    if start_step >= steps:
      raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; "
                       f"expected at least {1 / steps:.3g}")
    options = dict(steps=steps, text_scale=text_scale, image_scale=image_scale, sampler=sampler,
                   eta=eta, pad_to=pad_to, start_step=start_step)
    if _is_image_input(images):
      single = not isinstance(images, (list, tuple))
      edited = self._edit_images([images] if single else list(images), list(instructions),
                                 seeds, initial_noise, resolution, options)
      return edited[0] if single else edited
    return self._edit_arrays(images, instructions, seeds=seeds, initial_noise=initial_noise,
                             **options)

  def _edit_images(self, images: list, instructions: list[str], seeds, initial_noise,
                   resolution: int, options: dict) -> list[Image.Image]:
    """PIL images or paths -> edited PIL images at their working sizes, in order."""
    from uip2p_jax.image_io import load_image, to_pil, to_rgb
    if len(instructions) != len(images):
      raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    pils = [to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
            for image in images]
    prepared = [prepare_image(image, resolution, self.working_multiple) for image in pils]
    seeds = [seeds + i for i in range(len(images))] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(images):
      raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    out: list[Image.Image | None] = [None] * len(images)
    for chunk in batches_by_size([p.shape for p in prepared], options["pad_to"] or len(images)):
      noise = None if initial_noise is None else np.asarray(initial_noise)[chunk]
      edited = self._edit_arrays(np.stack([prepared[i] for i in chunk]),
                                 [instructions[i] for i in chunk],
                                 seeds=[seeds[i] for i in chunk], initial_noise=noise, **options)
      for i, image in zip(chunk, edited):
        out[i] = to_pil(image)
    return out

  def _edit_arrays(self, images, instructions: Sequence[str], *, steps: int, text_scale: float,
                   image_scale: float, seeds, sampler: str, eta: float, initial_noise,
                   pad_to: int | None, start_step: int = 0) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (batch, height, width, 3), got {images.shape}")
    if len(instructions) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
    for text in instructions:
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty instruction {text!r}: an edit needs an instruction")
    multiple = self.size_multiple
    if images.shape[1] % multiple or images.shape[2] % multiple:
      raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of "
                       f"{multiple}; use image_io.prepare_image()")
    count = images.shape[0]
    if isinstance(seeds, int):
      seeds = [seeds + i for i in range(count)]
    seeds, instructions = list(seeds), list(instructions)
    if len(seeds) != count:
      raise ValueError(f"{count} images but {len(seeds)} seeds")
    if pad_to is not None and pad_to > count:
      extra = pad_to - count
      images = np.concatenate([images, np.repeat(images[:1], extra, axis=0)])
      instructions, seeds = instructions + instructions[:1] * extra, seeds + seeds[:1] * extra
      if initial_noise is not None:
        initial_noise = np.concatenate([initial_noise, np.repeat(initial_noise[:1], extra, 0)])
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    instruction_ids = tokenize(self.tokenizer, instructions)
    empty_ids = tokenize(self.tokenizer, [""])
    table = make_sampler(sampler, self.schedule, steps, eta=eta)
    batch_args = [images, instruction_ids, keys]
    if initial_noise is not None:
      batch_args.append(np.asarray(initial_noise, np.float32))
    if self._mesh is not None and images.shape[0] % jax.device_count() == 0:
      batch_args = [jax.device_put(a, sharding.batch_sharding(self._mesh)) for a in batch_args]
    images_in, ids_in, keys_in, *noise_in = batch_args
    # Traced under the mesh, so the models keep the batch split (see partitioning.shard_batch).
    with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
      edited = edit_latents(self.unet, self.vae, self.text_encoder, images_in, ids_in,
                            empty_ids, table, jnp.float32(text_scale), jnp.float32(image_scale),
                            keys_in, *noise_in, start_step=start_step)
    return np.asarray(edited)[:count]


def _is_image_input(images) -> bool:
  """A PIL image or a path, or a non-empty list of them (not arrays)."""
  one = lambda x: isinstance(x, (Image.Image, str, os.PathLike))
  if isinstance(images, (list, tuple)):
    return bool(images) and all(one(x) for x in images)
  return one(images)


def batches_by_size(sizes: Sequence[tuple], batch_size: int) -> list[list[int]]:
  """Indices of same-size images, in first-seen order, in chunks of at most `batch_size`.

  Run each chunk with `EditPipeline.edit(..., pad_to=batch_size)`: every working size then
  compiles once, whatever the mix of sizes and the length of the last chunk."""
  if batch_size < 1:
    raise ValueError(f"batch size {batch_size}; expected at least 1")
  by_size: dict[tuple, list[int]] = {}
  for index, size in enumerate(sizes):
    by_size.setdefault(tuple(size), []).append(index)
  return [indices[start:start + batch_size] for indices in by_size.values()
          for start in range(0, len(indices), batch_size)]
