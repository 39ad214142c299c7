"""Cycle Edit Consistency losses, the supervised InstructPix2Pix loss and its conditioning
dropout, as pure functions (docs/method.md, section 2, gives the definitions).

Embeddings passed here are CLIP embeddings (any normalisation: they are L2-normalised first).
Images are NHWC in [-1, 1]; attention captures are what `UNet2DConditionModel` returns with an
`AttentionCapture`: {layer name: (B, h, w, tokens) head-averaged probabilities}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from uip2p_jax.models.attention import Captures


def normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) over the last axis; eps=0 divides by the bare norm (a zero vector -> NaN)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Cosine similarity over the last axis: (B, D) x (B, D) -> (B,). The one definition the
  losses and the evaluation metrics (`eval.metrics`, with eps=0) share."""
  return jnp.sum(normalise(a, eps) * normalise(b, eps), axis=-1)


def clip_direction_similarity(*, edited_image: jax.Array, input_image: jax.Array,
                              edited_text: jax.Array, input_text: jax.Array,
                              eps: float = 1e-12, image_floor: float = 0.0) -> jax.Array:
  """InstructPix2Pix's CLIP direction similarity cos(E_I(x_e) - E_I(x), E_T(c_out) - E_T(c_in))
  of L2-normalised embeddings, per example (B,). Keyword-only: the call sites order the four
  embeddings differently. image_floor > 0 (not IP2P's): the image direction is divided by
  max(|d|, image_floor), so a change shorter than the floor is scored by its projection on the
  text direction over the floor, and its gradient stays bounded (by 1 / image_floor) as |d| -> 0."""
  image_direction = normalise(edited_image, eps) - normalise(input_image, eps)
  text_direction = normalise(edited_text, eps) - normalise(input_text, eps)
  return jnp.sum(normalise(image_direction, max(eps, image_floor))
                 * normalise(text_direction, eps), axis=-1)


def clip_direction_loss(edited_image: jax.Array, input_image: jax.Array, edited_text: jax.Array,
                        input_text: jax.Array, image_floor: float = 0.0) -> jax.Array:
  """L_clip = 1 - cos(E_I(x_e) - E_I(x), E_T(c_out) - E_T(c_in)), per example (B,);
  image_floor as `clip_direction_similarity`'s."""
  return 1.0 - clip_direction_similarity(edited_image=edited_image, input_image=input_image,
                                         edited_text=edited_text, input_text=input_text,
                                         image_floor=image_floor)


def similarity_loss(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - cos(a, b), per example (B,): L_sim as `(E_I(x_r), E_I(x))` or `(E_I(x_e), E_T(c_out))`."""
  return 1.0 - cosine(a, b)


def reconstruction_loss(reconstructed: jax.Array, target: jax.Array, kind: str = "l1") -> jax.Array:
  """L_recon per example (B,): mean |x_r - x| ("l1") or mean (x_r - x)^2 ("l2")."""
  diff = reconstructed.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l1":
    per_element = jnp.abs(diff)
  elif kind == "l2":
    per_element = jnp.square(diff)
  else:
    raise ValueError(f"reconstruction loss kind {kind!r}; expected 'l1' or 'l2'")
  return per_element.reshape(per_element.shape[0], -1).mean(axis=-1)


def latent_l1(latent: jax.Array, target: jax.Array, fraction: float = 1.0) -> jax.Array:
  """Mean |latent - target| per example (B,): each latent position's mean over channels,
  averaged over the `fraction` of positions (at least one) that differ least. fraction 1 is
  the plain mean (the latent L_recon); L_keep (ours) passes `loss.keep_fraction`: below 1 an
  edit is free to change the rest of the positions as much as it needs (an object recoloured,
  added or removed), and pays only for moving the ones it should have left alone. The gradient
  reaches the kept positions only (sort is differentiable)."""
  per_position = jnp.mean(jnp.abs(latent - target), axis=-1)
  per_position = per_position.reshape(per_position.shape[0], -1)
  count = max(1, int(round(fraction * per_position.shape[1])))
  if count == per_position.shape[1]:
    return jnp.mean(per_position, axis=-1)
  return jnp.mean(jnp.sort(per_position, axis=-1)[:, :count], axis=-1)


def instruction_token_mask(token_ids: jax.Array, *, eos_id) -> jax.Array:
  """(B, T) ids -> (B, T) float mask of the instruction's own tokens: the positions after BOS
  (position 0) and before the first EOS, so neither the tokenizer's padding id nor its EOS
  padding counts. eos_id: the run's tokenizer's EOS id (`empty_ids[0, 1]`, ids of ""), may be
  traced; a row with no EOS counts every position after BOS."""
  positions = jnp.arange(token_ids.shape[1])[None, :]
  is_eos = token_ids == eos_id
  first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), token_ids.shape[1])
  return ((positions > 0) & (positions < first_eos[:, None])).astype(jnp.float32)


def attention_map(captures: Captures, token_mask: jax.Array) -> jax.Array:
  """The spatial cross-attention map of an instruction: (B, h, w), max 1 per example.

  Each captured layer's probabilities are summed over the instruction's tokens (token_mask,
  (B, T)); the layers (all at one resolution) are averaged; the result is divided by its
  per-example maximum, so forward and reverse maps compare in space whatever their tokens.
  """
  if not captures:
    raise ValueError("attention_map needs at least one captured layer (check AttentionCapture)")
  shapes = {tuple(v.shape[1:3]) for v in captures.values()}
  if len(shapes) != 1:
    raise ValueError(f"captured layers have different resolutions {sorted(shapes)}; select one")
  per_layer = [jnp.einsum("bhwt,bt->bhw", probs.astype(jnp.float32), token_mask)
               for probs in captures.values()]
  spatial = jnp.mean(jnp.stack(per_layer), axis=0)
  return spatial / jnp.maximum(spatial.max(axis=(1, 2), keepdims=True), 1e-12)


def attention_loss(forward_map: jax.Array, reverse_map: jax.Array) -> jax.Array:
  """L_attn = mean (A_f - A_r)^2 per example (B,)."""
  return jnp.square(forward_map - reverse_map).reshape(forward_map.shape[0], -1).mean(axis=-1)


def weighted_total(losses: dict[str, jax.Array], weights: dict[str, float]) -> jax.Array:
  """sum_k weights[k] * mean(losses[k]); a term with weight 0 must not have been computed."""
  unknown = set(losses) - set(weights)
  if unknown:
    raise ValueError(f"losses {sorted(unknown)} have no weight; weights given: {sorted(weights)}")
  zero_weight = sorted(k for k in losses if weights[k] == 0)
  if zero_weight:
    raise ValueError(f"losses {zero_weight} have weight 0: skip computing them instead")
  return sum(weights[k] * jnp.mean(v) for k, v in losses.items())


def ip2p_loss(noise_prediction: jax.Array, noise: jax.Array,
              example_weights: jax.Array | None = None,
              element_weights: jax.Array | None = None) -> jax.Array:
  """The supervised InstructPix2Pix loss: MSE between true and predicted noise (scalar); with
  `example_weights` (B,), each example's MSE weighted before the batch mean; with
  `element_weights` (broadcast to the latents' shape), each element's squared error first."""
  squared = jnp.square(noise_prediction.astype(jnp.float32) - noise.astype(jnp.float32))
  if element_weights is not None:
    squared = squared * element_weights.astype(jnp.float32)
  if example_weights is None:
    return jnp.mean(squared)
  per_example = jnp.mean(squared, axis=tuple(range(1, squared.ndim)))
  return jnp.mean(per_example * example_weights.astype(jnp.float32))


def edit_region_weights(image_latent: jax.Array, edited_latent: jax.Array,
                        weight: float) -> jax.Array:
  """(B, h, w, 1) per-position loss weights that put `weight` more on where the edit changes the
  latent: 1 + weight * |edited - image| (channel mean, over its per-example maximum), then
  divided by their per-example mean, so that each example keeps its share of the loss and only
  its positions are re-balanced (a background edit, changed everywhere, stays near uniform; a
  one-object edit's few positions stop drowning in the ones to be copied)."""
  change = jnp.mean(jnp.abs(edited_latent.astype(jnp.float32) - image_latent.astype(jnp.float32)),
                    axis=-1, keepdims=True)
  change = change / (jnp.max(change, axis=(1, 2, 3), keepdims=True) + 1e-6)
  weights = 1.0 + weight * change
  return weights / jnp.mean(weights, axis=(1, 2, 3), keepdims=True)


def conditioning_dropout(key: jax.Array, text_embeddings: jax.Array, empty_embedding: jax.Array,
                         image_latents: jax.Array, probability: float = 0.05):
  """IP2P's dropout for classifier-free guidance, one r ~ U(0, 1) per example:
  r < p: text -> embedding of ""; p <= r < 2p: both dropped; 2p <= r < 3p: image latent -> 0.

  text_embeddings: (B, T, D); empty_embedding: (T, D) or (1, T, D); image_latents: (B, h, w, c).
  """
  r = jax.random.uniform(key, (text_embeddings.shape[0],))
  drop_text = r < 2 * probability
  drop_image = (r >= probability) & (r < 3 * probability)
  text = jnp.where(drop_text[:, None, None],
                   jnp.broadcast_to(empty_embedding, text_embeddings.shape), text_embeddings)
  image = jnp.where(drop_image[:, None, None, None], 0.0, image_latents)
  return text, image
