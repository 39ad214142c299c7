"""The device mesh, FSDP parameter sharding rules and batch sharding.

One mesh with axes (``data``, ``fsdp``) over all devices of all processes. The batch is split over
both axes; parameters and optimizer state are split over ``fsdp`` only (replicated over ``data``),
each array along its largest dimension divisible by the ``fsdp`` size. Small arrays (norms,
biases) stay replicated: splitting them saves nothing and costs a gather each.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2 ** 16  # elements: below this an array is replicated


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when a launcher asks for it: UIP2P_DISTRIBUTED=1
  (launch/tpu_pod.sh, launch/slurm_gpu.sbatch) or an explicit JAX_COORDINATOR_ADDRESS.

  JAX then finds the coordinator and process ids itself (Cloud TPU metadata, the SLURM
  environment: one process per GPU, each driving GPU SLURM_LOCALID). Nothing else starts it: an
  interactive `salloc` with several tasks must not leave a lone process waiting for peers.
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get("UIP2P_DISTRIBUTED") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    # Explicit set-ups (no cluster to detect: a workstation, a test) also name the process.
    explicit = {name: int(os.environ[var]) for name, var in
                (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
                if var in os.environ}
    jax.distributed.initialize(**explicit)
    if jax.default_backend() == "cpu":  # gloo's limit; NCCL and TPU collectives wait as long
      use_distributed_barriers()


def use_distributed_barriers() -> None:
  """Orbax's barriers through the coordination service (orbax's 5-minute timeout) instead of a
  collective, for CPU processes: a new gloo communicator waits only 30 s for its peers, and
  processes that compile at different speeds reach orbax's first barrier further apart than
  that (seen on a 2-core machine: "Gloo context initialization failed: DEADLINE_EXCEEDED").
  The switch is an absl flag of orbax's; reading it needs absl's flags marked parsed, and our
  CLI parses none of them."""
  from absl import flags
  from orbax.checkpoint._src.multihost import multihost
  holder = getattr(multihost, "EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER", None)
  if holder is None:
    raise RuntimeError("orbax.checkpoint no longer has EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER "
                       "(uip2p_jax/sharding.py relies on it for multi-process CPU runs): check "
                       "the installed orbax-checkpoint against requirements.txt")
  flags.FLAGS.mark_as_parsed()
  flags.FLAGS[holder.name].value = True


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh; -1 for one axis means "all remaining devices"."""
  devices = jax.devices() if devices is None else devices
  count = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("at most one mesh axis can be -1")
  if data == -1:
    data = count // fsdp if fsdp and count % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = count // data if data and count % data == 0 else 0
  if data * fsdp != count or data < 1 or fsdp < 1:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {count} available "
                     f"devices exactly")
  # Auto axes: XLA propagates shardings through the models (no per-op annotations needed).
  auto = (AxisType.Auto, AxisType.Auto)
  if len(devices) == jax.device_count():
    return jax.make_mesh((data, fsdp), BATCH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES, axis_types=auto)


def parameter_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
  """FSDP rule: the largest dimension divisible by ``fsdp_size``, for arrays worth splitting."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return PartitionSpec(*spec)
  return PartitionSpec()


def _is_lookup_table(path) -> bool:
  """An `nnx.Embed` table (read by a gather, not a matmul)."""
  return any(getattr(key, "key", None) == "embedding" for key in path)


def parameter_shardings(tree, mesh: Mesh):
  """A NamedSharding per array leaf of ``tree`` (arrays or ShapeDtypeStructs).

  Lookup tables stay whole on every device: gathering a batch-split set of token ids from a
  row-split table made XLA gather the full batch on every device (the text encoders then ran
  unsplit everywhere). They are small (CLIP's is 49408 x 768).
  """
  fsdp_size = mesh.shape["fsdp"]

  def sharding(path, x):
    spec = (PartitionSpec() if _is_lookup_table(path)
            else parameter_spec(tuple(x.shape), fsdp_size))
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(host_batch: dict[str, np.ndarray], sharding: NamedSharding,
                 fields=None) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays split over the batch axes (multi-host
  safe). `fields`: the names to keep (default: every numeric field; record ids stay host-side)."""
  if fields is None:
    fields = [k for k, v in host_batch.items() if np.asarray(v).dtype.kind in "biuf"]
  missing = [k for k in fields if k not in host_batch]
  if missing:
    raise KeyError(f"the batch lacks {missing} (it has {sorted(host_batch)})")
  return {k: jax.make_array_from_process_local_data(sharding, host_batch[k]) for k in fields}


def place(tree, shardings):
  """Host arrays (identical on every process) -> global arrays with ``shardings``."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


__all__ = ["BATCH_AXES", "batch_sharding", "global_batch", "make_mesh",
           "maybe_initialize_distributed", "parameter_shardings", "parameter_spec", "place",
           "replicated"]
