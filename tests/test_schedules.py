"""Each sampler equals diffusers' scheduler of the same name, step by step."""

import os

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)

import uip2p_jax
from uip2p_jax.schedules import NoiseSchedule, make_sampler

# timbrooks/instruct-pix2pix's scheduler/scheduler_config.json (EulerAncestralDiscreteScheduler).
IP2P_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                  "trained_betas": None}
TORCH_SCHEDULERS = {"euler_ancestral": EulerAncestralDiscreteScheduler,
                    "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}
VARIANTS = {
    "ip2p": {},
    "linspace": {"timestep_spacing": "linspace"},
    "trailing_v": {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "leading_linear": {"timestep_spacing": "leading", "beta_schedule": "linear",
                       "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False,
                       "set_alpha_to_one": False},
}


def _rel_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-12)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(TORCH_SCHEDULERS))
def test_sampler_matches_diffusers_step_by_step(kind, variant):
  config = {**IP2P_SCHEDULER, **VARIANTS[variant]}
  num_steps, eta = 7, (0.5 if kind == "ddim" else 0.0)
  reference = TORCH_SCHEDULERS[kind].from_config(config)
  reference.set_timesteps(num_steps)
  ours = make_sampler(kind, NoiseSchedule.from_diffusers(config), num_steps, eta=eta)

  np.testing.assert_allclose(ours.timesteps, reference.timesteps.numpy().astype(np.float32))
  np.testing.assert_allclose(ours.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-6)

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 4, 4)).astype(np.float32) * ours.init_noise_sigma
  torch_sample = torch.from_numpy(sample.transpose(0, 3, 1, 2).copy())
  for i, t in enumerate(reference.timesteps):
    model_output = rng.standard_normal(sample.shape).astype(np.float32)
    torch_output = torch.from_numpy(model_output.transpose(0, 3, 1, 2).copy())
    scaled_ref = reference.scale_model_input(torch_sample, t)
    assert _rel_error(ours.scale_model_input(sample, i),
                      scaled_ref.numpy().transpose(0, 2, 3, 1)) <= 1e-6
    # The reference draws its noise from this generator; we inject the same draw.
    kwargs = {"eta": eta} if kind == "ddim" else {}
    step_ref = reference.step(torch_output, t, torch_sample,
                              generator=torch.Generator().manual_seed(i), **kwargs)
    noise = torch.randn(torch_sample.shape, generator=torch.Generator().manual_seed(i))
    stepped = ours.step(i, sample, model_output, noise.numpy().transpose(0, 2, 3, 1))
    expected = step_ref.prev_sample.numpy().transpose(0, 2, 3, 1)
    assert _rel_error(stepped, expected) <= 1e-5, f"{kind}/{variant} step {i}"
    assert _rel_error(ours.predict_original(i, sample, model_output),
                      step_ref.pred_original_sample.numpy().transpose(0, 2, 3, 1)) <= 1e-5
    # Both continue from the reference's sample, so every step is checked on equal inputs.
    sample, torch_sample = expected, step_ref.prev_sample


def test_stochastic_sampler_requires_noise():
  sampler = make_sampler("euler_ancestral", NoiseSchedule.from_diffusers(IP2P_SCHEDULER), 3)
  with pytest.raises(ValueError, match="needs a noise array"):
    sampler.step(0, np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)))


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="beta_schedule 'cosine'"):
    NoiseSchedule.from_diffusers({"beta_schedule": "cosine"})
  with pytest.raises(ValueError, match="use_karras_sigmas"):
    NoiseSchedule.from_diffusers({"use_karras_sigmas": True})
  with pytest.raises(ValueError, match="unknown sampler 'heun'"):
    make_sampler("heun", NoiseSchedule(), 3)


def test_add_noise_matches_diffusers_ddpm_add_noise():
  from diffusers import DDPMScheduler

  from uip2p_jax.schedules import add_noise
  reference = DDPMScheduler.from_config(IP2P_SCHEDULER)
  rng = np.random.default_rng(0)
  latents, noise = (rng.standard_normal((3, 4, 4, 4)).astype(np.float32) for _ in range(2))
  timesteps = np.asarray([0, 500, 999])
  expected = reference.add_noise(torch.from_numpy(latents), torch.from_numpy(noise),
                                 torch.from_numpy(timesteps)).numpy()
  ours = add_noise(np.asarray(reference.alphas_cumprod, np.float32), latents, noise, timesteps)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(NoiseSchedule.from_diffusers(IP2P_SCHEDULER).alphas_cumprod(),
                             reference.alphas_cumprod.numpy(), rtol=1e-5)


def test_preset_models_never_clip_their_latents(tmp_path):
  # A config without clip_sample clips DDIM/DDPM's x0 to [-1, 1] (diffusers' default, kept for
  # the real checkpoints' parity); the latents of the models we train from a preset are not in
  # [-1, 1], so their schedule, and the scheduler config they are saved and shipped with, say so.
  from uip2p_jax.schedules import PRESET_SCHEDULE
  assert make_sampler("ddim", NoiseSchedule.from_diffusers(IP2P_SCHEDULER), 3).clip_sample == 1.0
  PRESET_SCHEDULE.save(str(tmp_path))
  shipped = os.path.join(os.path.dirname(uip2p_jax.__file__), "shapes_models", "scheduler")
  for folder in (str(tmp_path), shipped):
    for kind in ("ddim", "ddpm"):
      assert make_sampler(kind, NoiseSchedule.from_folder(folder), 3).clip_sample is None, folder
