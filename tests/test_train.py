"""The train step and the trainer on tiny models (one CPU device): updates, NaN skipping,
overfitting one batch, SIGTERM save, a killed save skipped, exact resume, export."""

import json
import os
import signal

import jax
import numpy as np

from trainer_setup import tiny_config
from uip2p_jax import train as tr


def test_step_updates_only_the_unet_and_skips_non_finite_batches(step_setup):
  functions, params, frozen, batch = step_setup
  state = functions.init_state(params, seed=0)
  frozen_before = jax.device_get(frozen)
  params_before = jax.device_get(state.params)
  # Optimizer state exists for the UNet's parameters only (frozen models get none).
  assert len(jax.tree.leaves(state.opt_state)) == 2 * len(jax.tree.leaves(params_before)) + 2
  state, metrics = functions.step(state, frozen, batch)
  metrics = jax.device_get(metrics)
  assert {"loss", "loss_clip", "loss_sim", "loss_attn", "loss_recon", "grad_norm",
          "clip_direction_similarity", "learning_rate", "skipped_updates"} <= set(metrics)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  assert metrics["skipped_updates"] == 0 and int(state.step) == 1
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params_before,
                         jax.device_get(state.params))
  assert all(jax.tree.leaves(changed)) or sum(jax.tree.leaves(changed)) > 0.9 * len(
      jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.device_get(frozen))

  # A NaN image poisons loss and gradient: the update is skipped and counted.
  bad = dict(batch, image=batch["image"] * np.nan)
  before = jax.device_get((state.params, state.ema_params, state.opt_state))
  state, metrics = functions.step(state, frozen, bad)
  assert int(metrics["skipped_updates"]) == 1 and int(metrics["update_skipped"]) == 1
  after = jax.device_get((state.params, state.ema_params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert int(state.step) == 2


def test_loss_falls_when_overfitting_one_batch(step_setup):
  functions, params, frozen, batch = step_setup
  state = functions.init_state(params, seed=1)
  losses = []
  for _ in range(80):  # t and noise are redrawn every step: compare 10-step means
    state, metrics = functions.step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def test_sigterm_save_killed_save_and_exact_resume(tmp_path, monkeypatch):
  config = tiny_config(**{"total_steps": 4, "checkpoint.every": 2, "export": True})
  straight = str(tmp_path / "straight")
  tr.train(config, straight)
  reference = read_metrics(straight)
  assert sorted(reference) == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4"]

  # The EMA UNet is exported in diffusers' format and loads back.
  from uip2p_jax import weights
  exported = weights.load_unet(os.path.join(straight, "export", "unet"), subfolder=None)
  assert exported.config.in_channels == 8

  # Interrupted run: SIGTERM arrives while the 3rd batch is read; the step is finished, saved
  # (off the every-2 schedule) and the run exits.
  from uip2p_jax.data.loader import Loader
  original_next, calls = Loader.__next__, []

  def next_with_sigterm(self):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return original_next(self)
  monkeypatch.setattr(Loader, "__next__", next_with_sigterm)
  resumed = str(tmp_path / "resumed")
  tr.train(config, resumed)
  monkeypatch.setattr(Loader, "__next__", original_next)
  checkpoints = os.path.join(resumed, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["2", "3"]

  # A save killed midway leaves a temporary folder: it is ignored (and cleaned up).
  partial = os.path.join(checkpoints, "4.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "junk"), "wb") as f:
    f.write(b"half a checkpoint")

  tr.train(config, resumed)
  continued = read_metrics(resumed)
  assert sorted(continued) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    for name in ("loss", "loss_clip", "loss_recon", "grad_norm"):
      np.testing.assert_allclose(continued[step][name], reference[step][name], rtol=1e-6,
                                 err_msg=f"step {step} {name}")
  assert not os.path.exists(partial)
