"""CLIP parity with transformers: text hidden states, text and image features, preprocessing."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from conftest import TEXT_CONFIG, max_rel_error, nchw
from uip2p_jax import weights
from uip2p_jax.models.clip import CLIP_MEAN, CLIP_STD, preprocess_images

TOL = 1e-4


def _token_ids(batch=3, length=77, eos=TEXT_CONFIG["eos_token_id"], seed=0):
  """BOS, random tokens, EOS, EOS padding: the SD tokenizer's layout."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), eos, np.int32)
  ids[:, 0] = TEXT_CONFIG["bos_token_id"]
  for i, n in enumerate(rng.integers(1, 20, batch)):
    ids[i, 1:1 + n] = rng.integers(1, 900, n)
  return ids


def test_text_encoder_matches_transformers(torch_text_encoder):
  torch_model, folder = torch_text_encoder
  encoder = weights.load_text_encoder(folder, subfolder=None)
  ids = _token_ids()
  with torch.no_grad():
    reference = torch_model(torch.from_numpy(ids).long())
  hidden, pooled = nnx.jit(lambda m, i: m(i))(encoder, ids)
  assert hidden.shape == (3, 77, 32)
  assert max_rel_error(hidden, reference.last_hidden_state.numpy()) <= TOL
  assert max_rel_error(pooled, reference.pooler_output.numpy()) <= TOL


def test_clip_features_match_transformers(torch_clip):
  torch_model, folder = torch_clip
  clip = weights.load_clip(folder)
  size = clip.config.vision.image_size
  ids = _token_ids(seed=1)
  pixels = np.random.default_rng(2).standard_normal((2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    text_ref = torch_model.get_text_features(input_ids=torch.from_numpy(ids).long())
    image_ref = torch_model.get_image_features(pixel_values=torch.from_numpy(nchw(pixels)))
  text_ref = getattr(text_ref, "pooler_output", text_ref).numpy()
  image_ref = getattr(image_ref, "pooler_output", image_ref).numpy()
  text = nnx.jit(lambda m, i: m.get_text_features(i))(clip, ids)
  image = nnx.jit(lambda m, p: m.get_image_features(p))(clip, pixels)
  assert max_rel_error(text, text_ref) <= TOL
  assert max_rel_error(image, image_ref) <= TOL


def test_text_encoder_loads_from_full_clip_checkpoint(torch_clip, torch_text_encoder):
  """The text tower of a CLIPModel folder loads as a text encoder (keys under text_model.)."""
  _, folder = torch_clip
  encoder = weights.load_text_encoder(folder, subfolder=None)
  assert encoder.config.hidden_size == 32


def test_preprocess_matches_clip_image_processor():
  """Our differentiable resize/crop/normalise vs transformers' CLIPImageProcessor (PIL)."""
  from transformers import CLIPImageProcessor
  rng = np.random.default_rng(0)
  # A smooth image, so the bicubic kernels' small differences stay small.
  yy, xx = np.meshgrid(np.linspace(0, 1, 96), np.linspace(0, 1, 128), indexing="ij")
  image = np.stack([yy, xx, (yy + xx) / 2], -1) * 0.8 + rng.uniform(0, 0.2, (96, 128, 3))
  uint8 = (image * 255).round().astype(np.uint8)
  processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                       "width": 32},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
  reference = processor(images=uint8, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  ours = preprocess_images(jnp.asarray(uint8[None] / 127.5 - 1.0, jnp.float32), 32)[0]
  assert ours.shape == (32, 32, 3)
  # PIL resamples in uint8 and with its own bicubic: agree to a few grey levels / std.
  assert np.abs(np.asarray(ours) - reference).mean() < 0.05
