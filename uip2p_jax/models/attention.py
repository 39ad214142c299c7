"""Attention for the UNet: `Attention`, the GEGLU feed-forward, `BasicTransformerBlock`,
`Transformer2DModel`, and cross-attention capture.

Cross-attention capture returns, from the same forward pass, the head-averaged softmax
probabilities of the selected `attn2` layers as `(batch, h, w, tokens)` float32 arrays. Only the
selected layers compute probabilities explicitly; every other attention call (UNet, VAE, CLIP,
ViT) goes through `multi_head_attention`, whose implementation `select_backend` picks per platform
and shape (cuDNN flash attention, the Pallas TPU splash kernel, XLA, or our blockwise attention),
so unselected resolutions never materialise a probability tensor.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from uip2p_jax.models.layers import GroupNorm, LayerNorm, conv, linear
from uip2p_jax.models.partitioning import batch_mesh_axes, batch_split


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


ATTENTION_BACKENDS = ("auto", "blockwise", "xla", "cudnn", "splash")
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# cuDNN flash attention's limits, as JAX checks them before calling cuDNN (jax 0.10.2,
# jax/_src/cudnn/fused_attention_stablehlo.py): `check_is_flash_attention` (:354) wants a head
# width that is a multiple of 8 and at most 256 from compute capability 9.0 (Hopper) on, 128
# before (:382-389); its only sequence-length condition, even Q and KV lengths (:392), applies to
# training with a bias, which we never pass; `check_layout` (:289) takes fp16/bf16 (or fp8) only.
# jax.nn.dot_product_attention (jax/_src/nn/functions.py:1210) calls it for implementation="cudnn";
# implementation=None is plain XLA (:1250-1251).
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_MAX_HEAD_DIM = 128         # compute capability below 9.0 (A100 8.0, L4 8.9)
CUDNN_MAX_HEAD_DIM_HOPPER = 256  # 9.0 and later (H100)
# Not checked by JAX: cuDNN's fused flash attention needs Ampere (8.0) or newer (NVIDIA
# TransformerEngine's fused_attn.cpp selects cuDNN's F16 arbitrary-seqlen backend only for
# sm_arch >= 80). JAX admits 256-wide heads on Blackwell (10.x) too; TransformerEngine limits
# them to 128 there for cuDNN 9.7: unmeasured here, we follow JAX.
CUDNN_MIN_CAPABILITY = (8, 0)
# Pallas TPU kernels tile in 128-wide lanes (jax/experimental/pallas/ops/tpu/splash_attention/
# splash_attention_kernel.py:39 NUM_LANES): block_kv_compute must be a multiple of it (:969), with
# segment ids block_kv and block_q too (:667, :673), and blocks must divide the sequence lengths
# (splash_attention_mask_info.py:569-571). So Q and KV are padded to multiples of 128 and the
# padded keys masked with segment ids. Head widths are zero-padded to a multiple of 128 too
# (flash_attention.py:462 refuses a width above 128 that is not one; maxdiffusion pads widths
# below 128 for splash): zero columns change neither q.k nor the kept output columns.
TPU_LANES = 128
# `auto` sends a shape to the TPU kernel only when it fills at least one 128-query block and
# padding to 128-multiples at most doubles the logits (77 text keys -> 128: 1.66x; CLIP ViT-L/14's
# 257 tokens -> 384 x 384: 2.2x, left to XLA). Smaller shapes gain nothing from a kernel.
TPU_KERNEL_MIN_QUERIES = 128
TPU_KERNEL_MAX_PADDING = 2.0


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _capability(device: str | None) -> tuple[int, int] | None:
  try:
    major, minor = str(device).split(".")
    return int(major), int(minor)
  except ValueError:
    return None


def _cudnn_refusal(device: str | None, dtype, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot take this shape on `device` (a compute capability), or
  None when it can."""
  capability = _capability(device)
  if capability is None:
    return f"device {device!r} has no CUDA compute capability"
  if capability < CUDNN_MIN_CAPABILITY:
    return (f"compute capability {device} is below 8.0 (cuDNN's fused flash attention needs "
            "Ampere or newer)")
  if jnp.dtype(dtype) not in HALF_DTYPES:
    return f"dtype {jnp.dtype(dtype).name} is not float16 or bfloat16 (cuDNN flash attention)"
  hopper = capability >= (9, 0)
  limit = CUDNN_MAX_HEAD_DIM_HOPPER if hopper else CUDNN_MAX_HEAD_DIM
  if head_dim % CUDNN_HEAD_DIM_MULTIPLE or head_dim > limit:
    return (f"head_dim {head_dim} is not a multiple of {CUDNN_HEAD_DIM_MULTIPLE} at most {limit} "
            f"(cuDNN flash attention on compute capability {device}; "
            f"{'Hopper and later' if hopper else 'before Hopper (9.0)'})")
  return None


def _splash_refusal(dtype) -> str | None:
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return f"dtype {jnp.dtype(dtype).name} is not float32 or bfloat16 (Pallas TPU splash attention)"
  return None


def tpu_padding_factor(q_len: int, kv_len: int) -> float:
  """How many times more logits the TPU kernel computes once Q and KV are padded to 128s."""
  return _round_up(q_len, TPU_LANES) * _round_up(kv_len, TPU_LANES) / (q_len * kv_len)


def select_backend(platform: str, device: str | None, dtype, q_len: int, kv_len: int,
                   head_dim: int, num_heads: int, *, is_causal: bool = False,
                   requested: str = "auto") -> str:
  """The attention implementation for one shape on one platform; the only place this is decided.

  platform: "cpu", "gpu" or "tpu" (`jax.Device.platform`); device: the compute capability
  ("8.0" A100, "8.9" L4, "9.0" H100) on an NVIDIA GPU, else the device kind (unused).
  dtype: the query dtype; q_len / kv_len: query and key tokens; head_dim, num_heads per layer.
  `auto` picks:
  - gpu: "cudnn" (flash attention) where cuDNN takes the dtype and head width (see
    `CUDNN_MAX_HEAD_DIM`), else "xla";
  - tpu: "splash" (Pallas) for at least 128 queries when padding at most doubles the work, else
    "xla";
  - cpu and others: "blockwise" (ours: fastest on XLA:CPU, bounded memory), "xla" when causal.
  An explicit `requested` backend is returned as it is, or raises ValueError naming the shape,
  dtype and the limit it breaks.
  """
  if requested not in ATTENTION_BACKENDS:
    raise ValueError(f"attention backend {requested!r}; expected one of {ATTENTION_BACKENDS}")
  if requested == "auto":
    if platform == "gpu":
      return "cudnn" if _cudnn_refusal(device, dtype, head_dim) is None else "xla"
    if platform == "tpu":
      worth_it = (q_len >= TPU_KERNEL_MIN_QUERIES
                  and tpu_padding_factor(q_len, kv_len) <= TPU_KERNEL_MAX_PADDING)
      return "splash" if worth_it and _splash_refusal(dtype) is None else "xla"
    return "xla" if is_causal else "blockwise"
  refusal = None
  if requested == "cudnn":
    refusal = ("cuDNN runs on NVIDIA GPUs only" if platform != "gpu"
               else _cudnn_refusal(device, dtype, head_dim))
  elif requested == "splash":
    refusal = ("the Pallas splash kernel runs on TPUs only" if platform != "tpu"
               else _splash_refusal(dtype))
  elif requested == "blockwise" and is_causal:
    refusal = "blockwise attention has no causal mask"
  if refusal:
    raise ValueError(
        f"attention backend {requested!r} cannot take {num_heads} heads x {head_dim} wide, "
        f"{q_len} queries x {kv_len} keys{' (causal)' if is_causal else ''}, "
        f"{jnp.dtype(dtype).name}, on {platform} ({device}): {refusal}. Use backend='auto' or "
        "'xla'.")
  return requested


def local_device() -> tuple[str, str | None]:
  """(platform, compute capability or device kind) of this process's first default device."""
  device = jax.local_devices()[0]
  return device.platform, getattr(device, "compute_capability", None) or device.device_kind


def _splash_blocks(length: int, head_dim: int) -> int:
  # Wide heads (the VAE's 512) get smaller tiles to stay within VMEM; untuned on hardware.
  cap = 512 if head_dim <= TPU_LANES else 256
  return max(b for b in (512, 256, 128) if b <= cap and length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, head_dim: int, is_causal: bool,
                   interpret: bool):
  """The splash kernel for (heads, q_len, head_dim) x (heads, kv_len, head_dim), lengths padded
  to 128s; built once per shape and kept (its block masks are computed on the host)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as sk,
                                                                 splash_attention_mask as sm)
  block_q, block_kv = _splash_blocks(q_len, head_dim), _splash_blocks(kv_len, head_dim)
  blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                         block_q_dkv=block_q, block_kv_dkv=block_kv,
                         block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=True)
  one = sm.CausalMask((q_len, kv_len)) if is_causal else sm.FullMask((q_len, kv_len))
  with jax.ensure_compile_time_eval():  # its mask arrays are constants, not this trace's values
    return sk.make_splash_mha_single_device(sm.MultiHeadMask([one] * heads), block_sizes=blocks,
                                            interpret=interpret)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float,
                     is_causal: bool = False, interpret: bool = False) -> jax.Array:
  """(B, Q, heads, D) x (B, K, heads, D) -> (B, Q, heads, D) through Pallas' TPU splash kernel.

  Q and K are zero-padded to multiples of 128 and D to a multiple of 128; padded keys are masked
  out with segment ids (77 text keys become 128, 51 of them masked), padded queries and columns
  are sliced off. The kernel takes one example, so it is vmapped over the batch, and under a mesh
  it runs per device on the local batch (shard_map over the batch axes: a Pallas call cannot be
  partitioned by XLA). `interpret` runs it on any platform (tests on CPU).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
  batch, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  q_pad, kv_pad = _round_up(q_len, TPU_LANES), _round_up(kv_len, TPU_LANES)
  dim_pad = _round_up(head_dim, TPU_LANES)

  def to_kernel(t, length):  # (B, T, H, D) -> (B, H, length, dim_pad), zeros appended
    t = jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, dim_pad - head_dim)))
    return t.transpose(0, 2, 1, 3)

  # The kernel has no softmax scale: fold it into the queries.
  q = to_kernel(query * jnp.asarray(scale, query.dtype), q_pad)
  k, v = to_kernel(key, kv_pad), to_kernel(value, kv_pad)
  kernel = _splash_kernel(heads, q_pad, kv_pad, dim_pad, is_causal, interpret)

  def attend(q, k, v):  # (b, H, q_pad, dim_pad) per device
    segment_ids = None
    if kv_pad != kv_len:  # padded keys get segment 0, which no query has
      segment_ids = SegmentIds(q=jnp.ones((q_pad,), jnp.int32),
                               kv=(jnp.arange(kv_pad) < kv_len).astype(jnp.int32))
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids))(q, k, v)

  axes, split = batch_mesh_axes(), batch_split()
  if split > 1 and batch % split == 0:
    spec = jax.sharding.PartitionSpec(axes)
    attend = jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  out = attend(q, k, v)
  return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)


def multi_head_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float,
                         is_causal: bool = False, backend: str = "auto") -> jax.Array:
  """(B, T, heads, D) attention without materialising full probabilities where possible.

  backend: "auto" (`select_backend` for this shape on this process's device), "blockwise"
  (ours above, any platform, not causal), "xla" / "cudnn" (`jax.nn.dot_product_attention`
  implementations; cudnn is flash attention on NVIDIA GPUs, half precision only) or "splash"
  (Pallas TPU kernel). A backend that cannot take the shape raises ValueError.
  """
  _, q_len, heads, head_dim = query.shape
  backend = select_backend(*local_device(), query.dtype, q_len, key.shape[1], head_dim, heads,
                           is_causal=is_causal, requested=backend)
  if backend == "blockwise":
    return blockwise_attention(query, key, value, scale=scale)
  if backend == "splash":
    return splash_attention(query, key, value, scale=scale, is_causal=is_causal)
  return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                      implementation=backend)


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
