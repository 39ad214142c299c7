"""AutoencoderKL parity with diffusers: posterior mean/logvar, sampling and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from conftest import max_rel_error, nchw, nhwc
from uip2p_jax import weights

TOL = 1e-4


def test_vae_encode_decode_match_diffusers(torch_vae):
  torch_model, folder = torch_vae
  vae = weights.load_vae(folder, subfolder=None)
  assert vae.downsample_factor == 2
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  latents = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_model.encode(torch.from_numpy(nchw(images))).latent_dist
    decoded = torch_model.decode(torch.from_numpy(nchw(latents))).sample.numpy()

  encode = nnx.jit(lambda m, x: m.encode(x))
  decode = nnx.jit(lambda m, z: m.decode(z))
  ours = encode(vae, images)
  assert max_rel_error(ours.mean, nhwc(posterior.mean.numpy())) <= TOL
  assert max_rel_error(ours.logvar, nhwc(posterior.logvar.numpy())) <= TOL
  assert max_rel_error(ours.mode(), nhwc(posterior.mode().numpy())) <= TOL
  assert max_rel_error(decode(vae, latents), nhwc(decoded)) <= TOL

  # sample = mean + std * eps, with eps from the key: reproducible and correctly scaled.
  key = jax.random.key(0)
  eps = jax.random.normal(key, ours.mean.shape)
  np.testing.assert_allclose(ours.sample(key), ours.mean + jnp.exp(0.5 * ours.logvar) * eps,
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(ours.sample(key), ours.sample(jax.random.key(1)))
