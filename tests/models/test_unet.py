"""UNet parity with diffusers, and cross-attention capture against a recording processor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import UNET_CONFIGS, max_rel_error, nchw, nhwc
from uip2p_jax import weights
from uip2p_jax.models import AttentionCapture

TOL = 1e-4


def _inputs(in_channels, cross_dim, batch=2, size=8, tokens=7, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, size, size, in_channels)).astype(np.float32)
  context = rng.standard_normal((batch, tokens, cross_dim)).astype(np.float32)
  timesteps = np.array([3, 781][:batch], np.int32)
  return sample, timesteps, context


class RecordingProcessor:
  """A diffusers attention processor that records head-averaged softmax probabilities."""

  def __init__(self, name, store):
    self.name, self.store = name, store

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, **kwargs):
    batch = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    probs = attn.get_attention_scores(query, key, attention_mask)
    self.store[self.name] = probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    return attn.to_out[1](attn.to_out[0](out))


@functools.lru_cache(maxsize=None)
def _load(folder):
  return weights.load_unet(folder, subfolder=None)


@functools.lru_cache(maxsize=None)
def _jitted(capture=None):
  # One jitted function per capture spec; nnx.jit caches compilations per module structure.
  return nnx.jit(lambda m, x, t, c: m(x, t, c, capture=capture))


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers(torch_unets, name):
  torch_model, folder = torch_unets[name]
  unet = _load(folder)
  config = UNET_CONFIGS[name]
  sample, timesteps, context = _inputs(config["in_channels"], config["cross_attention_dim"])
  with torch.no_grad():
    reference = torch_model(torch.from_numpy(nchw(sample)), torch.from_numpy(timesteps),
                            torch.from_numpy(context)).sample.numpy()
  ours = _jitted()(unet, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context))
  assert ours.dtype == jnp.float32
  assert max_rel_error(ours, nhwc(reference)) <= TOL


def test_unet_rejects_bad_inputs(torch_unets):
  unet = _load(torch_unets["ip2p_conv"][1])
  sample, timesteps, context = _inputs(8, 32)
  with pytest.raises(ValueError, match="input channels"):
    unet(jnp.asarray(sample[..., :4]), timesteps, context)
  with pytest.raises(ValueError, match="not divisible"):
    unet(jnp.asarray(sample[:, :7, :7]), timesteps, context)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_captured_cross_attention_equals_diffusers_probabilities(torch_unets, name):
  torch_model, folder = torch_unets[name]
  unet = _load(folder)
  config = UNET_CONFIGS[name]
  sample, timesteps, context = _inputs(config["in_channels"], config["cross_attention_dim"])
  recorded = {}
  original = torch_model.attn_processors
  torch_model.set_attn_processor({
      key: RecordingProcessor(key.removesuffix(".processor"), recorded)
      for key in torch_model.attn_processors})
  try:
    with torch.no_grad():
      reference = torch_model(torch.from_numpy(nchw(sample)), torch.from_numpy(timesteps),
                              torch.from_numpy(context)).sample.numpy()
  finally:
    torch_model.set_attn_processor(original)
  noise, captures = _jitted(AttentionCapture())(unet, sample, timesteps, context)
  # Capture must not change the prediction.
  assert max_rel_error(noise, nhwc(reference)) <= TOL
  cross = {k: v.numpy() for k, v in recorded.items() if k.endswith("attn2")}
  assert sorted(captures) == sorted(cross)
  for layer, probs in cross.items():
    ours = np.asarray(captures[layer])
    batch, height, width, tokens = ours.shape
    assert (batch, tokens) == (2, context.shape[1])
    np.testing.assert_allclose(ours.reshape(batch, height * width, tokens), probs, atol=1e-5)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-5)


def test_capture_selects_resolution_and_block(torch_unets):
  unet = _load(torch_unets["sd_linear"][1])  # levels: 8x8, 4x4, 2x2 for an 8x8 latent
  sample, timesteps, context = _inputs(4, 24)
  _, at_4 = _jitted(AttentionCapture(resolutions=(4,)))(unet, sample, timesteps, context)
  assert at_4 and all(v.shape[1:3] == (4, 4) for v in at_4.values())
  assert {k.split(".attentions")[0] for k in at_4} == {"down_blocks.1", "up_blocks.1"}
  _, up_only = _jitted(AttentionCapture(resolutions=(4,), blocks=("up_blocks",)))(
      unet, sample, timesteps, context)
  assert sorted(up_only) == sorted(k for k in at_4 if k.startswith("up_blocks"))


def test_capture_computes_probabilities_only_for_selected_layers(torch_unets, monkeypatch):
  """Explicit (B, heads, Q, K) probabilities are built only for captured layers; every other
  layer goes through the memory-efficient path (blockwise here, cuDNN flash on GPU)."""
  import uip2p_jax.models.attention as attention
  unet = _load(torch_unets["sd_linear"][1])
  sample, timesteps, context = _inputs(4, 24)
  graphdef, state = nnx.split(unet)
  calls = {"explicit": [], "efficient": 0}
  explicit, efficient = attention.attention_weights, attention.multi_head_attention

  def record_explicit(q, k, scale, mask=None):
    calls["explicit"].append((q.shape[1], k.shape[1]))
    return explicit(q, k, scale, mask)

  def record_efficient(*args, **kwargs):
    calls["efficient"] += 1
    return efficient(*args, **kwargs)

  monkeypatch.setattr(attention, "attention_weights", record_explicit)
  monkeypatch.setattr(attention, "multi_head_attention", record_efficient)

  def trace(capture):
    calls["explicit"], calls["efficient"] = [], 0
    jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, timesteps, context, capture=capture))(
        state, sample)
    return list(calls["explicit"]), calls["efficient"]

  # 11 transformer blocks (2 + 2 down, 1 mid, 3 + 3 up) x (self + cross attention).
  assert trace(None) == ([], 22)
  # 4x4 level: down_blocks.1 (2 layers) and up_blocks.1 (3 layers): 16 queries, 7 tokens.
  assert trace(AttentionCapture(resolutions=(4,))) == ([(16, 7)] * 5, 17)
  assert trace(AttentionCapture(blocks=("mid_block",))) == ([(4, 7)], 21)


def test_bfloat16_compute_stays_close(torch_unets):
  folder = torch_unets["ip2p_conv"][1]
  unet32 = _load(folder)
  unet16 = weights.load_unet(folder, subfolder=None, dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16)
  sample, timesteps, context = _inputs(8, 32)
  full = _jitted()(unet32, sample, timesteps, context)
  half = _jitted()(unet16, sample, timesteps, context)
  assert half.dtype == jnp.float32
  assert max_rel_error(half, full) < 5e-2
