"""`UNet2DConditionModel` of the Stable Diffusion 1.x family (and InstructPix2Pix's 8-channel
variant) in Flax NNX, NHWC. Attribute names mirror diffusers' module tree, so the checkpoint key
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight` is the parameter
`unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.kernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.attention import (ATTENTION_BACKENDS, AttentionCapture, Captures,
                                        Transformer2DModel)
from uip2p_jax.models.layers import (Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv,
                                     linear, timestep_embedding)
from uip2p_jax.models.partitioning import remat_call

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys that change the architecture, with the only value we implement.
_REQUIRED_VALUES = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "cross_attention_norm": None,
    "attention_type": "default",
    "num_class_embeds": None,
}


def _per_block(value, n: int, key: str) -> tuple:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
  if len(values) != n:
    raise ValueError(f"unet config: {key} has {len(values)} entries, expected {n} (one per block)")
  return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture fields of a diffusers `unet/config.json`."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  layers_per_block: int = 2
  # diffusers' naming quirk: for SD 1.x `attention_head_dim` is the number of heads.
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 768
  transformer_layers_per_block: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  sample_size: int = 64

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
    for key, required in _REQUIRED_VALUES.items():
      if key in config and config[key] != required:
        raise ValueError(f"unet config: {key}={config[key]!r} is not supported "
                         f"(expected {required!r})")
    only_cross = config.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
      raise ValueError("unet config: only_cross_attention=true is not supported (expected false)")
    if not isinstance(config.get("cross_attention_dim", 768), int):
      raise ValueError("unet config: cross_attention_dim must be one integer, "
                       f"got {config['cross_attention_dim']!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    unet_config = cls(**kwargs)
    unet_config.validate()
    return unet_config

  def to_diffusers(self) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    out.update({"_class_name": "UNet2DConditionModel", "only_cross_attention": False,
                **_REQUIRED_VALUES})
    return out

  def validate(self) -> None:
    n = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
      if len(getattr(self, key)) != n:
        raise ValueError(f"unet config: {key} has {len(getattr(self, key))} entries, "
                         f"expected {n} (len(block_out_channels))")
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"unet config: down block type {t!r} not supported; expected one of "
                         f"{DOWN_BLOCK_TYPES}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"unet config: up block type {t!r} not supported; expected one of "
                         f"{UP_BLOCK_TYPES}")
    for heads, channels in zip(self.heads, self.block_out_channels):
      if channels % heads:
        raise ValueError(f"unet config: {channels} channels do not split into {heads} heads")
    _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

  @property
  def heads(self) -> tuple[int, ...]:
    heads = self.num_attention_heads or self.attention_head_dim
    return _per_block(heads, len(self.block_out_channels), "attention_head_dim")

  @property
  def transformer_layers(self) -> tuple[int, ...]:
    return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                      "transformer_layers_per_block")


class TimestepEmbedding(nnx.Module):
  def __init__(self, in_dim: int, time_dim: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_1 = linear(in_dim, time_dim, **kw)
    self.linear_2 = linear(time_dim, time_dim, **kw)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class DownBlock(nnx.Module):
  """`CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (attentions=None)."""

  def __init__(self, c: UNetConfig, index: int, *, backend, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    out_ch = c.block_out_channels[index]
    in_ch = c.block_out_channels[max(index - 1, 0)]
    temb_ch = c.block_out_channels[0] * 4
    self.resnets = nnx.List([
        ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_channels=temb_ch,
                      groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        for j in range(c.layers_per_block)])
    has_attention = c.down_block_types[index] == "CrossAttnDownBlock2D"
    self.attentions = None if not has_attention else nnx.List([
        Transformer2DModel(out_ch, heads=c.heads[index], context_dim=c.cross_attention_dim,
                           groups=c.norm_num_groups, use_linear_projection=c.use_linear_projection,
                           num_layers=c.transformer_layers[index],
                           name=f"down_blocks.{index}.attentions.{j}", backend=backend, **kw)
        for j in range(c.layers_per_block)])
    is_final = index == len(c.block_out_channels) - 1
    self.downsamplers = (None if is_final else
                         nnx.List([Downsample2D(out_ch, padding=c.downsample_padding, **kw)]))

  def __call__(self, h, temb, context, capture):
    skips, captures = [], {}
    for j, resnet in enumerate(self.resnets):
      h = resnet(h, temb)
      if self.attentions is not None:
        h, caps = self.attentions[j](h, context, capture=capture)
        captures.update(caps)
      skips.append(h)
    if self.downsamplers is not None:
      h = self.downsamplers[0](h)
      skips.append(h)
    return h, skips, captures


class MidBlock(nnx.Module):
  """`UNetMidBlock2DCrossAttn`: resnet, (attention, resnet) x transformer layers."""

  def __init__(self, c: UNetConfig, *, backend, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    ch = c.block_out_channels[-1]
    temb_ch = c.block_out_channels[0] * 4
    self.resnets = nnx.List([
        ResnetBlock2D(ch, ch, temb_channels=temb_ch, groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        for _ in range(2)])
    self.attentions = nnx.List([
        Transformer2DModel(ch, heads=c.heads[-1], context_dim=c.cross_attention_dim,
                           groups=c.norm_num_groups, use_linear_projection=c.use_linear_projection,
                           num_layers=c.transformer_layers[-1], name="mid_block.attentions.0",
                           backend=backend, **kw)])

  def __call__(self, h, temb, context, capture):
    h = self.resnets[0](h, temb)
    h, captures = self.attentions[0](h, context, capture=capture)
    return self.resnets[1](h, temb), captures


class UpBlock(nnx.Module):
  """`CrossAttnUpBlock2D` (with attentions) or `UpBlock2D`; consumes layers_per_block+1 skips."""

  def __init__(self, c: UNetConfig, index: int, *, backend, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    reversed_ch = tuple(reversed(c.block_out_channels))
    n_blocks = len(reversed_ch)
    out_ch = reversed_ch[index]
    prev_ch = reversed_ch[max(index - 1, 0)]
    skip_in_ch = reversed_ch[min(index + 1, n_blocks - 1)]
    temb_ch = c.block_out_channels[0] * 4
    num_layers = c.layers_per_block + 1
    self.resnets = nnx.List([
        ResnetBlock2D((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == num_layers - 1
                                                        else out_ch),
                      out_ch, temb_channels=temb_ch, groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        for j in range(num_layers)])
    block_level = n_blocks - 1 - index  # heads and layers are listed in down-block order
    has_attention = c.up_block_types[index] == "CrossAttnUpBlock2D"
    self.attentions = None if not has_attention else nnx.List([
        Transformer2DModel(out_ch, heads=c.heads[block_level],
                           context_dim=c.cross_attention_dim, groups=c.norm_num_groups,
                           use_linear_projection=c.use_linear_projection,
                           num_layers=c.transformer_layers[block_level],
                           name=f"up_blocks.{index}.attentions.{j}", backend=backend, **kw)
        for j in range(num_layers)])
    is_final = index == n_blocks - 1
    self.upsamplers = None if is_final else nnx.List([Upsample2D(out_ch, **kw)])

  def __call__(self, h, skips, temb, context, capture):
    captures = {}
    for j, resnet in enumerate(self.resnets):
      h = resnet(jnp.concatenate([h, skips[-1 - j]], axis=-1), temb)
      if self.attentions is not None:
        h, caps = self.attentions[j](h, context, capture=capture)
        captures.update(caps)
    if self.upsamplers is not None:
      h = self.upsamplers[0](h)
    return h, captures


class UNet2DConditionModel(nnx.Module):
  """Noise-prediction UNet. Build from a `UNetConfig`; load weights with `uip2p_jax.weights`.

  `backend` picks the attention implementation of uncaptured layers (see
  `attention.select_backend`): "auto" (per platform and shape), "blockwise", "xla", "cudnn" or
  "splash"; an explicit one that cannot take a layer's shape raises when the UNet is traced.
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, backend: str = "auto"):
    config.validate()
    if backend not in ATTENTION_BACKENDS:
      raise ValueError(f"attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    self.config = config
    self.dtype = dtype
    self.backend = backend
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    c = config
    ch0 = c.block_out_channels[0]
    self.conv_in = conv(c.in_channels, ch0, 3, **kw)
    self.time_embedding = TimestepEmbedding(ch0, ch0 * 4, **kw)
    self.down_blocks = nnx.List([DownBlock(c, i, backend=backend, **kw)
                                 for i in range(len(c.block_out_channels))])
    self.mid_block = MidBlock(c, backend=backend, **kw)
    self.up_blocks = nnx.List([UpBlock(c, i, backend=backend, **kw)
                               for i in range(len(c.block_out_channels))])
    self.conv_norm_out = GroupNorm(ch0, c.norm_num_groups, c.norm_eps, dtype=dtype,
                                   param_dtype=param_dtype)
    self.conv_out = conv(ch0, c.out_channels, 3, **kw)
    self.remat = "none"  # per-block activation recomputation (partitioning.REMAT_POLICIES)

  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               *, capture: AttentionCapture | None = None):
    """Predict the noise.

    sample: (B, H, W, in_channels) latents (for IP2P: noisy latent ++ image latent).
    timesteps: () or (B,) diffusion timesteps (int or float).
    encoder_hidden_states: (B, T, cross_attention_dim) text embeddings.
    capture: which cross-attention maps to return (see `AttentionCapture`).
    Returns the (B, H, W, out_channels) float32 prediction, and with `capture` also a dict
    {layer name: (B, h, w, T) float32 head-averaged probabilities}.
    """
    batch, height, width, channels = sample.shape
    factor = 2 ** (len(self.config.block_out_channels) - 1)
    if height % factor or width % factor:
      raise ValueError(f"UNet input {height}x{width} is not divisible by {factor} "
                       f"(2 ** number of downsamplings)")
    if channels != self.config.in_channels:
      raise ValueError(f"UNet expects {self.config.in_channels} input channels, got {channels}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    temb = timestep_embedding(timesteps, self.config.block_out_channels[0],
                              flip_sin_to_cos=self.config.flip_sin_to_cos,
                              freq_shift=self.config.freq_shift)
    temb = self.time_embedding(temb.astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)

    h = self.conv_in(sample.astype(self.dtype))
    skips = [h]
    captures: Captures = {}
    for block in self.down_blocks:
      h, block_skips, caps = remat_call(self.remat, lambda b, *a: b(*a, capture), block, h, temb,
                                        context)
      skips.extend(block_skips)
      captures.update(caps)
    h, caps = remat_call(self.remat, lambda b, *a: b(*a, capture), self.mid_block, h, temb,
                         context)
    captures.update(caps)
    for block in self.up_blocks:
      n = len(block.resnets)
      h, caps = remat_call(self.remat, lambda b, *a: b(*a, capture), block, h, skips[-n:], temb,
                           context)
      skips = skips[:-n]
      captures.update(caps)
    h = self.conv_out(jax.nn.silu(self.conv_norm_out(h))).astype(jnp.float32)
    return (h, captures) if capture is not None else h
