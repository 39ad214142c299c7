"""Gemma 2 (the paper's instruction writer) in Flax NNX: the decoder of transformers'
`Gemma2ForCausalLM`, with a key/value cache for generation (`uip2p_jax.data.jax_llm`).

Names follow transformers, so `weights.load_gemma2` reads a Hugging Face folder such as
google/gemma-2-2b-it (`model.layers.N.self_attn.q_proj.weight`, ...). Gemma 2's particulars:
RMSNorm scaling by (1 + weight); grouped-query attention with RoPE, queries scaled by
query_pre_attn_scalar ** -0.5 and logits soft-capped (tanh); layers alternating between a
sliding window and global attention (config.layer_types); a norm after each block as well as
before it; the GeGLU feed-forward (tanh GELU); embeddings scaled by sqrt(hidden_size) and tied
to the output projection; final logits soft-capped.

Left padding: a batch's rows may hold prompts of different lengths padded on the left, so every
row's last prompt token shares one cache slot and the decode steps write one slot for all rows.
A slot is a cache index; a row's positions (RoPE) are its slots minus its padding, and
`key_valid` masks the padding slots out of attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.layers import activation

SLIDING, GLOBAL = "sliding_attention", "full_attention"

# One layer's cache: keys and values, each (batch, slots, kv heads, head dim).
LayerCache = tuple[jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  vocab_size: int = 256000
  hidden_size: int = 2304
  intermediate_size: int = 9216
  num_hidden_layers: int = 26
  num_attention_heads: int = 8
  num_key_value_heads: int = 4
  head_dim: int = 256
  hidden_activation: str = "gelu_pytorch_tanh"
  max_position_embeddings: int = 8192
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  query_pre_attn_scalar: float = 256.0
  sliding_window: int | None = 4096
  layer_types: tuple[str, ...] = ()  # default: sliding, global, sliding, ... (transformers')
  attn_logit_softcapping: float | None = 50.0
  final_logit_softcapping: float | None = 30.0
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: tuple[int, ...] = (1,)

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", tuple(
          SLIDING if (i + 1) % 2 else GLOBAL for i in range(self.num_hidden_layers)))
    if len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(f"layer_types names {len(self.layer_types)} layers, num_hidden_layers "
                       f"is {self.num_hidden_layers}")
    unknown = set(self.layer_types) - {SLIDING, GLOBAL}
    if unknown:
      raise ValueError(f"unknown layer_types {sorted(unknown)}; expected {SLIDING!r} or "
                       f"{GLOBAL!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"{self.num_attention_heads} attention heads do not split into "
                       f"{self.num_key_value_heads} key/value heads")
    activation(self.hidden_activation)  # refuses an unknown one now, not at the first call

  @classmethod
  def from_transformers(cls, config: dict[str, Any]) -> "Gemma2Config":
    """From a transformers `Gemma2Config` config.json (4.x: rope_theta; 5.x: rope_parameters)."""
    if config.get("model_type") != "gemma2":
      raise ValueError(f"model_type is {config.get('model_type')!r}; expected 'gemma2' (a "
                       "Gemma 2 checkpoint such as google/gemma-2-2b-it)")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
      raise ValueError(f"RoPE scaling {rope or config.get('rope_scaling')} is not supported "
                       "(Gemma 2 uses plain RoPE)")
    if config.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention: this is a causal decoder only")
    if config.get("tie_word_embeddings") is False:
      raise ValueError("tie_word_embeddings is false: Gemma 2 ties its output projection to "
                       "the embeddings, and so does this model")
    fields = {f.name for f in dataclasses.fields(cls)}
    # null means "off" in transformers for these (no soft-capping, no window); for the others it
    # means "the default".
    nullable = {"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"}
    known = {k: v for k, v in config.items()
             if k in fields and (v is not None or k in nullable)}
    if "hidden_activation" not in known and config.get("hidden_act"):
      known["hidden_activation"] = config["hidden_act"]
    known["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if "layer_types" in known:
      known["layer_types"] = tuple(known["layer_types"])
    eos = known.get("eos_token_id", 1)
    known["eos_token_id"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    if "head_dim" not in known:
      known["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return cls(**known)


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: x / rms(x) * (1 + scale), in float32; `scale` is torch's `weight`."""

  def __init__(self, dim: int, epsilon: float, *, dtype, param_dtype):
    self.epsilon, self.dtype = epsilon, dtype
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of (B, T, heads, D) at (B, T) positions (transformers' half rotation)."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # (B, T, D/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]    # (B, T, 1, D)
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _linear(n_in, n_out, *, bias=False, rngs, dtype, param_dtype):
  return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Gemma2Attention(nnx.Module):
  def __init__(self, c: Gemma2Config, layer_type: str, *, rngs, dtype, param_dtype):
    kw = dict(bias=c.attention_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads, self.kv_heads, self.head_dim = (c.num_attention_heads, c.num_key_value_heads,
                                                c.head_dim)
    self.scale = c.query_pre_attn_scalar ** -0.5
    self.softcap = c.attn_logit_softcapping
    self.window = c.sliding_window if layer_type == SLIDING else None
    self.theta = c.rope_theta
    self.q_proj = _linear(c.hidden_size, self.heads * self.head_dim, **kw)
    self.k_proj = _linear(c.hidden_size, self.kv_heads * self.head_dim, **kw)
    self.v_proj = _linear(c.hidden_size, self.kv_heads * self.head_dim, **kw)
    self.o_proj = _linear(self.heads * self.head_dim, c.hidden_size, **kw)

  def __call__(self, x, positions, query_slots, key_valid, cache: LayerCache | None
               ) -> tuple[jax.Array, LayerCache | None]:
    """x (B, T, hidden) at (B, T) positions, written to slots query_slots (T,) of the cache
    (or, without one, attending to themselves: slots 0..T-1); key_valid (B, S) -> (B, T,
    hidden) and the updated cache."""
    batch, length = x.shape[:2]
    split = lambda t, heads: t.reshape(batch, length, heads, self.head_dim)
    query = rope(split(self.q_proj(x), self.heads), positions, self.theta)
    key = rope(split(self.k_proj(x), self.kv_heads), positions, self.theta)
    value = split(self.v_proj(x), self.kv_heads)
    if cache is not None:  # the T slots are consecutive: one update per array
      key = jax.lax.dynamic_update_slice_in_dim(cache[0], key.astype(cache[0].dtype),
                                                query_slots[0], axis=1)
      value = jax.lax.dynamic_update_slice_in_dim(cache[1], value.astype(cache[1].dtype),
                                                  query_slots[0], axis=1)
      cache = (key, value)
    key_slots = jnp.arange(key.shape[1])
    distance = query_slots[:, None] - key_slots[None, :]                   # (T, S)
    allowed = distance >= 0
    if self.window is not None:
      allowed &= distance < self.window
    allowed = allowed[None] & key_valid[:, None, :]                        # (B, T, S)
    # Grouped-query attention: query heads in groups of (heads / kv heads) per key/value head.
    groups = self.heads // self.kv_heads
    query = query.reshape(batch, length, self.kv_heads, groups, self.head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", query, key.astype(query.dtype),
                        preferred_element_type=jnp.float32) * self.scale
    if self.softcap is not None:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, value.astype(x.dtype))
    return self.o_proj(out.reshape(batch, length, -1)), cache


class Gemma2MLP(nnx.Module):
  def __init__(self, c: Gemma2Config, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = activation(c.hidden_activation)
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, **kw)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, **kw)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma2DecoderLayer(nnx.Module):
  def __init__(self, c: Gemma2Config, layer_type: str, *, rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.self_attn = Gemma2Attention(c, layer_type, rngs=rngs, **kw)
    self.mlp = Gemma2MLP(c, rngs=rngs, **kw)
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
    self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)

  def __call__(self, x, positions, query_slots, key_valid, cache):
    attended, cache = self.self_attn(self.input_layernorm(x), positions, query_slots, key_valid,
                                     cache)
    x = x + self.post_attention_layernorm(attended)
    x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    return x, cache


class Gemma2Model(nnx.Module):
  """Embeddings, decoder layers and the final norm (transformers' `Gemma2Model`)."""

  def __init__(self, c: Gemma2Config, *, rngs, dtype, param_dtype):
    self.config, self.dtype = c, dtype
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, param_dtype=param_dtype,
                                  rngs=rngs)
    self.layers = nnx.List([Gemma2DecoderLayer(c, t, rngs=rngs, dtype=dtype,
                                               param_dtype=param_dtype)
                            for t in c.layer_types])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, input_ids, *, positions=None, cache: list[LayerCache] | None = None,
               cache_index=0, key_valid=None) -> tuple[jax.Array, list[LayerCache] | None]:
    """input_ids (B, T) -> (hidden states (B, T, hidden), the updated cache).

    Without a cache: one causal pass over the T tokens (positions 0..T-1 unless given). With
    one (`init_cache`): the tokens go to slots cache_index..cache_index+T-1 and attend to every
    earlier slot that key_valid (B, S) marks (default: all).
    """
    batch, length = input_ids.shape
    query_slots = cache_index + jnp.arange(length)
    if positions is None:
      positions = jnp.broadcast_to(query_slots, (batch, length))
    if key_valid is None:
      slots = length if cache is None else cache[0][0].shape[1]
      key_valid = jnp.ones((batch, slots), bool)
    # The scale is rounded to the compute dtype first, as transformers does.
    x = self.embed_tokens(input_ids).astype(self.dtype) * jnp.asarray(
        math.sqrt(self.config.hidden_size), self.dtype)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, positions, query_slots, key_valid,
                             None if cache is None else cache[i])
      new_cache.append(layer_cache)
    return self.norm(x), (new_cache if cache is not None else None)


class Gemma2ForCausalLM(nnx.Module):
  """The decoder and its tied output projection (transformers' `Gemma2ForCausalLM`)."""

  def __init__(self, config: Gemma2Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.model = Gemma2Model(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Hidden states -> float32 logits over the vocabulary, soft-capped."""
    table = self.model.embed_tokens.embedding[...]
    logits = jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    cap = self.config.final_logit_softcapping
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def init_cache(self, batch: int, slots: int, dtype=None) -> list[LayerCache]:
    c = self.config
    shape = (batch, slots, c.num_key_value_heads, c.head_dim)
    dtype = dtype or self.model.dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in c.layer_types]

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    """(B, T) token ids -> (B, T, vocab) float32 logits of one causal pass (no padding)."""
    hidden, _ = self.model(input_ids)
    return self.logits(hidden)
