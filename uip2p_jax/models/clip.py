"""CLIP in Flax NNX: the text transformer (Stable Diffusion's text encoder) and the full model
with the vision transformer and both projections. Names follow transformers' `CLIPModel`.

Images enter NHWC, already resized and normalised (see `preprocess_images`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.attention import multi_head_attention
from uip2p_jax.models.layers import LayerNorm, activation, conv, linear
from uip2p_jax.models.partitioning import remat_call

# OpenAI CLIP's image normalisation (also in every CLIP preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _from_known_fields(cls, config: dict[str, Any]):
  """The dataclass from the config keys it declares (transformers configs carry many more)."""
  fields = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in config.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 768

  @classmethod
  def from_transformers(cls, config: dict[str, Any]) -> "CLIPTextConfig":
    return _from_known_fields(cls, config)

  def to_transformers(self) -> dict[str, Any]:
    """A `CLIPTextModel` config.json."""
    return {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"],
            **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_transformers(cls, config: dict[str, Any]) -> "CLIPVisionConfig":
    return _from_known_fields(cls, config)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 768

  @classmethod
  def from_transformers(cls, config: dict[str, Any]) -> "CLIPConfig":
    for key in ("text_config", "vision_config"):
      if key not in config:
        raise ValueError(f"CLIP config has no {key!r}: expected a transformers CLIPModel "
                         "config.json (model_type 'clip')")
    return cls(CLIPTextConfig.from_transformers(config["text_config"]),
               CLIPVisionConfig.from_transformers(config["vision_config"]),
               config.get("projection_dim", 512))

  def to_transformers(self) -> dict[str, Any]:
    """A `CLIPModel` config.json."""
    return {"model_type": "clip", "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "text_config": {"model_type": "clip_text_model", **dataclasses.asdict(self.text)},
            "vision_config": {"model_type": "clip_vision_model",
                              **dataclasses.asdict(self.vision)}}


class CLIPAttention(nnx.Module):
  def __init__(self, dim: int, heads: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.heads, self.head_dim = heads, dim // heads
    self.q_proj = linear(dim, dim, **kw)
    self.k_proj = linear(dim, dim, **kw)
    self.v_proj = linear(dim, dim, **kw)
    self.out_proj = linear(dim, dim, **kw)

  def __call__(self, x, *, causal: bool):
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
    out = multi_head_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                               scale=self.head_dim ** -0.5, is_causal=causal)
    return self.out_proj(out.reshape(x.shape[:2] + (-1,)))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.act = activation(act)
    self.fc1 = linear(dim, hidden, **kw)
    self.fc2 = linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, dim, heads, hidden, act, eps, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attn = CLIPAttention(dim, heads, **kw)
    self.layer_norm1 = LayerNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)
    self.mlp = CLIPMLP(dim, hidden, act, **kw)
    self.layer_norm2 = LayerNorm(dim, eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, *, causal: bool):
    x = x + self.self_attn(self.layer_norm1(x), causal=causal)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, c: CLIPTextConfig | CLIPVisionConfig, *, rngs, dtype, param_dtype):
    self.layers = nnx.List([
        CLIPEncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                         c.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        for _ in range(c.num_hidden_layers)])
    self.remat = "none"  # per-layer activation recomputation (partitioning.REMAT_POLICIES)

  def __call__(self, x, *, causal: bool):
    for layer in self.layers:
      x = remat_call(self.remat, lambda l, h: l(h, causal=causal), layer, x)
    return x


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, c: CLIPTextConfig, *, rngs, param_dtype):
    self.token_embedding = nnx.Embed(c.vocab_size, c.hidden_size, param_dtype=param_dtype,
                                     rngs=rngs)
    self.position_embedding = nnx.Embed(c.max_position_embeddings, c.hidden_size,
                                        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids):
    positions = jnp.arange(input_ids.shape[1])[None, :]
    return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nnx.Module):
  """The text tower; as a standalone module this is Stable Diffusion's text encoder."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, param_dtype=param_dtype)
    self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype,
                                      param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """input_ids: (B, T) int32 -> (last_hidden_state (B, T, D), pooled (B, D)), float32."""
    if input_ids.shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[1]} tokens exceed the text encoder's "
                       f"{self.config.max_position_embeddings} positions")
    x = self.embeddings(input_ids).astype(self.dtype)
    x = self.final_layer_norm(self.encoder(x, causal=True)).astype(jnp.float32)
    # transformers' pooling: legacy configs (eos id 2) take the highest id, others the first EOS.
    if self.config.eos_token_id == 2:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
    return x, pooled


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, c: CLIPVisionConfig, *, rngs, dtype, param_dtype):
    num_positions = (c.image_size // c.patch_size) ** 2 + 1
    self.patch_size = c.patch_size
    self.class_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (c.hidden_size,), param_dtype) * 0.02)
    self.patch_embedding = conv(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                padding="VALID", use_bias=False, rngs=rngs, dtype=dtype,
                                param_dtype=param_dtype)
    self.position_embedding = nnx.Embed(num_positions, c.hidden_size, param_dtype=param_dtype,
                                        rngs=rngs)

  def __call__(self, pixels):
    patches = self.patch_embedding(pixels)
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype),
                           (patches.shape[0], 1, patches.shape[-1]))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
  def __init__(self, config: CLIPVisionConfig, *, rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs, **kw)
    self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)
    self.encoder = CLIPEncoder(config, rngs=rngs, **kw)
    self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)

  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """pixels: (B, S, S, 3) normalised -> (last_hidden_state (B, N+1, D), pooled (B, D))."""
    size = self.config.image_size
    if pixels.shape[1:3] != (size, size):
      raise ValueError(f"CLIP vision expects {size}x{size} images, got "
                       f"{pixels.shape[1]}x{pixels.shape[2]}; use preprocess_images first")
    x = self.pre_layrnorm(self.embeddings(pixels.astype(self.dtype)))
    x = self.encoder(x, causal=False)
    pooled = self.post_layernorm(x[:, 0])
    return x.astype(jnp.float32), pooled.astype(jnp.float32)


class CLIPModel(nnx.Module):
  """Text and vision towers with their projections (`get_text_features`, `get_image_features`)."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.text_model = CLIPTextTransformer(config.text, **kw)
    self.vision_model = CLIPVisionTransformer(config.vision, **kw)
    self.text_projection = linear(config.text.hidden_size, config.projection_dim, use_bias=False,
                                  **kw)
    self.visual_projection = linear(config.vision.hidden_size, config.projection_dim,
                                    use_bias=False, **kw)
    self.logit_scale = nnx.Param(jnp.asarray(2.6592, param_dtype))

  def get_text_features(self, input_ids: jax.Array) -> jax.Array:
    """(B, T) ids -> (B, projection_dim) float32, not normalised."""
    _, pooled = self.text_model(input_ids)
    return self.text_projection(pooled).astype(jnp.float32)

  def get_image_features(self, pixels: jax.Array) -> jax.Array:
    """(B, S, S, 3) CLIP-normalised pixels -> (B, projection_dim) float32, not normalised."""
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled).astype(jnp.float32)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images in [-1, 1] -> L2-normalised (B, projection_dim); differentiable."""
    features = self.get_image_features(preprocess_images(images, self.config.vision.image_size))
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

  def embed_texts(self, input_ids: jax.Array) -> jax.Array:
    features = self.get_text_features(input_ids)
    return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def preprocess_images(images: jax.Array, size: int) -> jax.Array:
  """Differentiable CLIP preprocessing of (B, H, W, 3) images in [-1, 1].

  Resizes the shorter side to `size` (bicubic, antialiased), centre-crops to size x size, and
  normalises with CLIP's mean and std, like CLIPImageProcessor but without leaving JAX.
  """
  batch, height, width, channels = images.shape
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  x = jax.image.resize(x, (batch, new_h, new_w, channels), "bicubic", antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  x = x[:, top:top + size, left:left + size]
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
