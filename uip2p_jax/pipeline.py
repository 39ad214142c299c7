"""The jitted InstructPix2Pix edit: encode -> guided sampling -> decode, in one compiled call.

    pipe = EditPipeline.from_pretrained("timbrooks/instruct-pix2pix", dtype=jnp.bfloat16)
    edited = pipe.edit(images, ["make it snowy"], steps=20)   # (B, H, W, 3) in [-1, 1]

Guidance (shared/METHOD.md), with the three branches batched into one UNet call per step:
    eps = e(z, 0, 0) + s_I (e(z, c_I, 0) - e(z, 0, 0)) + s_T (e(z, c_I, c_T) - e(z, c_I, 0))
The compiled function is cached per (batch, resolution, steps, sampler); guidance scales and
seeds are traced values, so changing them never recompiles. Each example's noise comes from its
own seed, so an image edits the same whatever batch it is in.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageOps

from uip2p_jax import weights
from uip2p_jax.models import AutoencoderKL, CLIPTextTransformer, UNet2DConditionModel
from uip2p_jax.schedules import IP2P_SCHEDULE, NoiseSchedule, Sampler, make_sampler
from uip2p_jax.tokenizer import default_tokenizer, load_tokenizer, tokenize



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


@nnx.jit
def edit_latents(unet, vae, text_encoder, images, instruction_ids, empty_ids, sampler,
                 text_scale, image_scale, keys, initial_noise=None):
  """The whole edit as one jitted function.

  images: (B, H, W, 3) float32 in [-1, 1]; instruction_ids: (B, 77) int32; empty_ids: (1, 77);
  sampler: a `Sampler` (tables traced, kind static); keys: (B,) PRNG keys, one per example;
  initial_noise: optional (B, h, w, 4) standard-normal latents (else drawn from `keys`).
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
  latents = initial_noise * sampler.init_noise_sigma

  def denoise(i, latents):
    eps = guided_noise(unet, sampler, i, latents, image_latents, context, text_scale, image_scale)
    noise = None
    if sampler.stochastic:
      noise = _per_example_normal(jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys),
                                  latent_shape)
    return sampler.step(i, latents, eps, noise)

  latents = jax.lax.fori_loop(0, sampler.num_steps, denoise, latents)
  return jnp.clip(vae.decode(latents / vae.config.scaling_factor), -1.0, 1.0)


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
    if jax.device_count() > 1:  # replicate weights; batches are sharded over 'data'
      self._mesh = Mesh(np.array(jax.devices()), ("data",))
      replicated = NamedSharding(self._mesh, P())
      for module in (self.unet, self.vae, self.text_encoder):
        nnx.update(module, jax.device_put(nnx.state(module), replicated))

  @classmethod
  def from_pretrained(cls, path_or_repo: str, *, dtype=jnp.float32, param_dtype=None,
                      backend: str = "auto") -> "EditPipeline":
    """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ of a diffusers IP2P folder."""
    param_dtype = param_dtype or dtype
    unet = weights.load_unet(path_or_repo, dtype=dtype, param_dtype=param_dtype, backend=backend)
    vae = weights.load_vae(path_or_repo, dtype=dtype, param_dtype=param_dtype)
    text_encoder = weights.load_text_encoder(path_or_repo, dtype=dtype, param_dtype=param_dtype)
    tokenizer = load_tokenizer(path_or_repo)
    schedule = NoiseSchedule.from_folder(weights.resolve_folder(path_or_repo, "scheduler"))
    return cls(unet, vae, text_encoder, tokenizer, schedule)

  @classmethod
  def tiny_random(cls, seed: int = 0) -> "EditPipeline":
    """The embedded default: a tiny randomly initialised IP2P model (no download)."""
    from uip2p_jax.models.random_init import random_init
    from uip2p_jax.models.presets import TINY
    rngs = lambda: nnx.Rngs(0)
    return cls(random_init(lambda: UNet2DConditionModel(TINY.unet, rngs=rngs()), seed),
               random_init(lambda: AutoencoderKL(TINY.vae, rngs=rngs()), seed + 1),
               random_init(lambda: CLIPTextTransformer(TINY.text_encoder, rngs=rngs()), seed + 2),
               default_tokenizer())

  @property
  def size_multiple(self) -> int:
    """Image sides must be multiples of this (VAE factor x UNet downsampling)."""
    vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

  def edit(self, images, instructions: Sequence[str], *, steps: int = 20,
           text_scale: float = 7.5, image_scale: float = 1.5, seeds: int | Sequence[int] = 0,
           sampler: str = "euler_ancestral", eta: float = 0.0,
           initial_noise: np.ndarray | None = None) -> np.ndarray:
    """Edit (B, H, W, 3) images in [-1, 1] by B instructions; returns (B, H, W, 3) in [-1, 1].

    seeds: one int per example (or one int for all, offset by the example's index).
    """
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
                       f"{multiple}; use prepare_image()")
    if isinstance(seeds, int):
      seeds = [seeds + i for i in range(images.shape[0])]
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    instruction_ids = tokenize(self.tokenizer, instructions)
    empty_ids = tokenize(self.tokenizer, [""])
    table = make_sampler(sampler, self.schedule, steps, eta=eta)
    batch_args = [images, instruction_ids, keys]
    if initial_noise is not None:
      batch_args.append(np.asarray(initial_noise, np.float32))
    if self._mesh is not None and images.shape[0] % jax.device_count() == 0:
      sharding = NamedSharding(self._mesh, P("data"))
      batch_args = [jax.device_put(a, sharding) for a in batch_args]
    images_in, ids_in, keys_in, *noise_in = batch_args
    # Traced under the mesh, so the models keep the batch split (see partitioning.shard_batch).
    with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
      edited = edit_latents(self.unet, self.vae, self.text_encoder, images_in, ids_in,
                            empty_ids, table, jnp.float32(text_scale), jnp.float32(image_scale),
                            keys_in, *noise_in)
    return np.asarray(edited)


# ---------------------------------------------------------------------------------------------
# Image I/O at the edge: PIL <-> NHWC float in [-1, 1]
# ---------------------------------------------------------------------------------------------

def working_size(width: int, height: int, resolution: int, multiple: int = 64) -> tuple[int, int]:
  """(width, height) with aspect kept, the longest side at most `resolution`, both sides
  multiples of `multiple` (at least one multiple)."""
  if resolution < multiple:
    raise ValueError(f"resolution {resolution} is smaller than the size multiple {multiple}")
  scale = (resolution // multiple * multiple) / max(width, height)
  fit = lambda side: max(multiple, int(side * scale / multiple + 0.5) * multiple)
  return fit(width), fit(height)


def load_image(path: str | os.PathLike) -> Image.Image:
  """Open an image file as RGB, honouring EXIF orientation; alpha is composited on white."""
  try:
    with Image.open(path) as opened:
      image = ImageOps.exif_transpose(opened)
      image.load()
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such image file") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: unreadable image ({e})") from e
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image.convert("RGB")


def prepare_image(image: Image.Image, resolution: int, multiple: int = 64) -> np.ndarray:
  """PIL RGB -> (H, W, 3) float32 in [-1, 1] at the working size."""
  size = working_size(*image.size, resolution, multiple)
  if image.size != size:
    image = image.resize(size, Image.Resampling.LANCZOS)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def to_pil(image: np.ndarray) -> Image.Image:
  """(H, W, 3) in [-1, 1] -> PIL RGB."""
  return Image.fromarray(np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8))
