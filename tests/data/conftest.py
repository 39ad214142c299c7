"""Data fixtures: the bundled sample photos built once per session."""

import pytest

from uip2p_jax.data import builders


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
  """The bundled sample photos built as a captions dataset (shared by loader tests)."""
  out = str(tmp_path_factory.mktemp("sample_data"))
  report = builders.build_sample(out)
  assert report.written == 12 and not report.skipped
  return out
