"""The blockwise (memory-efficient) attention equals plain softmax attention, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uip2p_jax.models import attention
from uip2p_jax.models.attention import blockwise_attention, multi_head_attention


def _reference(q, k, v, scale):
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# All at once; one (batch, head) pair at a time; pairs and 4 query blocks each; with the batch
# split over 2 devices: 4 query blocks of every example and head at once.
@pytest.mark.parametrize("block_bytes,split", [(1 << 30, 1), (128 * 48 * 4, 1), (32 * 48 * 4, 1),
                                               (1024, 2)])
def test_blockwise_matches_softmax_attention(block_bytes, split, monkeypatch):
  monkeypatch.setattr(attention, "batch_split", lambda: split)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 128, 4, 8))
  k = jax.random.normal(keys[1], (2, 48, 4, 8))
  v = jax.random.normal(keys[2], (2, 48, 4, 8))
  scale = 8 ** -0.5
  ours = blockwise_attention(q, k, v, scale=scale, block_bytes=block_bytes)
  np.testing.assert_allclose(ours, _reference(q, k, v, scale), atol=1e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  grads = jax.grad(loss(lambda q, k, v: blockwise_attention(q, k, v, scale=scale,
                                                            block_bytes=block_bytes)),
                   argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss(lambda q, k, v: _reference(q, k, v, scale)), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, atol=1e-5)


def test_unknown_backend_is_refused():
  x = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match="attention backend 'flash'"):
    multi_head_attention(x, x, x, scale=1.0, backend="flash")
