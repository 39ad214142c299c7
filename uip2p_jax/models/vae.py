"""`AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX, NHWC, names as in diffusers."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.attention import multi_head_attention
from uip2p_jax.models.layers import (Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv,
                                     linear)
from uip2p_jax.models.partitioning import remat_call

_REQUIRED_VALUES = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
    "shift_factor": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture fields of a diffusers `vae/config.json`."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  sample_size: int = 512

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> "VAEConfig":
    for key, required in _REQUIRED_VALUES.items():
      if key in config and config[key] != required:
        raise ValueError(f"vae config: {key}={config[key]!r} is not supported "
                         f"(expected {required!r})")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
      for block_type in config.get(key, ()):
        if block_type != allowed:
          raise ValueError(f"vae config: {key} entry {block_type!r} not supported "
                           f"(expected {allowed!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in config.items() if k in fields})

  def to_diffusers(self) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    n = len(self.block_out_channels)
    out.update({"_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, **_REQUIRED_VALUES})
    return out


class SpatialSelfAttention(nnx.Module):
  """The VAE mid-block attention: single head over all pixels, GroupNorm, residual."""

  def __init__(self, channels: int, groups: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(channels, groups, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.to_q = linear(channels, channels, **kw)
    self.to_k = linear(channels, channels, **kw)
    self.to_v = linear(channels, channels, **kw)
    self.to_out = nnx.List([linear(channels, channels, **kw)])

  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = self.group_norm(x).reshape(batch, height * width, 1, channels)
    q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
    out = multi_head_attention(q, k, v, scale=channels ** -0.5)
    return x + self.to_out[0](out).reshape(x.shape)


class VAEMidBlock(nnx.Module):
  def __init__(self, channels: int, groups: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups,
                                           eps=1e-6, **kw) for _ in range(2)])
    self.attentions = nnx.List([SpatialSelfAttention(channels, groups, **kw)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class ResampleBlock(nnx.Module):
  """`DownEncoderBlock2D` (downsamplers) or `UpDecoderBlock2D` (upsamplers)."""

  def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, *, down: bool,
               resample: bool, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_channels=None,
                                           groups=groups, eps=1e-6, **kw)
                             for j in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_ch, padding=0, **kw)])
                         if down and resample else None)
    self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)]) if not down and resample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  def __init__(self, c: VAEConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, n = c.block_out_channels, len(c.block_out_channels)
    self.conv_in = conv(c.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List([
        ResampleBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.norm_num_groups, down=True,
                      resample=i < n - 1, **kw) for i in range(n)])
    self.mid_block = VAEMidBlock(ch[-1], c.norm_num_groups, **kw)
    self.conv_norm_out = GroupNorm(ch[-1], c.norm_num_groups, 1e-6, dtype=dtype,
                                   param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], 2 * c.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, c: VAEConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch, n = tuple(reversed(c.block_out_channels)), len(c.block_out_channels)
    self.conv_in = conv(c.latent_channels, ch[0], 3, **kw)
    self.mid_block = VAEMidBlock(ch[0], c.norm_num_groups, **kw)
    self.up_blocks = nnx.List([
        ResampleBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c.norm_num_groups,
                      down=False, resample=i < n - 1, **kw) for i in range(n)])
    self.conv_norm_out = GroupNorm(ch[-1], c.norm_num_groups, 1e-6, dtype=dtype,
                                   param_dtype=param_dtype)
    self.conv_out = conv(ch[-1], c.out_channels, 3, **kw)
    self.remat = "none"  # per-block activation recomputation (partitioning.REMAT_POLICIES)

  def __call__(self, z):
    call = lambda block, x: block(x)
    x = remat_call(self.remat, call, self.mid_block, self.conv_in(z))
    for block in self.up_blocks:
      x = remat_call(self.remat, call, block, x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The encoder's posterior over latents; arrays are (B, h, w, latent_channels) float32."""
  mean: jax.Array
  logvar: jax.Array

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape,
                                                                       self.mean.dtype)


jax.tree_util.register_dataclass(DiagonalGaussian, data_fields=["mean", "logvar"], meta_fields=[])


class AutoencoderKL(nnx.Module):
  """VAE with downsampling factor 2 ** (levels - 1). Images are NHWC in [-1, 1].

  `encode` returns unscaled latents' posterior; multiply samples by `config.scaling_factor`
  for the diffusion latent. `decode` takes unscaled latents.
  """

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = conv(2 * config.latent_channels, 2 * config.latent_channels, 1, **kw)
    self.post_quant_conv = conv(config.latent_channels, config.latent_channels, 1, **kw)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.config.block_out_channels) - 1)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images: (B, H, W, 3) in [-1, 1] -> posterior with (B, H/f, W/f, latent_channels)."""
    moments = self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents: (B, h, w, latent_channels), unscaled -> (B, h*f, w*f, 3) float32 images."""
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)
