"""The cycle step's pieces: K-step denoising (fixed and drawn), configs, skipped loss terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uip2p_jax.cycle import CycleConfig, LossConfig, edit_with_k_steps
from uip2p_jax.schedules import NoiseSchedule


class ConstantNoiseUNet:
  """A stand-in UNet predicting eps = c * (noisy latent) and recording its calls."""

  def __init__(self, c=0.3):
    self.c, self.calls = c, []

  def __call__(self, unet_input, timesteps, context, capture=None):
    self.calls.append(timesteps)
    eps = self.c * unet_input[..., :4]
    return (eps, {"layer": jnp.ones((eps.shape[0], 2, 2, 3))}) if capture is not None else eps


ALPHAS = jnp.asarray(NoiseSchedule().alphas_cumprod(), jnp.float32)


def reference_ddim(latents, c, t, k):
  """DDIM (eta 0) from t to 0 in k steps, by hand, for eps = c * z."""
  a = np.asarray(ALPHAS)
  z = np.asarray(latents, np.float64)
  for step in range(k):
    tt = np.floor(t * (k - step) / k).astype(int)
    t_next = np.floor(t * (k - step - 1) / k).astype(int)
    alpha = a[tt][:, None, None, None]
    eps = c * z
    x0 = (z - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha)
    if step < k - 1:
      alpha_next = a[t_next][:, None, None, None]
      z = np.sqrt(alpha_next) * x0 + np.sqrt(1 - alpha_next) * eps
  return x0


@pytest.mark.parametrize("k", [1, 3])
def test_fixed_k_steps_match_hand_computed_ddim(k):
  rng = np.random.default_rng(0)
  latents = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
  t = jnp.asarray([999, 300])
  unet = ConstantNoiseUNet()
  config = CycleConfig(num_steps_min=k, num_steps_max=k)
  x0, captures = edit_with_k_steps(unet, ALPHAS, latents, jnp.zeros_like(latents), None, t,
                                   jax.random.PRNGKey(0), config, capture=object())
  np.testing.assert_allclose(x0, reference_ddim(latents, 0.3, np.asarray(t), k), rtol=2e-4,
                             atol=1e-4)
  assert len(unet.calls) == k and set(captures) == {"layer"}
  np.testing.assert_array_equal(unet.calls[0], t)            # maps come from the first call


def test_drawn_k_uses_one_compiled_switch_and_matches_fixed_k():
  rng = np.random.default_rng(1)
  latents = jnp.asarray(rng.normal(size=(2, 4, 4, 4)), jnp.float32)
  t = jnp.asarray([500, 800])
  config = CycleConfig(num_steps_min=1, num_steps_max=3)
  run = jax.jit(lambda key: edit_with_k_steps(ConstantNoiseUNet(), ALPHAS, latents,
                                              jnp.zeros_like(latents), None, t, key, config,
                                              capture=None)[0])
  seen = set()
  for seed in range(12):
    key = jax.random.PRNGKey(seed)
    k = int(jax.random.randint(key, (), 0, 3)) + 1
    seen.add(k)
    np.testing.assert_allclose(run(key), reference_ddim(latents, 0.3, np.asarray(t), k),
                               rtol=2e-4, atol=1e-4)
  assert seen == {1, 2, 3}
  assert run._cache_size() == 1


def test_configs_refuse_bad_values_by_name():
  with pytest.raises(ValueError, match="cycle.start 'middle'"):
    CycleConfig(start="middle")
  with pytest.raises(ValueError, match="cycle.num_steps_min=3, num_steps_max=1"):
    CycleConfig(num_steps_min=3, num_steps_max=1)
  with pytest.raises(ValueError, match="cycle.timestep_min=5, timestep_max=5"):
    CycleConfig(timestep_min=5, timestep_max=5)
  with pytest.raises(ValueError, match="cycle.timestep_min=-1"):
    CycleConfig(timestep_min=-1)
  with pytest.raises(ValueError, match="cycle.attention_select 'size'"):
    CycleConfig(attention_select="size")
  with pytest.raises(ValueError, match="cycle.conditioning_dropout=0.5"):
    CycleConfig(conditioning_dropout=0.5)
  with pytest.raises(TypeError, match="cycle.share_noise=1 \\(int\\); expected bool"):
    CycleConfig(share_noise=1)
  with pytest.raises(TypeError, match="cycle.num_steps_max=True \\(bool\\); expected int"):
    CycleConfig(num_steps_max=True)
  with pytest.raises(TypeError, match="unexpected keyword argument 'num_steps'"):
    CycleConfig(num_steps=(1, 1))
  with pytest.raises(ValueError, match="loss.sim_kind"):
    LossConfig(sim_kind="text")
  with pytest.raises(ValueError, match="at least one > 0"):
    LossConfig(clip=0, sim=0, attn=0, recon=0)
  assert LossConfig(clip=1, sim=0, attn=0, recon=1).weights == {"clip": 1, "sim": 0, "attn": 0,
                                                                "recon": 1, "keep": 0}
  with pytest.raises(ValueError, match="at least one > 0"):
    LossConfig(clip=0, sim=0, attn=0, recon=0, keep=0)
  assert LossConfig(clip=0, sim=0, attn=0, recon=0, keep=1).weights["keep"] == 1
  for fraction in (0.0, 1.5):
    with pytest.raises(ValueError, match="loss.keep_fraction"):
      LossConfig(keep=1, keep_fraction=fraction)
