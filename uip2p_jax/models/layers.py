"""Building blocks shared by the UNet and the VAE: norms, ResNet blocks, resampling.

Arrays are NHWC. Every module takes `dtype` (the compute dtype, e.g. bfloat16) and
`param_dtype` (the storage dtype). Norms always compute in float32 and hand back the compute
dtype, so bfloat16 runs keep their statistics exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.Module):
  """GroupNorm over the channel (last) axis; `scale`/`bias` map to torch's `weight`/`bias`."""

  def __init__(self, num_channels: int, num_groups: int, epsilon: float, *,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (batch, ..., channels) -> same shape, compute dtype.

    Statistics are reduced over the spatial axes first (contiguous (B, ..., C) -> (B, C) sums),
    then over the channels of each group; normalisation is one fused x * a + b. This is 2.5x
    faster on XLA:CPU than reshaping x to (B, HW, groups, C/groups), and stays two-pass exact.
    """
    batch, channels = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    count = x.size // (batch * self.num_groups)
    per_group = lambda sums: sums.reshape(batch, self.num_groups, -1).sum(-1) / count
    per_channel = lambda stat: jnp.repeat(stat, channels // self.num_groups, axis=-1).reshape(
        (batch,) + (1,) * len(spatial) + (channels,))
    x32 = x.astype(jnp.float32)
    mean = per_channel(per_group(x32.sum(spatial)))
    var = per_channel(per_group(jnp.square(x32 - mean).sum(spatial)))
    a = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
    return (x32 * a + (self.bias[...].astype(jnp.float32) - mean * a)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, num_features: int, epsilon: float = 1e-5, *,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs, stride: int = 1,
         padding=None, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Conv:
  """A 2D convolution with torch's default ('same' for odd kernels at stride 1) padding."""
  if padding is None:
    padding = ((kernel_size // 2,) * 2,) * 2
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), (stride, stride),
                  padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
           dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
  """diffusers' `ResnetBlock2D` (pre-activation, optional timestep projection, 1x1 shortcut)."""

  def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
               groups: int, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(in_channels, groups, eps, **kw)
    self.conv1 = conv(in_channels, out_channels, 3, rngs=rngs, **kw)
    self.time_emb_proj = (linear(temb_channels, out_channels, rngs=rngs, **kw)
                          if temb_channels is not None else None)
    self.norm2 = GroupNorm(out_channels, groups, eps, **kw)
    self.conv2 = conv(out_channels, out_channels, 3, rngs=rngs, **kw)
    self.conv_shortcut = (conv(in_channels, out_channels, 1, rngs=rngs, **kw)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x: (B, H, W, Cin); temb: (B, Ct) or None -> (B, H, W, Cout)."""
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return shortcut + h


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. `padding=1` (UNet) pads both sides; `padding=0` (VAE) pads right/bottom."""

  def __init__(self, channels: int, *, padding: int, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
    self.conv = conv(channels, channels, 3, stride=2, padding=pad, rngs=rngs, dtype=dtype,
                     param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.conv = conv(channels, channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, as diffusers' `Timesteps`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
