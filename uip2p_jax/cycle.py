"""One Cycle Edit Consistency step: forward edit, reverse edit, decode, CLIP, the four losses.

Pure functions over NNX modules (merged from parameters inside the caller's jit). Only the UNet
is meant to be differentiated; the VAE and the CLIPs are frozen but gradients flow *through*
them (decode and image embedding of the edited and reconstructed images). METHOD.md section 2
is the specification; every choice it calls a default is a field of `CycleConfig`/`LossConfig`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from uip2p_jax import losses
from uip2p_jax.models import AttentionCapture, AutoencoderKL, CLIPModel, CLIPTextTransformer
from uip2p_jax.models import UNet2DConditionModel

LOSS_NAMES = ("clip", "sim", "attn", "recon")


@dataclasses.dataclass(frozen=True)
class CycleConfig:
  start: str = "noised_input"        # "noised_input": z_x noised at t; "noise": pure noise, t = T-1
  num_steps: tuple[int, int] = (1, 1)  # K, inclusive range; K is drawn per step when lo < hi
  timesteps: tuple[int, int] = (0, 1000)  # t ~ U{lo, ..., hi - 1} per example ("noised_input")
  share_noise: bool = True           # the reverse edit reuses the forward edit's noise
  reencode: bool = False             # reverse condition: E(D(z_e)).mode() instead of z_e / 0.18215
  attention_resolution: int = 16     # feature-map height whose cross-attention L_attn compares
  conditioning_dropout: float = 0.0  # IP2P's dropout per pass (0 keeps every edit conditioned)

  def __post_init__(self):
    if self.start not in ("noised_input", "noise"):
      raise ValueError(f"cycle.start {self.start!r}; expected 'noised_input' or 'noise'")
    lo, hi = self.num_steps
    if not 1 <= lo <= hi:
      raise ValueError(f"cycle.num_steps {self.num_steps}: need 1 <= min <= max")
    if not 0 <= self.timesteps[0] < self.timesteps[1]:
      raise ValueError(f"cycle.timesteps {self.timesteps}: need 0 <= lo < hi")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  clip: float = 1.0
  sim: float = 1.0
  attn: float = 1.0
  recon: float = 1.0
  sim_kind: str = "reconstruction"   # 1 - cos(E_I(x_r), E_I(x)); "edit_text": E_I(x_e) vs E_T(c_out)
  recon_kind: str = "l1"             # "l1" | "l2" in pixels, "latent": mean |z_r - z_x|

  def __post_init__(self):
    if self.sim_kind not in ("reconstruction", "edit_text"):
      raise ValueError(f"loss.sim_kind {self.sim_kind!r}; expected 'reconstruction' or "
                       "'edit_text'")
    if self.recon_kind not in ("l1", "l2", "latent"):
      raise ValueError(f"loss.recon_kind {self.recon_kind!r}; expected 'l1', 'l2' or 'latent'")
    weights = self.weights
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
      raise ValueError(f"loss weights {weights} must be >= 0 with at least one > 0")

  @property
  def weights(self) -> dict[str, float]:
    return {name: getattr(self, name) for name in LOSS_NAMES}


def _ddim_denoise(unet, alphas_cumprod, latents, image_latents, context, timesteps, num_steps,
                  capture):
  """K deterministic DDIM steps from per-example `timesteps` (B,) to 0; returns the final x0
  prediction and the cross-attention captured in the first UNet call."""
  captures = None
  x0 = latents
  for k in range(num_steps):
    t = jnp.floor(timesteps * (num_steps - k) / num_steps).astype(jnp.int32)
    t_next = jnp.floor(timesteps * (num_steps - k - 1) / num_steps).astype(jnp.int32)
    unet_input = jnp.concatenate([latents, image_latents], axis=-1)
    if k == 0 and capture is not None:
      eps, captures = unet(unet_input, t, context, capture=capture)
    else:
      eps = unet(unet_input, t, context)
      captures = {} if k == 0 else captures
    alpha = alphas_cumprod[t][:, None, None, None]
    x0 = (latents - jnp.sqrt(1 - alpha) * eps) / jnp.sqrt(alpha)
    if k < num_steps - 1:
      alpha_next = alphas_cumprod[t_next][:, None, None, None]
      latents = jnp.sqrt(alpha_next) * x0 + jnp.sqrt(1 - alpha_next) * eps
  return x0, captures


def edit_with_k_steps(unet, alphas_cumprod, latents, image_latents, context, timesteps, key,
                      config: CycleConfig, capture):
  """The forward or reverse edit; K fixed, or drawn from `key` and run with `lax.switch` (one
  compiled branch per K, no recompilation between steps)."""
  lo, hi = config.num_steps
  branches = [lambda args, k=k: _ddim_denoise(unet, alphas_cumprod, *args, num_steps=k,
                                              capture=capture)
              for k in range(lo, hi + 1)]
  args = (latents, image_latents, context, timesteps)
  if lo == hi:
    return branches[0](args)
  index = jax.random.randint(key, (), 0, hi - lo + 1)
  return jax.lax.switch(index, branches, args)


def _one_call(fn, batches: list[jax.Array]) -> list[jax.Array]:
  """`fn` applied to several equally shaped batches in one call, one output per batch.

  The call sees the examples interleaved (example 0 of every batch, then example 1, ...), so a
  batch split over devices stays split: concatenating along axis 0 instead would move examples
  between devices, and XLA resolves that by running the whole call, unsplit, on every device.
  """
  size, count = batches[0].shape[0], len(batches)
  stacked = jnp.stack(batches, axis=1)
  out = fn(stacked.reshape(size * count, *stacked.shape[2:]))
  out = out.reshape(size, count, *out.shape[1:])
  return [out[:, i] for i in range(count)]


def cycle_losses(unet: UNet2DConditionModel, vae: AutoencoderKL,
                 text_encoder: CLIPTextTransformer, clip: CLIPModel, batch: dict[str, jax.Array],
                 key: jax.Array, alphas_cumprod: jax.Array, cycle: CycleConfig, loss: LossConfig):
  """The weighted CEC loss of a batch and its metrics.

  batch: image (B, H, W, 3) in [-1, 1]; input_caption_ids, instruction_ids, edited_caption_ids,
  reverse_instruction_ids (B, 77) int32. alphas_cumprod: (T,) float32 training schedule.
  Returns (scalar loss, {name: scalar}): each computed loss, its weighted total and, when L_clip
  is computed, the CLIP direction similarity. A zero-weight loss is not computed at all.
  """
  weights = loss.weights
  active = {name for name, w in weights.items() if w > 0}
  scaling = vae.config.scaling_factor
  image = batch["image"]
  batch_size = image.shape[0]
  keys = dict(zip(("posterior", "t", "noise", "noise_r", "k", "k_r", "drop_f", "drop_r"),
                  jax.random.split(key, 8)))

  # Frozen encoders: no gradient needed through any of these.
  posterior = vae.encode(image)
  image_latent = jax.lax.stop_gradient(posterior.mode())                      # c_x, unscaled
  input_latent = jax.lax.stop_gradient(posterior.sample(keys["posterior"]) * scaling)  # z_x
  forward_text = jax.lax.stop_gradient(text_encoder(batch["instruction_ids"])[0])
  reverse_text = jax.lax.stop_gradient(text_encoder(batch["reverse_instruction_ids"])[0])

  if cycle.start == "noise":
    timesteps = jnp.full((batch_size,), alphas_cumprod.shape[0] - 1, jnp.int32)
  else:
    timesteps = jax.random.randint(keys["t"], (batch_size,), *cycle.timesteps)
  noise = jax.random.normal(keys["noise"], input_latent.shape)
  reverse_noise = noise if cycle.share_noise else jax.random.normal(keys["noise_r"], noise.shape)

  def start_latent(clean, eps):
    if cycle.start == "noise":
      return eps
    alpha = alphas_cumprod[timesteps][:, None, None, None]
    return jnp.sqrt(alpha) * clean + jnp.sqrt(1 - alpha) * eps

  if cycle.conditioning_dropout > 0:
    empty = jax.lax.stop_gradient(text_encoder(jnp.asarray(_EMPTY_IDS))[0])
    forward_text, forward_condition = losses.conditioning_dropout(
        keys["drop_f"], forward_text, empty[0], image_latent, cycle.conditioning_dropout)
  else:
    forward_condition = image_latent
  capture = AttentionCapture(resolutions=(cycle.attention_resolution,)) if "attn" in active \
      else None

  # Forward edit: (z_t, c_x, T_f) -> z_e.
  edited_latent, forward_maps = edit_with_k_steps(
      unet, alphas_cumprod, start_latent(input_latent, noise), forward_condition, forward_text,
      timesteps, keys["k"], cycle, capture)
  if capture is not None and not forward_maps:
    raise ValueError(
        f"cycle.attention_resolution={cycle.attention_resolution}: no cross-attention layer of "
        f"this UNet sees a {cycle.attention_resolution}x{cycle.attention_resolution} feature map "
        f"with {input_latent.shape[1]}x{input_latent.shape[2]} latents (each down block halves "
        f"it); pick a resolution the UNet has at this image size, or set loss.attn=0")
  # Reverse edit: (z_e noised with the same t, its own latent as condition, T_r) -> z_r.
  if cycle.reencode:
    reverse_condition = vae.encode(vae.decode(edited_latent / scaling)).mode()
  else:
    reverse_condition = edited_latent / scaling
  if cycle.conditioning_dropout > 0:
    reverse_text, reverse_condition = losses.conditioning_dropout(
        keys["drop_r"], reverse_text, empty[0], reverse_condition, cycle.conditioning_dropout)
  reconstructed_latent, reverse_maps = edit_with_k_steps(
      unet, alphas_cumprod, start_latent(edited_latent, reverse_noise), reverse_condition,
      reverse_text, timesteps, keys["k_r"], cycle, capture)

  need_edited_image = "clip" in active or ("sim" in active and loss.sim_kind == "edit_text")
  need_reconstruction = (("recon" in active and loss.recon_kind != "latent")
                         or ("sim" in active and loss.sim_kind == "reconstruction"))
  to_decode = ([edited_latent] if need_edited_image else []) + (
      [reconstructed_latent] if need_reconstruction else [])
  decoded = {}
  if to_decode:  # one batched decode through the frozen VAE (differentiable)
    images = _one_call(lambda z: vae.decode(z / scaling), to_decode)
    names = (["edited"] if need_edited_image else []) + (["reconstructed"]
                                                         if need_reconstruction else [])
    decoded = dict(zip(names, images))

  need_clip_images = "clip" in active or "sim" in active
  embeddings = {}
  if need_clip_images:
    clip_inputs = {"input": image}
    if need_edited_image:
      clip_inputs["edited"] = decoded["edited"]
    if "sim" in active and loss.sim_kind == "reconstruction":
      clip_inputs["reconstructed"] = decoded["reconstructed"]
    embeddings = dict(zip(clip_inputs, _one_call(clip.embed_images, list(clip_inputs.values()))))
    embeddings["input"] = jax.lax.stop_gradient(embeddings["input"])
  if "clip" in active or ("sim" in active and loss.sim_kind == "edit_text"):
    captions = _one_call(clip.embed_texts, [batch["input_caption_ids"],
                                            batch["edited_caption_ids"]])
    embeddings["input_caption"], embeddings["edited_caption"] = map(jax.lax.stop_gradient,
                                                                    captions)

  per_example = {}
  metrics = {}
  if "clip" in active:
    per_example["clip"] = losses.clip_direction_loss(
        embeddings["edited"], embeddings["input"], embeddings["edited_caption"],
        embeddings["input_caption"])
    metrics["clip_direction_similarity"] = jnp.mean(1.0 - per_example["clip"])
  if "sim" in active:
    if loss.sim_kind == "reconstruction":
      per_example["sim"] = losses.similarity_loss(embeddings["reconstructed"],
                                                  embeddings["input"])
    else:
      per_example["sim"] = losses.similarity_loss(embeddings["edited"],
                                                  embeddings["edited_caption"])
  if "attn" in active:
    forward_map = losses.attention_map(
        forward_maps, losses.instruction_token_mask(batch["instruction_ids"]))
    reverse_map = losses.attention_map(
        reverse_maps, losses.instruction_token_mask(batch["reverse_instruction_ids"]))
    per_example["attn"] = losses.attention_loss(forward_map, reverse_map)
  if "recon" in active:
    if loss.recon_kind == "latent":
      per_example["recon"] = jnp.mean(jnp.abs(reconstructed_latent - input_latent),
                                      axis=(1, 2, 3))
    else:
      per_example["recon"] = losses.reconstruction_loss(decoded["reconstructed"], image,
                                                        loss.recon_kind)
  total = losses.weighted_total(per_example, {k: weights[k] for k in per_example})
  metrics.update({f"loss_{name}": jnp.mean(value) for name, value in per_example.items()})
  metrics["loss"] = total
  return total, metrics


# CLIP ids of "" (BOS, EOS, padding with EOS): the unconditional text of conditioning dropout.
_EMPTY_IDS = [[49406] + [49407] * 76]


def ip2p_losses(unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextTransformer, batch: dict[str, jax.Array], key: jax.Array,
                alphas_cumprod: jax.Array, conditioning_dropout: float = 0.05):
  """The supervised InstructPix2Pix loss (the baseline): noise MSE on the noised *edited*
  latent, conditioned on the input image's latent and the instruction, with IP2P's dropout.

  batch: image, edited_image (B, H, W, 3) in [-1, 1]; instruction_ids (B, 77).
  """
  keys = jax.random.split(key, 4)
  scaling = vae.config.scaling_factor
  image_latent = jax.lax.stop_gradient(vae.encode(batch["image"]).mode())
  target_latent = jax.lax.stop_gradient(vae.encode(batch["edited_image"]).sample(keys[0])
                                        * scaling)
  text = jax.lax.stop_gradient(text_encoder(batch["instruction_ids"])[0])
  empty = jax.lax.stop_gradient(text_encoder(jnp.asarray(_EMPTY_IDS))[0])
  text, image_latent = losses.conditioning_dropout(keys[1], text, empty[0], image_latent,
                                                   conditioning_dropout)
  timesteps = jax.random.randint(keys[2], (target_latent.shape[0],), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(keys[3], target_latent.shape)
  alpha = alphas_cumprod[timesteps][:, None, None, None]
  noisy = jnp.sqrt(alpha) * target_latent + jnp.sqrt(1 - alpha) * noise
  prediction = unet(jnp.concatenate([noisy, image_latent], axis=-1), timesteps, text)
  value = losses.ip2p_loss(prediction, noise)
  return value, {"loss": value, "loss_ip2p": value}


__all__ = ["CycleConfig", "LOSS_NAMES", "LossConfig", "cycle_losses", "edit_with_k_steps",
           "ip2p_losses"]
