"""Fast random initialisation for demos, tests and the embedded tiny model.

Constructing an NNX module eagerly runs one small XLA program per parameter initialiser (and
under `jit`, one large one): ~20 s for even the tiny preset on a 2-core CPU, all of it compile
time. Real weights come from checkpoints, so random ones only need the right scale: here the
module is built abstractly and every parameter is drawn on the host with numpy.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def random_init(factory: Callable[[], M], seed: int = 0) -> M:
  """`factory()`'s module with LeCun-normal kernels, N(0, 0.02) embeddings, zero biases and
  unit norm scales, drawn from numpy's generator `seed`."""
  graphdef, abstract = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  values = {}
  for path, variable in nnx.to_flat_state(abstract):
    spec = variable.get_value()
    name = str(path[-1])
    if name == "bias":
      value = np.zeros(spec.shape, np.float32)
    elif name == "scale":
      value = np.ones(spec.shape, np.float32)
    elif name == "kernel":
      fan_in = int(np.prod(spec.shape[:-1]))
      value = rng.standard_normal(spec.shape, np.float32) / np.sqrt(fan_in)
    elif name == "logit_scale":
      value = np.full(spec.shape, np.log(1 / 0.07), np.float32)
    else:  # embeddings, CLIP's class embedding
      value = rng.standard_normal(spec.shape, np.float32) * 0.02
    values[path] = jnp.asarray(value, spec.dtype)
  abstract.replace_by_pure_dict(nest(values))
  return nnx.merge(graphdef, abstract)


def nest(flat: dict[tuple, object]) -> dict:
  """{("a", 0, "kernel"): x} -> {"a": {0: {"kernel": x}}}, the form `replace_by_pure_dict` takes."""
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested
