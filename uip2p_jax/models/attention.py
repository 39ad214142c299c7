"""Attention for the UNet: `Attention`, the GEGLU feed-forward, `BasicTransformerBlock`,
`Transformer2DModel`, and cross-attention capture.

Cross-attention capture returns, from the same forward pass, the head-averaged softmax
probabilities of the selected `attn2` layers as `(batch, h, w, tokens)` float32 arrays. Only the
selected layers compute probabilities explicitly; every other layer goes through
`jax.nn.dot_product_attention`, so unselected resolutions never materialise a probability tensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.layers import GroupNorm, LayerNorm, conv, linear
from uip2p_jax.models.partitioning import batch_split


@dataclasses.dataclass(frozen=True)
class AttentionCapture:
  """Selects the cross-attention layers whose probabilities a UNet call returns.

  resolutions: heights of the feature maps to capture (e.g. (16,) for the 16x16 level: the
    third level of a 512 px image, the second of a 256 px one); None captures every resolution.
  blocks: layer-name prefixes such as "down_blocks.2", "mid_block", "up_blocks"; None = all.
  A layer is captured when it passes both filters. Hashable, so it can be a static jit argument.
  """
  resolutions: tuple[int, ...] | None = None
  blocks: tuple[str, ...] | None = None

  def selects(self, layer_name: str, height: int) -> bool:
    if self.resolutions is not None and height not in self.resolutions:
      return False
    if self.blocks is not None:
      return any(layer_name == b or layer_name.startswith(b + ".") for b in self.blocks)
    return True


Captures = dict[str, jax.Array]


def attention_weights(query: jax.Array, key: jax.Array, scale: float,
                      mask: jax.Array | None = None) -> jax.Array:
  """Softmax probabilities (B, heads, Q, K) in float32 from (B, T, heads, D) queries and keys."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def blockwise_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float,
                        block_bytes: int = 4 << 20) -> jax.Array:
  """Memory-efficient attention in plain JAX: queries in blocks, logits never all at once.

  (B, Q, heads, D) x (B, K, heads, D) -> (B, Q, heads, D). When all logits fit in
  `block_bytes` they are computed at once. Otherwise, on one device, `lax.map` walks the
  B x heads pairs (plain 2-D matmuls, which XLA:CPU runs fastest) and, if one pair's (Q, K)
  float32 logits exceed `block_bytes`, its query blocks. When the batch is split over devices
  (traced under a mesh) the map walks query blocks only, every example and head at once: a map
  over the batch would make every device walk the whole batch. Mapped blocks run under
  `jax.checkpoint`, so the backward pass recomputes them instead of storing every probability.
  Softmax statistics are float32.
  """
  batch, q_len, heads, dim = query.shape
  k_len = key.shape[1]
  q = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)  # (B, H, Q, D)
  k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)

  def attend(q_block, k, v):  # (..., q, D) x (..., K, D) -> (..., q, D)
    logits = jnp.einsum("...qd,...kd->...qk", q_block, k, preferred_element_type=jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("...qk,...kd->...qd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(query.dtype)

  if batch * heads * q_len * k_len * 4 <= block_bytes:
    return attend(q, k, v).transpose(0, 2, 1, 3)
  # Inside lax.map no CSE can merge the recomputation away, so the optimisation barrier
  # (which costs ~30% in the forward pass on XLA:CPU) is not needed.
  remat_attend = jax.checkpoint(attend, prevent_cse=False)
  split = batch_split()
  if split > 1:  # one step holds (local batch x heads x block x K) logits on each accelerator
    row_bytes, budget = max(batch // split, 1) * heads * k_len * 4, block_bytes * 32
  else:          # one step holds (block x K): sized for a CPU's caches
    row_bytes, budget = k_len * 4, block_bytes
  block = q_len
  while block % 2 == 0 and block > 16 and block * row_bytes > budget:
    block //= 2
  if split > 1 and block == q_len:  # fits in one step: no loop (the layer's remat applies)
    out = attend(q, k, v)
  elif split > 1:
    blocks = q.reshape(batch, heads, q_len // block, block, dim).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda qb: remat_attend(qb, k, v), blocks)  # (n, B, H, block, D)
    out = out.transpose(1, 2, 0, 3, 4).reshape(batch, heads, q_len, dim)
  else:
    flat = lambda t: t.reshape(batch * heads, *t.shape[2:])

    def one_head(args):
      q_head, k_head, v_head = args  # (Q, D), (K, D), (K, D)
      if block == q_len:
        return remat_attend(q_head, k_head, v_head)
      blocks = q_head.reshape(q_len // block, block, dim)
      out = jax.lax.map(lambda qb: remat_attend(qb, k_head, v_head), blocks)
      return out.reshape(q_len, dim)

    out = jax.lax.map(one_head, (flat(q), flat(k), flat(v))).reshape(batch, heads, q_len, dim)
  return out.transpose(0, 2, 1, 3)


ATTENTION_BACKENDS = ("auto", "blockwise", "xla", "cudnn")


def multi_head_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float,
                         is_causal: bool = False, backend: str = "auto") -> jax.Array:
  """(B, T, heads, D) attention without materialising full probabilities where possible.

  backend: "blockwise" (ours above, any platform), "xla" / "cudnn" (`jax.nn.dot_product_attention`
  implementations; cudnn is flash attention on NVIDIA GPUs, half precision only), or "auto":
  cudnn on GPU for bf16/fp16, blockwise otherwise. Causal attention (CLIP text, 77 tokens) always
  uses `jax.nn.dot_product_attention`.
  """
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
  if backend == "auto":
    half = query.dtype in (jnp.bfloat16, jnp.float16)
    backend = "cudnn" if jax.default_backend() == "gpu" and half else "blockwise"
  if is_causal or backend != "blockwise":
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                        implementation=None if backend == "blockwise" else backend)
  return blockwise_attention(query, key, value, scale=scale)


class Attention(nnx.Module):
  """diffusers' `Attention`: to_q/to_k/to_v (no bias) and to_out.0 (bias)."""

  def __init__(self, query_dim: int, *, heads: int, head_dim: int, context_dim: int | None = None,
               qkv_bias: bool = False, backend: str = "auto", rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    inner = heads * head_dim
    context_dim = context_dim or query_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads, self.head_dim, self.backend = heads, head_dim, backend
    self.to_q = linear(query_dim, inner, use_bias=qkv_bias, **kw)
    self.to_k = linear(context_dim, inner, use_bias=qkv_bias, **kw)
    self.to_v = linear(context_dim, inner, use_bias=qkv_bias, **kw)
    self.to_out = nnx.List([linear(inner, query_dim, **kw)])

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               return_probs: bool = False):
    """x: (B, Q, Cq); context: (B, K, Cc) or None (self-attention).

    Returns (B, Q, Cq), or with `return_probs` also the head-averaged (B, Q, K) float32 probs.
    """
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    scale = self.head_dim ** -0.5
    if return_probs:
      probs = attention_weights(q, k, scale)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      out = multi_head_attention(q, k, v, scale=scale, backend=self.backend)
    out = self.to_out[0](out.reshape(*out.shape[:2], -1))
    return (out, probs.mean(axis=1)) if return_probs else out


class GEGLU(nnx.Module):
  def __init__(self, dim_in: int, dim_out: int, *, rngs, dtype, param_dtype):
    self.proj = linear(dim_in, dim_out * 2, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class Identity(nnx.Module):
  """Stands where diffusers keeps a parameterless Dropout, so list indices match checkpoints."""

  def __call__(self, x):
    return x


class FeedForward(nnx.Module):
  """`ff.net` = [GEGLU, Dropout, Linear], indices kept for the checkpoint keys ff.net.0/ff.net.2."""

  def __init__(self, dim: int, *, mult: int = 4, rngs, dtype, param_dtype):
    inner = dim * mult
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.net = nnx.List([GEGLU(dim, inner, **kw), Identity(), linear(inner, dim, **kw)])

  def __call__(self, x):
    for layer in self.net:
      x = layer(x)
    return x


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm residuals."""

  def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, name: str,
               backend: str, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.name = name  # checkpoint-style path, used to name captured maps
    self.norm1 = LayerNorm(dim, 1e-5, **kw)
    self.attn1 = Attention(dim, heads=heads, head_dim=head_dim, backend=backend, rngs=rngs, **kw)
    self.norm2 = LayerNorm(dim, 1e-5, **kw)
    self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim,
                           backend=backend, rngs=rngs, **kw)
    self.norm3 = LayerNorm(dim, 1e-5, **kw)
    self.ff = FeedForward(dim, rngs=rngs, **kw)

  def __call__(self, x, context, *, height: int, capture: AttentionCapture | None):
    captures: Captures = {}
    x = x + self.attn1(self.norm1(x))
    layer_name = f"{self.name}.attn2"
    if capture is not None and capture.selects(layer_name, height):
      attn_out, probs = self.attn2(self.norm2(x), context, return_probs=True)
      captures[layer_name] = probs.reshape(probs.shape[0], height, -1, probs.shape[-1])
    else:
      attn_out = self.attn2(self.norm2(x), context)
    x = x + attn_out
    x = x + self.ff(self.norm3(x))
    return x, captures


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out -> residual."""

  def __init__(self, channels: int, *, heads: int, context_dim: int, groups: int,
               use_linear_projection: bool, num_layers: int, name: str,
               backend: str, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.use_linear_projection = use_linear_projection
    self.norm = GroupNorm(channels, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    project = linear if use_linear_projection else (lambda i, o, **k: conv(i, o, 1, **k))
    self.proj_in = project(channels, channels, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads=heads, head_dim=channels // heads,
                              context_dim=context_dim, name=f"{name}.transformer_blocks.{i}",
                              backend=backend, **kw)
        for i in range(num_layers)])
    self.proj_out = project(channels, channels, **kw)

  def __call__(self, x, context, *, capture: AttentionCapture | None = None):
    """x: (B, H, W, C), context: (B, T, Cc) -> ((B, H, W, C), captures)."""
    batch, height, width, channels = x.shape
    residual = x
    h = self.norm(x)
    if not self.use_linear_projection:
      h = self.proj_in(h)
    h = h.reshape(batch, height * width, channels)
    if self.use_linear_projection:
      h = self.proj_in(h)
    captures: Captures = {}
    for block in self.transformer_blocks:
      h, block_captures = block(h, context, height=height, capture=capture)
      captures.update(block_captures)
    if self.use_linear_projection:
      h = self.proj_out(h)
    h = h.reshape(batch, height, width, channels)
    if not self.use_linear_projection:
      h = self.proj_out(h)
    return h + residual, captures
