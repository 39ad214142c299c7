"""DINO's ViT against transformers' ViTModel on a tiny random config."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import max_rel_error, nchw, seeded
from uip2p_jax import weights


@pytest.fixture(scope="module")
def torch_vit(tmp_path_factory):
  from transformers import ViTConfig, ViTModel
  seeded(7)
  config = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, image_size=32, patch_size=8, layer_norm_eps=1e-6)
  model = ViTModel(config, add_pooling_layer=True).eval()  # the pooler is present but unused
  folder = tmp_path_factory.mktemp("vit")
  model.save_pretrained(folder)
  return model, str(folder)


def test_vit_matches_transformers(torch_vit):
  model, folder = torch_vit
  ours = weights.load_vit(folder)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    reference = model(pixel_values=torch.from_numpy(nchw(pixels))).last_hidden_state.numpy()
  assert max_rel_error(ours(jnp.asarray(pixels)), reference) < 1e-5
  embedded = np.asarray(ours.embed(jnp.asarray(pixels)))
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=-1), 1.0, rtol=1e-6)
  cls = reference[:, 0] / np.linalg.norm(reference[:, 0], axis=-1, keepdims=True)
  np.testing.assert_allclose(embedded, cls, atol=1e-5)


def test_vit_refuses_wrong_image_size(torch_vit):
  ours = weights.load_vit(torch_vit[1])
  with pytest.raises(ValueError, match="ViT expects 32x32 images, got 64x64"):
    ours(jnp.zeros((1, 64, 64, 3)))
