"""Editing metrics: MagicBrush's L1, L2, CLIP-I, CLIP-T, DINO and InstructPix2Pix's CLIP
direction / image similarity.

The metric math is pure JAX over NHWC batches; preprocessing follows each protocol on the host
with PIL, as the reference implementations do (MagicBrush `evaluation/image_eval.py`: the edited
image is resized to the target's size for L1/L2 on [0, 1] pixels; OpenAI CLIP's preprocess for
CLIP-I/CLIP-T; torchvision Resize(256) + CenterCrop(224) + ImageNet normalisation for DINO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from uip2p_jax import losses
from uip2p_jax.models.clip import CLIP_MEAN, CLIP_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Pure metric functions: (B, H, W, C) or (B, D) -> (B,)

def l1_distance(edited: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute difference per example; images in [0, 1], same size."""
  return jnp.abs(edited - target).reshape(edited.shape[0], -1).mean(axis=-1)


def l2_distance(edited: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared difference per example (MagicBrush's "L2" is torch's MSELoss)."""
  return jnp.square(edited - target).reshape(edited.shape[0], -1).mean(axis=-1)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of (B, D) features -> (B,): `losses.cosine` with no epsilon, so a zero
  feature vector gives NaN rather than a plausible 0."""
  return losses.cosine(a, b, eps=0.0)


def direction_similarity(input_image: jax.Array, edited_image: jax.Array, input_text: jax.Array,
                         edited_text: jax.Array) -> jax.Array:
  """InstructPix2Pix's CLIP direction similarity: cos(I_e - I_in, T_out - T_in) of normalised
  embeddings; `losses.clip_direction_similarity` (L_clip's definition) with no epsilon."""
  return losses.clip_direction_similarity(edited_image=edited_image, input_image=input_image,
                                          edited_text=edited_text, input_text=input_text,
                                          eps=0.0)


# ---------------------------------------------------------------------------------------------
# Host preprocessing (PIL), per protocol

def to_unit_array(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
  """RGB [0, 1] float32 (H, W, 3), resized (bicubic) to `size` = (width, height) if given."""
  image = image.convert("RGB")
  if size is not None and image.size != tuple(size):
    image = image.resize(tuple(size), Image.BICUBIC)
  return np.asarray(image, np.float32) / 255.0


def resize_center_crop(image: Image.Image, resize: int, crop: int, mean, std) -> np.ndarray:
  """Shorter side -> `resize` (bicubic), centre crop `crop`, normalise: (crop, crop, 3) float32.

  Exactly torchvision's Resize(int) + CenterCrop on a PIL image, as OpenAI CLIP's preprocess and
  MagicBrush's DINO transform run them: the longer side becomes `int(resize * long / short)`
  (truncated, not rounded) and the crop offsets `int(round((side - crop) / 2))`; either
  rounding changed shifts every pixel and moves CLIP-T by ~1e-2 on random weights.
  """
  image = image.convert("RGB")
  w, h = image.size
  new_long = int(resize * max(w, h) / min(w, h))
  size = (resize, new_long) if w <= h else (new_long, resize)
  if size != (w, h):
    image = image.resize(size, Image.BICUBIC)
  left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
  array = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
  return (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_pixels(image: Image.Image, size: int = 224) -> np.ndarray:
  return resize_center_crop(image, size, size, CLIP_MEAN, CLIP_STD)


def dino_pixels(image: Image.Image, size: int = 224) -> np.ndarray:
  return resize_center_crop(image, round(size * 256 / 224), size, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# Metric models, jitted once per batch shape

class MetricModels:
  """CLIP (image and text features) and DINO (CLS embedding) with jitted batch calls."""

  def __init__(self, clip=None, dino=None, tokenizer=None):
    from flax import nnx
    self.clip, self.dino, self.tokenizer = clip, dino, tokenizer
    self._clip_images = nnx.jit(lambda m, x: m.get_image_features(x))
    self._clip_texts = nnx.jit(lambda m, ids: m.get_text_features(ids))
    self._dino = nnx.jit(lambda m, x: m(x)[:, 0])

  @property
  def clip_size(self) -> int:
    return self.clip.config.vision.image_size

  def clip_image_features(self, images: list[Image.Image]) -> np.ndarray:
    return self.clip_pixel_features(np.stack([clip_pixels(im, self.clip_size) for im in images]))

  def clip_pixel_features(self, pixels: np.ndarray) -> np.ndarray:
    """CLIP image features of already-normalised (N, size, size, 3) pixels (a protocol with
    its own preprocessing, e.g. InstructPix2Pix's curve)."""
    return np.asarray(self._clip_images(self.clip, pixels))

  def clip_text_features(self, texts: list[str]) -> np.ndarray:
    from uip2p_jax.tokenizer import tokenize
    return np.asarray(self._clip_texts(self.clip, tokenize(self.tokenizer, texts)))

  def dino_features(self, images: list[Image.Image]) -> np.ndarray:
    size = self.dino.config.image_size
    return np.asarray(self._dino(self.dino, np.stack([dino_pixels(im, size) for im in images])))


def magicbrush_metrics(models: MetricModels, edited: list[Image.Image], targets: list[Image.Image],
                       captions: list[str] | None) -> dict[str, np.ndarray]:
  """Per-example L1, L2, CLIP-I, DINO and (with target captions) CLIP-T."""
  l1, l2 = [], []
  for e, t in zip(edited, targets):  # targets may differ in size: one pair at a time
    target = to_unit_array(t)[None]
    output = to_unit_array(e, (target.shape[2], target.shape[1]))[None]
    l1.append(float(l1_distance(output, target)[0]))
    l2.append(float(l2_distance(output, target)[0]))
  out = {"l1": np.asarray(l1), "l2": np.asarray(l2)}
  if models.clip is not None:
    edited_features = models.clip_image_features(edited)
    out["clip_i"] = np.asarray(cosine_similarity(edited_features,
                                                 models.clip_image_features(targets)))
    if captions is not None:
      valid = np.asarray([bool(c) for c in captions])
      text = models.clip_text_features([c or "" for c in captions])
      out["clip_t"] = np.where(valid, np.asarray(cosine_similarity(edited_features, text)),
                               np.nan)
  if models.dino is not None:
    out["dino"] = np.asarray(cosine_similarity(models.dino_features(edited),
                                               models.dino_features(targets)))
  return out


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MetricModels", "clip_pixels", "cosine_similarity",
           "dino_pixels", "direction_similarity", "l1_distance", "l2_distance",
           "magicbrush_metrics", "resize_center_crop", "to_unit_array"]
