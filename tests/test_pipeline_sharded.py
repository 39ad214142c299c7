"""With several devices the edit batch is sharded over them and gives the single-device result."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from uip2p_jax.pipeline import EditPipeline
    pipe = EditPipeline.tiny_random(0)
    assert (pipe._mesh is not None) == (jax.device_count() > 1)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    out = pipe.edit(images, ["add snow", "add fog"], steps=2, seeds=[3, 4])
    np.save("{out}", out)
    print("devices", jax.device_count())
""")


def _run(tmp_path, devices):
  out = tmp_path / f"edit_{devices}.npy"
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + f" --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT.format(out=out)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"devices {devices}" in result.stdout
  return np.load(out)


def test_batch_sharded_over_two_devices_matches_one(tmp_path):
  np.testing.assert_allclose(_run(tmp_path, 2), _run(tmp_path, 1), atol=1e-4)
