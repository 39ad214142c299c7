"""Where activations live under a mesh, and which are kept for the backward pass.

`shard_batch` pins a block's inputs and outputs to the mesh's batch axes when traced under a
mesh (a no-op without one); `remat_call` / `set_remat` choose per block what the backward pass
recomputes. The UNet, the VAE decoder and the CLIP towers call these per block.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots")


def batch_mesh_axes() -> tuple[str, ...]:
  """The axes of the mesh being traced under (`jax.set_mesh`, `use_abstract_mesh`) that split
  the batch: ("data", "fsdp") in training, ("data",) in multi-device editing, () without one."""
  from uip2p_jax.sharding import BATCH_AXES  # the models depend on sharding for this name only
  mesh = jax.sharding.get_abstract_mesh()
  return () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_split() -> int:
  """How many ways the batch is split over devices while tracing (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[axis] for axis in batch_mesh_axes())


def shard_batch(tree):
  """Pins the leading (batch) dimension of every array in ``tree`` to the mesh's batch axes.

  Only when traced under a mesh (the train step sets one); a no-op otherwise. Without these
  pins XLA may follow the FSDP-split weights and split activations along features instead,
  which leaves the batch whole: every device then runs every example (seen for the CLIP image
  tower: 3 x the global batch per device).
  """
  axes, devices = batch_mesh_axes(), batch_split()
  if devices == 1:
    return tree
  spec = jax.sharding.PartitionSpec(axes)

  def pin(x):
    if not isinstance(x, jax.Array) or x.ndim == 0 or x.shape[0] % devices:
      return x
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(pin, tree)


def remat_call(policy: str, fn, module: nnx.Module, *args):
  """``fn(module, *args)``, its activations recomputed in the backward pass per ``policy``.

  "none": keep every activation; "full": keep only the block's inputs; "dots": keep matmul
  outputs without batch dimensions (recompute the cheap element-wise work). Applied per block:
  one checkpoint around a whole network adds a third to the FLOPs and lowers no peak memory.
  The block's inputs and outputs are split over the batch axes (`shard_batch`).
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r}; expected one of {REMAT_POLICIES}")
  args = shard_batch(args)
  if policy == "none":
    return shard_batch(fn(module, *args))
  saveable = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return shard_batch(nnx.remat(fn, policy=saveable)(module, *args))


def set_remat(module: nnx.Module, policy: str) -> nnx.Module:
  """Sets the remat policy of every block-structured part of ``module`` (UNet, VAE decoder,
  CLIP towers); returns ``module``."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r}; expected one of {REMAT_POLICIES}")
  found = False
  for _, sub in nnx.iter_modules(module):
    if hasattr(sub, "remat"):
      sub.remat = policy
      found = True
  if not found:
    raise ValueError(f"{type(module).__name__} has no blocks that take a remat policy")
  return module
