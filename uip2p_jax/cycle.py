"""One Cycle Edit Consistency step: forward edit, reverse edit, decode, CLIP, the four losses.

Pure functions over NNX modules (merged from parameters inside the caller's jit). Only the UNet
is meant to be differentiated; the VAE and the CLIPs are frozen but gradients flow *through*
them (decode and image embedding of the edited and reconstructed images). docs/method.md
(section 2) is the specification; every choice it calls a default is a field of
`CycleConfig`/`LossConfig`.

Choices this module makes on purpose (each tested in tests/test_cycle_switches.py):
- No classifier-free guidance inside the training edits: every denoising step is one
  conditional UNet call on (image condition, instruction), the paper's single-prediction edit;
  guidance (three branches, `pipeline.py`) is for inference only. A guided training edit would
  triple the UNet cost of the step, so there is no switch for it.
- K (the DDIM steps of an edit) is drawn once per training step, shared by the whole batch
  (`CycleConfig.same_k` decides whether the reverse edit reuses it).
- Decoded images are clamped to [-1, 1] like the pipeline's output, straight-through
  (`CycleConfig.clamp_decoded`).
- The latent L_recon (`LossConfig.recon_kind="latent"`) compares z_r with the deterministic
  latent 0.18215 * E(x).mode(), not with the sampled z_x the forward edit starts from: the
  target carries no posterior noise the reverse edit could not know.
- The unconditional text ("") of conditioning dropout and the instruction tokens of L_attn
  come from the run's tokenizer: callers pass `empty_ids`, the ids of "".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from uip2p_jax import losses, schedules
from uip2p_jax.models import AttentionCapture, AutoencoderKL, CLIPModel, CLIPTextTransformer
from uip2p_jax.models import UNet2DConditionModel

LOSS_NAMES = ("clip", "sim", "attn", "recon", "keep")
IP2P_LOSS_WEIGHTINGS = ("epsilon", "v")


def _check_type(section: str, name: str, value, kinds: tuple[type, ...]) -> None:
  # bool is an int in Python: True given for a number (or 1 for a bool) is a config typo.
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise TypeError(f"{section}.{name}={value!r} ({type(value).__name__}); expected "
                    f"{' or '.join(k.__name__ for k in kinds)}")


_FIELD_TYPES = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}


@dataclasses.dataclass(frozen=True)
class CycleConfig:
  """How the two edits of a CEC step run. The fields are exactly the keys of an experiment's
  `cycle` section: the trainer builds `CycleConfig(**config.cycle)`.

  start: "noised_input": each edit starts from its latent noised at t (z_x for the forward edit,
    z_e for the reverse one); "noise": from pure noise at t = T - 1, the last training timestep
    (timestep_min/max are then unused).
  num_steps_min, num_steps_max: K, the DDIM steps of an edit, an inclusive range. K is drawn
    once per training step and shared by the whole batch (not per example): `lax.switch` runs
    one compiled branch per K, so a range never recompiles.
  timestep_min, timestep_max: t ~ U{min, ..., max - 1} per example (max exclusive); `cycle_losses`
    refuses a max beyond the noise schedule's length.
  share_noise: the reverse edit reuses the forward edit's noise (its t is always the forward t).
  same_k: the reverse edit runs the forward edit's K. Default true: the reverse edit mirrors the
    forward one (same t and, by default, the same noise), so the two halves of the cycle differ
    only in their conditions; an independent K would add variance to L_recon/L_sim that says
    nothing about whether the edit is reversible. No effect when min == max.
  reencode: the reverse edit's image condition is E(x_e).mode() of the decoded (and clamped)
    edited image, reusing the decode the losses use, instead of z_e / 0.18215.
  clamp_decoded: decoded images are clamped to [-1, 1], as the pipeline's output is, before
    CLIP, L_recon and the re-encode. The clamp is straight-through (the value is clamped, the
    gradient passes as if it were not): a hard clip gives an out-of-range pixel zero gradient,
    so an L1 error at 1.3 against a target of 0.5 could never be pulled back.
  attention_select: which cross-attention layers L_attn compares. "resolution": the layers whose
    feature map has height `attention_resolution`, an absolute size (16 is SD 1.5's level 1 at
    256 px but its level 2 at 512 px); "level": the layers of UNet level `attention_level`
    (0 = the latent's own size, 1 = /2, 2 = /4, ...: down block i, the up block and, for the
    last level, the mid block at that size), the same blocks at any image size. Default
    "resolution" with 16 for a bare CycleConfig; the experiments (experiments/common.py) use
    "level" 1 (16x16 at 256 px and 32x32 at 512 px for SD 1.5), smoke level 0 (the tiny UNet's
    8x8 latent at 64 px).
  conditioning_dropout: IP2P's per-example dropout (text only, both, image only: each with
    this probability, so at most 1/3), drawn independently for each edit; 0 keeps every edit
    conditioned.
  noise_offset: the std of a per-example, per-channel constant added to the edits' noise
    (`offset_noise`; 0: plain noise).
  """
  start: str = "noised_input"
  num_steps_min: int = 1
  num_steps_max: int = 1
  timestep_min: int = 0
  timestep_max: int = 1000
  share_noise: bool = True
  same_k: bool = True
  reencode: bool = False
  clamp_decoded: bool = True
  attention_select: str = "resolution"
  attention_resolution: int = 16
  attention_level: int = 1
  conditioning_dropout: float = 0.0
  noise_offset: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      _check_type("cycle", field.name, getattr(self, field.name), _FIELD_TYPES[field.type])
    if self.start not in ("noised_input", "noise"):
      raise ValueError(f"cycle.start {self.start!r}; expected 'noised_input' or 'noise'")
    if not 1 <= self.num_steps_min <= self.num_steps_max:
      raise ValueError(f"cycle.num_steps_min={self.num_steps_min}, num_steps_max="
                       f"{self.num_steps_max}: need 1 <= num_steps_min <= num_steps_max")
    if not 0 <= self.timestep_min < self.timestep_max:
      raise ValueError(f"cycle.timestep_min={self.timestep_min}, timestep_max="
                       f"{self.timestep_max}: need 0 <= timestep_min < timestep_max (max is "
                       "exclusive)")
    if self.attention_select not in ("resolution", "level"):
      raise ValueError(f"cycle.attention_select {self.attention_select!r}; expected "
                       "'resolution' or 'level'")
    if self.attention_resolution < 1:
      raise ValueError(f"cycle.attention_resolution={self.attention_resolution}; expected a "
                       "feature-map height >= 1")
    if self.attention_level < 0:
      raise ValueError(f"cycle.attention_level={self.attention_level}; expected a UNet level "
                       ">= 0 (0 = the latent's own size)")
    if self.noise_offset < 0:
      raise ValueError(f"cycle.noise_offset={self.noise_offset}; expected >= 0 (the std of the "
                       "per-channel constant added to the noise)")
    if not 0.0 <= self.conditioning_dropout <= 1.0 / 3.0:
      raise ValueError(f"cycle.conditioning_dropout={self.conditioning_dropout}; expected a "
                       "probability in [0, 1/3] (text, both and image are each dropped with it)")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The CEC loss weights and variants; fields are exactly an experiment's `loss` keys
  (`LossConfig(**config.loss)`). A weight of 0 skips computing that term.

  sim_kind: "reconstruction": 1 - cos(E_I(x_r), E_I(x)); "edit_text": 1 - cos(E_I(x_e), E_T(c_out)).
  recon_kind: "l1" | "l2" in pixels (decoded x_r vs x); "latent": mean |z_r - 0.18215 E(x).mode()|.
  keep: not the paper's (0 = off, the default): mean |z_e - 0.18215 E(x).mode()|, the forward
    edit's latent distance to its input, scoring what the edit keeps where L_sim and L_recon
    score only the cycle's return (docs/method.md, "L_keep"). keep_fraction in (0, 1]: the
    mean runs over that fraction of latent positions, those that changed least
    (`losses.latent_l1`); 1 = every position.
  clip_reference: where L_clip's image direction starts. "input" (the paper's): E_I(x_e) - E_I(x).
    "null_edit" (ours): E_I(x_e) - E_I(x_0), x_0 the same edit (same start, t, noise, K) made with
    the empty instruction, no gradient: the blur a one-call x0 adds is in both ends, so the
    direction holds what the instruction changed (docs/method.md, "L_clip's reference").
  clip_floor (ours, 0 = the paper's cosine): L_clip's image direction is divided by
    max(|d|, clip_floor), bounding its gradient for changes shorter than the floor
    (`losses.clip_direction_similarity`).
  """
  clip: float = 1.0
  sim: float = 1.0
  attn: float = 1.0
  recon: float = 1.0
  keep: float = 0.0
  keep_fraction: float = 1.0
  clip_reference: str = "input"
  clip_floor: float = 0.0
  sim_kind: str = "reconstruction"
  recon_kind: str = "l1"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      _check_type("loss", field.name, getattr(self, field.name), _FIELD_TYPES[field.type])
    if self.sim_kind not in ("reconstruction", "edit_text"):
      raise ValueError(f"loss.sim_kind {self.sim_kind!r}; expected 'reconstruction' or "
                       "'edit_text'")
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f"loss.keep_fraction={self.keep_fraction}; expected a fraction of the "
                       "latent positions in (0, 1]")
    if self.clip_floor < 0:
      raise ValueError(f"loss.clip_floor={self.clip_floor}; expected >= 0 (a floor on the CLIP "
                       "image direction's norm, 0 = none)")
    if self.clip_reference not in ("input", "null_edit"):
      raise ValueError(f"loss.clip_reference {self.clip_reference!r}; expected 'input' or "
                       "'null_edit'")
    if self.recon_kind not in ("l1", "l2", "latent"):
      raise ValueError(f"loss.recon_kind {self.recon_kind!r}; expected 'l1', 'l2' or 'latent'")
    weights = self.weights
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
      raise ValueError(f"loss weights {weights} must be >= 0 with at least one > 0")

  @property
  def weights(self) -> dict[str, float]:
    return {name: getattr(self, name) for name in LOSS_NAMES}


def attention_resolution(cycle: CycleConfig, latent_size: int, num_levels: int) -> int:
  """The feature-map height whose cross-attention L_attn compares, for latents of height
  `latent_size` and a UNet with `num_levels` levels (len(block_out_channels))."""
  if cycle.attention_select == "resolution":
    return cycle.attention_resolution
  if cycle.attention_level >= num_levels:
    raise ValueError(f"cycle.attention_level={cycle.attention_level}: this UNet has "
                     f"{num_levels} levels (0 to {num_levels - 1})")
  size = latent_size
  for _ in range(cycle.attention_level):
    size = (size + 1) // 2  # a down block's stride-2 conv (padding 1) halves, rounding up
  return size


def _ddim_denoise(unet, alphas_cumprod, latents, image_latents, context, timesteps, num_steps,
                  capture, prediction_type="epsilon"):
  """K deterministic DDIM steps from per-example `timesteps` (B,) to 0, the UNet's output read
  as `prediction_type`; returns the final x0 prediction and the cross-attention captured in the
  first UNet call."""
  captures = None
  x0 = latents
  for k in range(num_steps):
    t = jnp.floor(timesteps * (num_steps - k) / num_steps).astype(jnp.int32)
    t_next = jnp.floor(timesteps * (num_steps - k - 1) / num_steps).astype(jnp.int32)
    unet_input = jnp.concatenate([latents, image_latents], axis=-1)
    if k == 0 and capture is not None:
      output, captures = unet(unet_input, t, context, capture=capture)
    else:
      output = unet(unet_input, t, context)
      captures = {} if k == 0 else captures
    alpha = schedules.alpha_at(alphas_cumprod, t)
    x0 = schedules.predict_x0(alpha, latents, output, prediction_type)
    if k < num_steps - 1:
      eps = schedules.predict_epsilon(alpha, latents, output, prediction_type)
      latents = schedules.ddim_renoise(schedules.alpha_at(alphas_cumprod, t_next), x0, eps)
  return x0, captures


def edit_with_k_steps(unet, alphas_cumprod, latents, image_latents, context, timesteps, key,
                      config: CycleConfig, capture, prediction_type: str = "epsilon"):
  """The forward or reverse edit; K fixed, or drawn from `key` (one K for the batch) and run
  with `lax.switch` (one compiled branch per K, no recompilation between steps).
  `prediction_type`: what the UNet outputs ("epsilon" | "v_prediction", the run's schedule)."""
  lo, hi = config.num_steps_min, config.num_steps_max
  branches = [lambda args, k=k: _ddim_denoise(unet, alphas_cumprod, *args, num_steps=k,
                                              capture=capture, prediction_type=prediction_type)
              for k in range(lo, hi + 1)]
  args = (latents, image_latents, context, timesteps)
  if lo == hi:
    return branches[0](args)
  index = jax.random.randint(key, (), 0, hi - lo + 1)
  return jax.lax.switch(index, branches, args)


def offset_noise(key: jax.Array, shape: tuple[int, ...], offset: float) -> jax.Array:
  """N(0, I) noise of `shape` (B, H, W, C) plus, when `offset` > 0, one N(0, offset^2)
  constant per example and channel (diffusers' `--noise_offset`). The schedule's last timestep
  still holds sqrt(0.0047) of the latent, so with plain noise a latent's channel means (an
  image's overall colour) can be read off the noisy input at every trained t: the model never
  learns them from the image condition, and sampling from pure noise gets them wrong
  (docs/method.md, "Offset noise"). The offset hides them."""
  if not offset:
    return jax.random.normal(key, shape)
  noise_key, offset_key = jax.random.split(key)
  constant = jax.random.normal(offset_key, (shape[0],) + (1,) * (len(shape) - 2) + shape[-1:])
  return jax.random.normal(noise_key, shape) + offset * constant


def _clamp_straight_through(images: jax.Array) -> jax.Array:
  """Clamped to [-1, 1] in value, identity in gradient."""
  return images + jax.lax.stop_gradient(jnp.clip(images, -1.0, 1.0) - images)


def _empty_ids(empty_ids, ids_length: int) -> jax.Array:
  """The ids of "" as (1, T), checked against the batch's (B, T) ids."""
  empty_ids = jnp.asarray(empty_ids)
  if empty_ids.ndim == 1:
    empty_ids = empty_ids[None]
  if empty_ids.shape != (1, ids_length) or not jnp.issubdtype(empty_ids.dtype, jnp.integer):
    raise ValueError(f"empty_ids: shape {empty_ids.shape} {empty_ids.dtype}; expected the "
                     f"integer ids of \"\" as (1, {ids_length}) or ({ids_length},), "
                     "e.g. uip2p_jax.tokenizer.tokenize(tokenizer, [\"\"])")
  return empty_ids


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
                 key: jax.Array, alphas_cumprod: jax.Array, cycle: CycleConfig, loss: LossConfig,
                 *, empty_ids: jax.Array, prediction_type: str = "epsilon"):
  """The weighted CEC loss of a batch and its metrics.

  batch: image (B, H, W, 3) in [-1, 1]; input_caption_ids, instruction_ids, edited_caption_ids,
  reverse_instruction_ids (B, 77) int32. alphas_cumprod: (T,) float32 training schedule.
  empty_ids: (1, 77) or (77,) int32, the run's tokenizer's ids of "" (`tokenize(tokenizer,
  [""])`): the unconditional text of conditioning dropout, and its EOS id (position 1) bounds
  the instruction tokens of L_attn. prediction_type: what the UNet outputs (the run's
  schedule's "epsilon" | "v_prediction"), converted to x0 and epsilon by the edits.
  Returns (scalar loss, {name: scalar}): each computed loss, its weighted total and, when L_clip
  is computed, the CLIP direction similarity. A zero-weight loss is not computed at all.
  """
  num_train_timesteps = alphas_cumprod.shape[0]
  if cycle.timestep_max > num_train_timesteps:
    # The gather alphas_cumprod[t] would clamp t silently: refuse before tracing.
    raise ValueError(f"cycle.timestep_max={cycle.timestep_max} is beyond the noise schedule's "
                     f"{num_train_timesteps} training timesteps (t is drawn from [timestep_min, "
                     f"timestep_max), so timestep_max <= {num_train_timesteps})")
  weights = loss.weights
  active = {name for name, w in weights.items() if w > 0}
  scaling = vae.config.scaling_factor
  image = batch["image"]
  batch_size = image.shape[0]
  empty_ids = _empty_ids(empty_ids, batch["instruction_ids"].shape[1])
  keys = dict(zip(("posterior", "t", "noise", "noise_r", "k", "k_r", "drop_f", "drop_r"),
                  jax.random.split(key, 8)))

  # Frozen encoders: no gradient needed through any of these.
  posterior = vae.encode(image)
  image_latent = jax.lax.stop_gradient(posterior.mode())                      # c_x, unscaled
  input_latent = jax.lax.stop_gradient(posterior.sample(keys["posterior"]) * scaling)  # z_x
  forward_text = jax.lax.stop_gradient(text_encoder(batch["instruction_ids"])[0])
  reverse_text = jax.lax.stop_gradient(text_encoder(batch["reverse_instruction_ids"])[0])

  if cycle.start == "noise":
    timesteps = jnp.full((batch_size,), num_train_timesteps - 1, jnp.int32)
  else:
    timesteps = jax.random.randint(keys["t"], (batch_size,), cycle.timestep_min,
                                   cycle.timestep_max)
  noise = offset_noise(keys["noise"], input_latent.shape, cycle.noise_offset)
  reverse_noise = (noise if cycle.share_noise
                   else offset_noise(keys["noise_r"], noise.shape, cycle.noise_offset))

  def start_latent(clean, eps):
    if cycle.start == "noise":
      return eps
    return schedules.add_noise(alphas_cumprod, clean, eps, timesteps)

  def decode_images(latents):
    images = vae.decode(latents / scaling)
    return _clamp_straight_through(images) if cycle.clamp_decoded else images

  null_reference = "clip" in active and loss.clip_reference == "null_edit"
  if cycle.conditioning_dropout > 0 or null_reference:
    empty = jax.lax.stop_gradient(text_encoder(empty_ids)[0])
  if null_reference:  # the forward edit's start, t, noise and K with the empty instruction
    null_latent, _ = edit_with_k_steps(
        unet, alphas_cumprod, start_latent(input_latent, noise), image_latent,
        jnp.broadcast_to(empty[0], forward_text.shape), timesteps, keys["k"], cycle, None,
        prediction_type)
    null_latent = jax.lax.stop_gradient(null_latent)
  if cycle.conditioning_dropout > 0:
    forward_text, forward_condition = losses.conditioning_dropout(
        keys["drop_f"], forward_text, empty[0], image_latent, cycle.conditioning_dropout)
  else:
    forward_condition = image_latent
  capture = None
  if "attn" in active:
    resolution = attention_resolution(cycle, input_latent.shape[1],
                                      len(unet.config.block_out_channels))
    capture = AttentionCapture(resolutions=(resolution,))

  # Forward edit: (z_t, c_x, T_f) -> z_e.
  edited_latent, forward_maps = edit_with_k_steps(
      unet, alphas_cumprod, start_latent(input_latent, noise), forward_condition, forward_text,
      timesteps, keys["k"], cycle, capture, prediction_type)
  if capture is not None and not forward_maps:
    selected = (f"attention_level={cycle.attention_level}" if cycle.attention_select == "level"
                else f"attention_resolution={cycle.attention_resolution}")
    raise ValueError(
        f"cycle.{selected}: no cross-attention layer of this UNet sees a {resolution}x"
        f"{resolution} feature map with {input_latent.shape[1]}x{input_latent.shape[2]} latents "
        f"(each down block halves it); pick a level or resolution the UNet has at this image "
        f"size, or set loss.attn=0")
  # Reverse edit: (z_e noised with the same t, its own latent as condition, T_r) -> z_r.
  decoded = {}
  if cycle.reencode:  # the edited image is decoded once: the condition and the losses share it
    decoded["edited"] = decode_images(edited_latent)
    reverse_condition = vae.encode(decoded["edited"]).mode()
  else:
    reverse_condition = edited_latent / scaling
  if cycle.conditioning_dropout > 0:
    reverse_text, reverse_condition = losses.conditioning_dropout(
        keys["drop_r"], reverse_text, empty[0], reverse_condition, cycle.conditioning_dropout)
  reconstructed_latent, reverse_maps = edit_with_k_steps(
      unet, alphas_cumprod, start_latent(edited_latent, reverse_noise), reverse_condition,
      reverse_text, timesteps, keys["k"] if cycle.same_k else keys["k_r"], cycle, capture,
      prediction_type)

  need_edited_image = "clip" in active or ("sim" in active and loss.sim_kind == "edit_text")
  need_reconstruction = (("recon" in active and loss.recon_kind != "latent")
                         or ("sim" in active and loss.sim_kind == "reconstruction"))
  to_decode = {}
  if need_edited_image and "edited" not in decoded:
    to_decode["edited"] = edited_latent
  if need_reconstruction:
    to_decode["reconstructed"] = reconstructed_latent
  if null_reference:
    to_decode["null_edit"] = null_latent
  if to_decode:  # one batched decode through the frozen VAE (differentiable)
    decoded.update(zip(to_decode, _one_call(decode_images, list(to_decode.values()))))

  need_clip_images = "clip" in active or "sim" in active
  embeddings = {}
  if need_clip_images:
    clip_inputs = {"input": image}
    if need_edited_image:
      clip_inputs["edited"] = decoded["edited"]
    if null_reference:
      clip_inputs["null_edit"] = decoded["null_edit"]
    if "sim" in active and loss.sim_kind == "reconstruction":
      clip_inputs["reconstructed"] = decoded["reconstructed"]
    embeddings = dict(zip(clip_inputs, _one_call(clip.embed_images, list(clip_inputs.values()))))
    embeddings["input"] = jax.lax.stop_gradient(embeddings["input"])
    if null_reference:
      embeddings["null_edit"] = jax.lax.stop_gradient(embeddings["null_edit"])
  if "clip" in active or ("sim" in active and loss.sim_kind == "edit_text"):
    captions = _one_call(clip.embed_texts, [batch["input_caption_ids"],
                                            batch["edited_caption_ids"]])
    embeddings["input_caption"], embeddings["edited_caption"] = map(jax.lax.stop_gradient,
                                                                    captions)

  per_example = {}
  metrics = {}
  if "clip" in active:
    per_example["clip"] = losses.clip_direction_loss(
        embeddings["edited"], embeddings["null_edit" if null_reference else "input"],
        embeddings["edited_caption"], embeddings["input_caption"], loss.clip_floor)
    metrics["clip_direction_similarity"] = jnp.mean(1.0 - per_example["clip"])
  if "sim" in active:
    if loss.sim_kind == "reconstruction":
      per_example["sim"] = losses.similarity_loss(embeddings["reconstructed"],
                                                  embeddings["input"])
    else:
      per_example["sim"] = losses.similarity_loss(embeddings["edited"],
                                                  embeddings["edited_caption"])
  if "attn" in active:
    eos_id = empty_ids[0, 1]
    forward_map = losses.attention_map(
        forward_maps, losses.instruction_token_mask(batch["instruction_ids"], eos_id=eos_id))
    reverse_map = losses.attention_map(
        reverse_maps, losses.instruction_token_mask(batch["reverse_instruction_ids"],
                                                    eos_id=eos_id))
    per_example["attn"] = losses.attention_loss(forward_map, reverse_map)
  target_latent = image_latent * scaling  # the mode: no posterior noise in the target
  if "keep" in active:
    per_example["keep"] = losses.latent_l1(edited_latent, target_latent, loss.keep_fraction)
  if "recon" in active:
    if loss.recon_kind == "latent":
      per_example["recon"] = losses.latent_l1(reconstructed_latent, target_latent)
    else:
      per_example["recon"] = losses.reconstruction_loss(decoded["reconstructed"], image,
                                                        loss.recon_kind)
  total = losses.weighted_total(per_example, {k: weights[k] for k in per_example})
  metrics.update({f"loss_{name}": jnp.mean(value) for name, value in per_example.items()})
  metrics["loss"] = total
  return total, metrics


def check_ip2p_loss_weighting(loss_weighting: str, prediction_type: str) -> None:
  """ValueError unless `loss_weighting` names a loss `ip2p_losses` computes for a model of
  `prediction_type`: an epsilon model trains on either; a v_prediction model's plain MSE to its
  target v already is the "v" loss, and its "epsilon" loss (alpha_bar times that) is not
  offered, so that a v model given the default weighting fails loudly instead of silently
  training with the epsilon model's weighting."""
  if loss_weighting not in IP2P_LOSS_WEIGHTINGS:
    raise ValueError(f"ip2p.loss_weighting={loss_weighting!r}; expected one of "
                     f"{IP2P_LOSS_WEIGHTINGS}")
  if prediction_type == "v_prediction" and loss_weighting != "v":
    raise ValueError(f"ip2p.loss_weighting={loss_weighting!r} with a v_prediction model: its "
                     "loss is the plain MSE to v, which is the 'v' loss; set "
                     "ip2p.loss_weighting='v'")


def image_posterior(vae: AutoencoderKL, batch: dict[str, jax.Array], field: str):
  """The VAE's posterior of the batch's `field` images: from the batch's cached
  `<field>_latent_mean` / `_logvar` when the run caches them (`train.latent_cache`), else
  encoded here. Either way the same distribution, sampled the same way."""
  from uip2p_jax.models.vae import DiagonalGaussian
  if f"{field}_latent_mean" in batch:
    return DiagonalGaussian(batch[f"{field}_latent_mean"], batch[f"{field}_latent_logvar"])
  return vae.encode(batch[field])


def ip2p_losses(unet: UNet2DConditionModel, vae: AutoencoderKL,
                text_encoder: CLIPTextTransformer, batch: dict[str, jax.Array], key: jax.Array,
                alphas_cumprod: jax.Array, conditioning_dropout: float = 0.05, *,
                empty_ids: jax.Array, noise_offset: float = 0.0,
                loss_weighting: str = "epsilon", prediction_type: str = "epsilon",
                edit_region_weight: float = 0.0):
  """The supervised InstructPix2Pix loss (the baseline): noise MSE on the noised *edited*
  latent, conditioned on the input image's latent and the instruction, with IP2P's dropout.

  batch: image, edited_image (B, H, W, 3) in [-1, 1] (or their cached posteriors:
    `image_posterior`); instruction_ids (B, 77).
  empty_ids: (1, 77) or (77,) int32, the run's tokenizer's ids of "" (the dropped text).
  noise_offset: see `offset_noise`.
  loss_weighting: "epsilon", the plain noise MSE (IP2P's); "v", each example's noise MSE divided
    by alpha_bar_t, which is exactly the loss of a v-prediction model written for an epsilon
    model. It weights the high timesteps (1/alpha_bar = 213 at t = 999, 1.1 at t = 50), the only
    ones where the image condition tells the model something the noisy latent does not: under
    the plain MSE their gradients are the smallest in the batch (docs/method.md, "Loss
    weighting").
  prediction_type: what the UNet outputs (the run's schedule). "v_prediction": the plain MSE
    to v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0, only with loss_weighting "v" (the
    same loss, `check_ip2p_loss_weighting`).
  edit_region_weight: > 0 weights each position's error by how much the edit changes the
    latent there (`losses.edit_region_weights`; 0, IP2P's loss, every position alike).
  Both "v" losses also report `noise_mse`, the plain noise MSE of the equivalent epsilon
  prediction, comparable across weightings and prediction types.
  """
  check_ip2p_loss_weighting(loss_weighting, prediction_type)
  keys = jax.random.split(key, 4)
  scaling = vae.config.scaling_factor
  empty_ids = _empty_ids(empty_ids, batch["instruction_ids"].shape[1])
  image_latent = jax.lax.stop_gradient(image_posterior(vae, batch, "image").mode())
  edited = image_posterior(vae, batch, "edited_image")
  target_latent = jax.lax.stop_gradient(edited.sample(keys[0]) * scaling)
  region = None
  if edit_region_weight:  # (before the dropout: where the edit is, not what the model sees)
    region = jax.lax.stop_gradient(losses.edit_region_weights(
        image_latent, edited.mode(), edit_region_weight))
  text = jax.lax.stop_gradient(text_encoder(batch["instruction_ids"])[0])
  empty = jax.lax.stop_gradient(text_encoder(empty_ids)[0])
  text, image_latent = losses.conditioning_dropout(keys[1], text, empty[0], image_latent,
                                                   conditioning_dropout)
  timesteps = jax.random.randint(keys[2], (target_latent.shape[0],), 0, alphas_cumprod.shape[0])
  noise = offset_noise(keys[3], target_latent.shape, noise_offset)
  noisy = schedules.add_noise(alphas_cumprod, target_latent, noise, timesteps)
  prediction = unet(jnp.concatenate([noisy, image_latent], axis=-1), timesteps, text)
  if loss_weighting == "epsilon":
    value = losses.ip2p_loss(prediction, noise, element_weights=region)
    return value, {"loss": value, "loss_ip2p": value}
  alpha = schedules.alpha_at(alphas_cumprod, timesteps, noisy.ndim)
  if prediction_type == "v_prediction":
    value = losses.ip2p_loss(prediction, schedules.v_target(alpha, target_latent, noise),
                             element_weights=region)
    noise_prediction = schedules.predict_epsilon(alpha, noisy, prediction.astype(jnp.float32),
                                                 prediction_type)
  else:
    value = losses.ip2p_loss(prediction, noise, 1.0 / alpha.reshape(-1), region)
    noise_prediction = prediction
  # The plain noise MSE too: comparable across weightings and prediction types.
  return value, {"loss": value, "loss_ip2p": value,
                 "noise_mse": jax.lax.stop_gradient(losses.ip2p_loss(noise_prediction, noise))}


__all__ = ["CycleConfig", "LOSS_NAMES", "LossConfig", "attention_resolution",
           "check_ip2p_loss_weighting", "cycle_losses", "edit_with_k_steps", "image_posterior",
           "ip2p_losses", "offset_noise"]
