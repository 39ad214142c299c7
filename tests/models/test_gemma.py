"""Our Gemma 2 against transformers' Gemma2ForCausalLM on a tiny random config: one causal
pass, and the cached, left-padded decoding the jax instruct backend runs."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import max_rel_error
from uip2p_jax import weights


def test_gemma2_matches_transformers(tiny_gemma):
  reference_model, folder = tiny_gemma
  ours = weights.load_gemma2(folder)
  assert ours.config.layer_types == ("sliding_attention", "full_attention")
  # 24 tokens: past the sliding window (8), so the two layer types differ.
  ids = np.random.default_rng(0).integers(7, 512, (2, 24))
  with torch.no_grad():
    reference = reference_model(torch.from_numpy(ids)).logits.numpy()
  assert max_rel_error(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)), reference) < 1e-5

  # Row 0 left-padded by 5 (a 15-token prompt), both prefilled into a 24-slot cache, then two
  # tokens decoded one at a time: the logits of every real position match the full pass.
  prompt, padding = 15, np.array([5, 0])
  padded = ids[:, :20].copy()
  padded[0] = np.concatenate([np.zeros(5, int), ids[0, :prompt]])
  slots = jnp.arange(24)
  key_valid = slots[None, :] >= jnp.asarray(padding)[:, None]
  positions = jnp.maximum(jnp.arange(20)[None, :] - jnp.asarray(padding)[:, None], 0)
  # Jitted: eager dispatch compiles every operation of every call on its own (3x slower).
  step_fn = nnx.jit(lambda m, ids, pos, cache, index: m.model(
      ids, positions=pos, cache=cache, cache_index=index, key_valid=key_valid))
  hidden, cache = step_fn(ours, jnp.asarray(padded), positions, ours.init_cache(2, 24), 0)
  prefill = np.asarray(ours.logits(hidden))
  assert max_rel_error(prefill[0, 5:], reference[0, :prompt]) < 1e-5
  assert max_rel_error(prefill[1], reference[1, :20]) < 1e-5
  lengths = np.array([prompt, 20])
  for step in range(2):
    token = jnp.asarray(ids[np.arange(2), lengths + step][:, None])
    hidden, cache = step_fn(ours, token, jnp.asarray(lengths + step)[:, None], cache,
                            20 + step)
    decoded = np.asarray(ours.logits(hidden))[:, 0]
    expected = reference[np.arange(2), lengths + step]
    assert max_rel_error(decoded, expected) < 1e-5, step


def test_load_gemma2_refuses_what_it_cannot_load(tiny_gemma, tmp_path):
  _, folder = tiny_gemma
  with pytest.raises(weights.CheckpointError, match="no such folder"):
    weights.load_gemma2(str(tmp_path / "absent"))
  bad = tmp_path / "bad"
  shutil.copytree(folder, bad)
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, "model_type": "gemma3_text"}))
  with pytest.raises(weights.CheckpointError, match="expected 'gemma2'"):
    weights.load_gemma2(str(bad))
  (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3,
                                               "layer_types": None}))
  with pytest.raises(weights.CheckpointError, match="missing keys: model.layers.2"):
    weights.load_gemma2(str(bad))
  os.remove(bad / "model.safetensors")
  with pytest.raises(weights.CheckpointError, match="no model.safetensors"):
    weights.load_gemma2(str(bad))


def test_null_soft_caps_mean_off(tmp_path):
  """transformers reads null soft-caps as "off" (exports for flash attention have them); so must
  we, not as our defaults 50 and 30."""
  from transformers import Gemma2Config, Gemma2ForCausalLM

  from conftest import GEMMA_CONFIG, seeded
  seeded(12)
  config = dict(GEMMA_CONFIG, attn_logit_softcapping=None, final_logit_softcapping=None)
  reference_model = Gemma2ForCausalLM(Gemma2Config(**config, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in reference_model.named_parameters():
      p.normal_(0.0, 0.5 if "norm" in name else 0.3)
  reference_model.save_pretrained(tmp_path)
  ours = weights.load_gemma2(str(tmp_path))
  assert (ours.config.attn_logit_softcapping, ours.config.final_logit_softcapping) == (None, None)
  ids = np.random.default_rng(1).integers(7, 512, (1, 24))
  with torch.no_grad():
    reference = reference_model(torch.from_numpy(ids)).logits.numpy()
  assert max_rel_error(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)), reference) < 1e-5
