"""The ShapesWorld attribute probe: a small CNN that reads a rendered scene's background and, for
each grid cell, its object's colour, shape and size (class 0: empty cell). It scores edits in
`uip2p eval shapes` and is never part of a training loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.layers import GroupNorm, conv, linear


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  classes: tuple[int, ...]            # classes per label (data.shapes.LABEL_CLASSES)
  channels: tuple[int, ...] = (32, 64, 96, 128)  # one stride-2 stage each
  hidden: int = 256
  image_size: int = 64
  norm_num_groups: int = 8

  @classmethod
  def from_json(cls, config: dict[str, Any]) -> "ProbeConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields - {"_class_name"})
    if unknown or "classes" not in config:
      raise ValueError(f"probe config: unknown keys {unknown} or no 'classes'; expected "
                       f"{sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                  if k in fields})

  def to_json(self) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": "AttributeProbe", **out}


class _Stage(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, groups: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv = conv(in_ch, out_ch, 3, **kw)
    self.norm = GroupNorm(out_ch, groups, 1e-5, dtype=dtype, param_dtype=param_dtype)
    self.down = conv(out_ch, out_ch, 3, stride=2, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.norm(self.conv(x))))


class AttributeProbe(nnx.Module):
  """images (B, S, S, 3) in [-1, 1] -> logits (B, sum(classes)); `split` cuts them per label.
  The last feature map is flattened, not pooled: which cell holds what is positional."""

  def __init__(self, config: ProbeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    channels = (3,) + config.channels
    self.stages = nnx.List([_Stage(a, b, config.norm_num_groups, **kw)
                            for a, b in zip(channels[:-1], channels[1:])])
    side = config.image_size // 2 ** len(config.channels)
    self.hidden = linear(side * side * config.channels[-1], config.hidden, **kw)
    self.head = linear(config.hidden, sum(config.classes), **kw)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for stage in self.stages:
      x = stage(x)
    x = jax.nn.silu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(x).astype(jnp.float32)

  def split(self, logits: jax.Array) -> list[jax.Array]:
    bounds = [sum(self.config.classes[:i]) for i in range(1, len(self.config.classes))]
    return jnp.split(logits, bounds, axis=-1)

  def predict(self, images: jax.Array) -> jax.Array:
    """(B, len(classes)) int32 labels."""
    return jnp.stack([jnp.argmax(l, -1) for l in self.split(self(images))], -1).astype(jnp.int32)
