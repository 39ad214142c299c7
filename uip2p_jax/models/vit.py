"""A Vision Transformer as transformers' `ViTModel` (DINO ViT-S/16 for the MagicBrush metric).

Parameter names mirror the transformers checkpoint (`facebook/dino-vits16`), so
`uip2p_jax.weights.load_vit` reads it through the same key table as the other models.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.attention import multi_head_attention
from uip2p_jax.models.layers import LayerNorm, activation, conv, linear


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden_size: int = 384
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True

  @classmethod
  def from_transformers(cls, config: dict[str, Any]) -> "ViTConfig":
    if config.get("model_type") not in (None, "vit", "dino"):
      raise ValueError(f"model_type {config.get('model_type')!r} is not a ViT")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in names})


class ViTEmbeddings(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    patches = (c.image_size // c.patch_size) ** 2
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, c.hidden_size),
                                                 param_dtype) * 0.02)
    self.position_embeddings = nnx.Param(
        jax.random.normal(rngs.params(), (1, patches + 1, c.hidden_size), param_dtype) * 0.02)
    self.patch_embeddings = _PatchEmbeddings(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, pixels):
    patches = self.patch_embeddings.projection(pixels)
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype),
                           (patches.shape[0], 1, patches.shape[-1]))
    return (jnp.concatenate([cls, patches], axis=1)
            + self.position_embeddings[...].astype(patches.dtype))


class _PatchEmbeddings(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    self.projection = conv(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                           padding="VALID", rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class _SelfAttention(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=c.qkv_bias)
    self.query = linear(c.hidden_size, c.hidden_size, **kw)
    self.key = linear(c.hidden_size, c.hidden_size, **kw)
    self.value = linear(c.hidden_size, c.hidden_size, **kw)


class _Dense(nnx.Module):
  def __init__(self, in_dim: int, out_dim: int, *, rngs, dtype, param_dtype):
    self.dense = linear(in_dim, out_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class _Attention(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    self.attention = _SelfAttention(c, **kw)
    self.output = _Dense(c.hidden_size, c.hidden_size, **kw)

  def __call__(self, x):
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
    a = self.attention
    out = multi_head_attention(split(a.query(x)), split(a.key(x)), split(a.value(x)),
                               scale=self.head_dim ** -0.5)
    return self.output.dense(out.reshape(x.shape[:2] + (-1,)))


class ViTLayer(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = activation(c.hidden_act)
    self.attention = _Attention(c, **kw)
    self.layernorm_before = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype,
                                      param_dtype=param_dtype)
    self.intermediate = _Dense(c.hidden_size, c.intermediate_size, **kw)
    self.output = _Dense(c.intermediate_size, c.hidden_size, **kw)
    self.layernorm_after = LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype)

  def __call__(self, x):
    x = x + self.attention(self.layernorm_before(x))
    return x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))


class _Encoder(nnx.Module):
  def __init__(self, c: ViTConfig, *, rngs, dtype, param_dtype):
    self.layer = nnx.List([ViTLayer(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                           for _ in range(c.num_hidden_layers)])

  def __call__(self, x):
    for layer in self.layer:
      x = layer(x)
    return x


class ViTModel(nnx.Module):
  """(B, S, S, 3) normalised pixels -> last hidden state (B, N+1, D) after the final norm.

  The [CLS] row of the output is DINO's image embedding (what torch.hub's `dino_vits16`
  returns). No pooler: DINO checkpoints have none (a checkpoint's pooler weights are ignored).
  """

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.dtype = dtype
    self.embeddings = ViTEmbeddings(config, **kw)
    self.encoder = _Encoder(config, **kw)
    self.layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype,
                               param_dtype=param_dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    size = self.config.image_size
    if pixels.shape[1:3] != (size, size):
      raise ValueError(f"ViT expects {size}x{size} images, got {pixels.shape[1]}x"
                       f"{pixels.shape[2]}")
    x = self.encoder(self.embeddings(pixels.astype(self.dtype)))
    return self.layernorm(x).astype(jnp.float32)

  def embed(self, pixels: jax.Array) -> jax.Array:
    """L2-normalised [CLS] embeddings (B, D)."""
    cls = self(pixels)[:, 0]
    return cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
