"""LoRA (low-rank adaptation) for the UNet's linear and convolution layers.

`add_lora(unet, LoRAConfig(rank=4))` replaces each targeted `nnx.Linear` / `nnx.Conv` by a
`LoRALinear` / `LoRAConv`: the same layer (its `kernel` and `bias` keep their names, so
checkpoint keys and the weight mapping are unchanged) plus two factors held as `LoRAParam`,

    y = base(x) + (alpha / rank) * B(A(dropout(x)))

with A (in, rank) drawn as peft draws it (Kaiming-uniform, bound 1/sqrt(fan_in)) and B
(rank, out) zero, so a fresh LoRA UNet computes exactly what its base does. For a convolution
A is a convolution with the base's kernel size, strides and padding into `rank` channels and B
a 1x1 one, as peft's `Conv2d` LoRA. `LoRAParam` is an `nnx.Param` subclass: the trainer
differentiates and optimises `nnx.split(unet, LoRAParam, ...)`'s first state only.
`merge_lora` folds the factors into the kernels and returns a plain UNet (the diffusers export).

Dropout acts on the LoRA branch's input only while a key is set with `dropout_key(key)` (the
train step sets one); sampling, export and editing never do. Each layer draws its mask from
fold_in(key, a hash of its path): the same layer gets the same mask in every UNet call of one
step (the CEC cycle calls the UNet twice or more).

Files (diffusers' `load_lora_weights` format) are read and written by `uip2p_jax.weights`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

# Target groups (config.lora.targets) -> the layer paths (diffusers' module names) they select.
TARGETS = {
    # Self- and cross-attention projections: what diffusers' LoRA training scripts adapt.
    "attn": re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    # The transformer blocks' GEGLU feed-forward (its input projection and output linear).
    "ff": re.compile(r"(^|\.)ff\.net\.(0\.proj|2)$"),
    # The ResNet blocks' two 3x3 convolutions.
    "conv": re.compile(r"(^|\.)resnets\.\d+\.conv[12]$"),
}


class LoRAParam(nnx.Param):
  """A LoRA factor: the only parameters a LoRA run trains (and keeps optimizer state for)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank: the factors' inner size (> 0); alpha: the branch is scaled by alpha / rank (0 means
  alpha = rank, scale 1, as diffusers' training scripts set it); dropout: on the branch's input
  while training; targets: groups of `TARGETS`."""
  rank: int
  alpha: float = 0.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("attn",)

  def validate(self) -> None:
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"lora rank {self.rank!r}; expected an integer >= 1")
    if self.alpha < 0:
      raise ValueError(f"lora alpha {self.alpha}; expected >= 0 (0: alpha = rank)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora dropout {self.dropout}; expected 0 <= dropout < 1")
    if not self.targets:
      raise ValueError(f"lora targets are empty; expected some of {sorted(TARGETS)}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"lora targets {unknown} unknown; expected some of {sorted(TARGETS)}")

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank


# ---------------------------------------------------------------------------------------------
# Dropout key (set by the train step)

_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key):
  """LoRA dropout is live inside this block (the UNet must be traced or called inside it)."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


def _dropout(x: jax.Array, rate: float, layer_id: int) -> jax.Array:
  key = _DROPOUT_KEY.get()
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(jax.random.fold_in(key, layer_id), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# The layers

def _adopt(layer: nnx.Module, base: nnx.Module, a, b, *, scale: float, dropout: float,
           name: str) -> None:
  """Gives `layer` every attribute of `base` (the same Variables: names and values unchanged)
  and the factors."""
  for attribute, value in vars(base).items():
    if not attribute.startswith("_"):
      setattr(layer, attribute, value)
  layer.lora_a = LoRAParam(a)
  layer.lora_b = LoRAParam(b)
  layer.lora_rank = int(b.shape[-2])
  layer.lora_scale = float(scale)
  layer.lora_dropout = float(dropout)
  layer.lora_id = zlib.crc32(name.encode())  # this layer's dropout stream


class LoRALinear(nnx.Linear):
  """`nnx.Linear` + scale * (dropout(x) @ lora_a) @ lora_b; lora_a (in, r), lora_b (r, out)."""

  def __init__(self, base: nnx.Linear, a, b, *, scale: float, dropout: float = 0.0,
               name: str = ""):  # pylint: disable=super-init-not-called
    _adopt(self, base, a, b, scale=scale, dropout=dropout, name=name)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    dtype = self.dtype or inputs.dtype
    h = _dropout(inputs, self.lora_dropout, self.lora_id).astype(dtype)
    h = h @ self.lora_a[...].astype(dtype) @ self.lora_b[...].astype(dtype)
    return y + (h * jnp.asarray(self.lora_scale, dtype)).astype(y.dtype)

  def delta(self) -> jax.Array:
    """scale * A @ B in float32, the kernel's (in, out) layout."""
    return self.lora_scale * (self.lora_a[...].astype(jnp.float32)
                              @ self.lora_b[...].astype(jnp.float32))


class LoRAConv(nnx.Conv):
  """`nnx.Conv` + scale * conv1x1(conv(dropout(x), lora_a), lora_b); lora_a (kh, kw, in, r)
  with the base's strides and padding, lora_b (1, 1, r, out)."""

  def __init__(self, base: nnx.Conv, a, b, *, scale: float, dropout: float = 0.0,
               name: str = ""):  # pylint: disable=super-init-not-called
    one = lambda d: d is None or all(v == 1 for v in ((d,) if isinstance(d, int) else d))
    if (base.feature_group_count != 1 or base.mask is not None
        or not one(base.input_dilation) or not one(base.kernel_dilation)):
      raise ValueError(f"LoRA on {name or 'a convolution'}: grouped, masked or dilated "
                       "convolutions are not supported")
    _adopt(self, base, a, b, scale=scale, dropout=dropout, name=name)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    dtype = self.dtype or inputs.dtype
    strides = self.strides if self.strides is not None else 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    h = _dropout(inputs, self.lora_dropout, self.lora_id).astype(dtype)
    h = jax.lax.conv_general_dilated(h, self.lora_a[...].astype(dtype), strides,
                                     canonicalize_padding(self.padding, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = h @ self.lora_b[...][0, 0].astype(dtype)
    return y + (h * jnp.asarray(self.lora_scale, dtype)).astype(y.dtype)

  def delta(self) -> jax.Array:
    """scale * A . B in float32, the kernel's (kh, kw, in, out) layout."""
    return self.lora_scale * jnp.einsum("hwir,ro->hwio", self.lora_a[...].astype(jnp.float32),
                                        self.lora_b[...][0, 0].astype(jnp.float32))


LORA_LAYERS = (LoRALinear, LoRAConv)


# ---------------------------------------------------------------------------------------------
# Adding, finding and merging LoRA layers

def _name(path) -> str:
  return ".".join(str(p) for p in path)


def lora_layers(module: nnx.Module) -> dict[str, LoRALinear | LoRAConv]:
  """{dotted path (diffusers' module name): layer} of every LoRA layer in `module`."""
  return {_name(path): layer for path, layer in nnx.iter_modules(module)
          if isinstance(layer, LORA_LAYERS)}


def has_lora(module: nnx.Module) -> bool:
  return bool(lora_layers(module))


def adaptable_layers(module: nnx.Module) -> dict[str, nnx.Linear | nnx.Conv]:
  """{dotted path: layer} of every plain linear and convolution layer LoRA can adapt."""
  return {_name(path): layer for path, layer in nnx.iter_modules(module)
          if isinstance(layer, (nnx.Linear, nnx.Conv)) and not isinstance(layer, LORA_LAYERS)}


def targeted_layers(module: nnx.Module, targets) -> list[str]:
  """The paths of the layers the target groups select, in module order."""
  return [name for name, _ in adaptable_layers(module).items()
          if any(TARGETS[t].search(name) for t in targets)]


def factor_shapes(layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(A, B) shapes of a rank-1 factor pair of `layer`, rank at axis -1 of A / -2 of B."""
  kernel = layer.kernel.get_value().shape
  if len(kernel) == 2:
    return (kernel[0], 1), (1, kernel[1])
  return (*kernel[:-1], 1), (1, 1, 1, kernel[-1])


def _set_child(module: nnx.Module, path: str, child: nnx.Module) -> None:
  *parents, last = path.split(".")
  node = module
  for part in parents:
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  if last.isdigit():
    node[int(last)] = child
  else:
    setattr(node, last, child)


def wrap_layers(module: nnx.Module, factors: dict[str, tuple], *, scales: dict[str, float],
                dropout: float = 0.0) -> nnx.Module:
  """Replaces the layers named in `factors` ({path: (A, B)} arrays or ShapeDtypeStructs, in
  the kernel's layout) by LoRA layers with those factors and `scales[path]`; in place."""
  plain = adaptable_layers(module)
  for name, (a, b) in factors.items():
    if name not in plain:
      raise ValueError(f"{name}: not a linear or convolution layer of the module (or already "
                       "a LoRA layer)")
    base = plain[name]
    cls = LoRALinear if isinstance(base, nnx.Linear) else LoRAConv
    _set_child(module, name, cls(base, a, b, scale=scales[name], dropout=dropout, name=name))
  return module


def add_lora(unet: nnx.Module, config: LoRAConfig, seed: int = 0) -> nnx.Module:
  """`unet` (in place, and returned) with LoRA layers on `config.targets`: A drawn on the host
  from numpy's generator `seed`, B zero. An abstract UNet (`nnx.eval_shape`) gets abstract
  factors (for planning)."""
  config.validate()
  if has_lora(unet):
    raise ValueError("the module already has LoRA layers")
  names = targeted_layers(unet, config.targets)
  if not names:
    raise ValueError(f"lora targets {list(config.targets)} select no layer of the module")
  layers = adaptable_layers(unet)
  rng = np.random.default_rng(seed)
  factors = {}
  for name in names:
    kernel = layers[name].kernel.get_value()
    (*a_dims, _), (*b_lead, _, out) = factor_shapes(layers[name])
    a_shape, b_shape = (*a_dims, config.rank), (*b_lead, config.rank, out)
    dtype = kernel.dtype
    if isinstance(kernel, jax.ShapeDtypeStruct):
      factors[name] = (jax.ShapeDtypeStruct(a_shape, dtype), jax.ShapeDtypeStruct(b_shape, dtype))
      continue
    bound = 1.0 / np.sqrt(np.prod(a_dims))  # peft: kaiming_uniform_(a=sqrt(5)) = 1/sqrt(fan_in)
    a = rng.uniform(-bound, bound, a_shape).astype(np.float32)
    factors[name] = (jnp.asarray(a, dtype), jnp.zeros(b_shape, dtype))
  return wrap_layers(unet, factors, scales={n: config.scale for n in names},
                     dropout=config.dropout)


def merge_lora(unet):
  """A plain `UNet2DConditionModel` whose kernels are the base's + scale * A B: the same
  function as the LoRA UNet without its dropout (what the diffusers export holds)."""
  from uip2p_jax.models.unet import UNet2DConditionModel
  layers = lora_layers(unet)
  _, _, base = nnx.split(unet, LoRAParam, ...)
  pure = nnx.to_pure_dict(base)
  for name, layer in layers.items():
    node = pure
    for part in name.split("."):
      node = node[int(part) if part.isdigit() else part]
    kernel = node["kernel"]
    node["kernel"] = (jnp.asarray(kernel, jnp.float32) + layer.delta()).astype(kernel.dtype)
  param_dtype = unet.conv_in.param_dtype  # the attribute itself: graphdefs (jit caches) match
  graph, abstract = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(
      unet.config, rngs=nnx.Rngs(0), dtype=unet.dtype, param_dtype=param_dtype,
      backend=unet.backend)))
  abstract.replace_by_pure_dict(pure)
  merged = nnx.merge(graph, abstract)
  merged.remat = unet.remat
  return merged
