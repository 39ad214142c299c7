"""`uip2p plan`'s memory from XLA's buffer-assignment dump equals `memory_analysis`."""

import jax
import jax.numpy as jnp
import pytest

from uip2p_jax.plan import buffer_assignment_memory, parse_buffer_assignment


def _update(params, batch):
  """A donated parameter update with a scalar and a fresh array out, and temporaries."""
  hidden = jnp.tanh(batch @ params["w"])
  loss = (hidden @ params["v"]).mean()
  new = {"w": params["w"] - 1e-3 * batch.T @ hidden, "v": params["v"] * 0.5}
  return new, loss, hidden.sum(0)


def test_buffer_assignment_dump_matches_memory_analysis(tmp_path):
  params = {"w": jax.ShapeDtypeStruct((96, 128), jnp.float32),
            "v": jax.ShapeDtypeStruct((128, 8), jnp.float32)}
  batch = jax.ShapeDtypeStruct((32, 96), jnp.float32)
  lowered = jax.jit(_update, donate_argnums=0).lower(params, batch)
  memory = buffer_assignment_memory(lowered, "jit__update", str(tmp_path))
  reference = lowered.compile().memory_analysis()
  assert memory.argument_bytes == reference.argument_size_in_bytes == (96 * 128 + 128 * 8
                                                                       + 32 * 96) * 4
  assert memory.temp_bytes == reference.temp_size_in_bytes > 0
  assert memory.total_bytes == (reference.argument_size_in_bytes
                                + reference.output_size_in_bytes
                                - reference.alias_size_in_bytes
                                + reference.temp_size_in_bytes)


def test_parse_refuses_other_text():
  with pytest.raises(ValueError, match="buffer-assignment"):
    parse_buffer_assignment("HloModule jit_f\nENTRY main {}\n")
