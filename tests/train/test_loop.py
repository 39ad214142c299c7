"""The train step and the trainer on tiny models (one CPU device): updates, NaN skipping,
overfitting one batch, gradient accumulation, SIGTERM save, a killed save skipped, exact resume
without duplicate metrics, retention, export, the final edit of a finished run."""

import json
import os
import signal

import jax
import numpy as np
import pytest

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
  # t and noise are redrawn every step: compare 10-step means. Measured (2026-11-29, init seeds
  # 1 and 2): steps 20-30 at 0.872x and 0.881x the first 10 steps' mean, still falling (0.78x
  # and 0.80x at steps 50-60); one step's loss moves by ~0.05 of ~2, a 10-step mean by ~1%, so
  # a UNet that does not learn stays within a few % of 1x.
  for _ in range(30):
    state, metrics = functions.step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.93 * np.mean(losses[:10]), losses


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def test_sigterm_save_killed_save_and_exact_resume(tmp_path, monkeypatch):
  config = tiny_config(**{"total_steps": 4, "checkpoint.every": 2, "export": True,
                          "export_every": 3, "sample.every": 2})
  # Sample grids (not drawn here: the edit would compile) come from the same held-out records
  # in every run, interrupted and resumed ones included.
  sampled = []
  monkeypatch.setattr("uip2p_jax.train.loop.write_samples",
                      lambda run, state, batch, step, writer: sampled.append(list(batch["id"])))
  straight = str(tmp_path / "straight")
  assert not tr.train(config, straight).preempted
  reference = read_metrics(straight)
  assert sorted(reference) == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4"]

  # The EMA UNet is exported in diffusers' format and loads back.
  from uip2p_jax import weights
  exported = weights.load_unet(os.path.join(straight, "export", "unet"), subfolder=None)
  assert exported.config.in_channels == 8
  with open(os.path.join(straight, "export", "README.md")) as f:  # its model card
    card = f.read()
  assert card.startswith("---\nlicense: other\nlibrary_name: diffusers\n") and "4 of 4" in card
  # export_every: a snapshot at step 3 (the last step's export is export/ alone), with its card.
  assert os.listdir(os.path.join(straight, "exports")) == ["step_3"]
  snapshot = os.path.join(straight, "exports", "step_3")
  snapshot_unet = weights.load_unet(os.path.join(snapshot, "unet"), subfolder=None)
  assert not np.array_equal(np.asarray(snapshot_unet.conv_in.kernel.value),
                            np.asarray(exported.conv_in.kernel.value))
  with open(os.path.join(snapshot, "README.md")) as f:
    assert "3 of 4" in f.read()

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
  assert tr.train(config, resumed).preempted
  monkeypatch.setattr(Loader, "__next__", original_next)
  checkpoints = os.path.join(resumed, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["2", "3"]
  # A run killed after logging step 4 but before saving it: the resumed run logs 4 once.
  with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n" + '{"step": 5, "lo')

  # A save killed midway leaves a temporary folder: it is ignored (and cleaned up).
  partial = os.path.join(checkpoints, "4.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "junk"), "wb") as f:
    f.write(b"half a checkpoint")

  tr.train(config, resumed)
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
  # Steps 2 and 4 straight, 2 before the interruption, 4 after the resume: one held-out set.
  assert len(sampled) == 4 and len(sampled[0]) == config.sample.count
  assert all(ids == sampled[0] for ids in sampled), sampled
  continued = read_metrics(resumed)
  for step in (1, 2, 3, 4):
    for name in ("loss", "loss_clip", "loss_recon", "grad_norm"):
      np.testing.assert_allclose(continued[step][name], reference[step][name], rtol=1e-6,
                                 err_msg=f"step {step} {name}")
  assert not os.path.exists(partial)
  # Retention: the last `keep` (2) plus the best by loss, whose loss is in each checkpoint.
  kept = sorted(os.listdir(checkpoints), key=int)
  assert kept[-2:] == ["3", "4"] and len(kept) <= 3, kept
  for step in kept:
    with open(os.path.join(checkpoints, step, "metrics", "metrics")) as f:
      assert json.load(f)["loss"] == pytest.approx(continued[int(step)]["loss"], rel=1e-6)

  # A finished run asked again for its final edit (no step left to run) writes it.
  tr.train(tiny_config(**{"total_steps": 4, "checkpoint.every": 2, "final_edit": True}), resumed)
  assert os.path.getsize(os.path.join(resumed, "final_edit.png")) > 0


def test_the_loop_keeps_at_most_two_steps_in_flight():
  """Each step call returns before the step runs; the loop waits for the step two calls back, so
  a SIGTERM's save waits for at most two steps, not for every batch the loader had ready (a
  12 s step logged every 50 steps once took 10 minutes to stop)."""
  finished = []

  class Loss:
    def __init__(self, step):
      self.step = step

    def block_until_ready(self):
      finished.append(self.step)

  assert tr.loop.MAX_STEPS_IN_FLIGHT == 2
  window = tr.loop.StepWindow()
  for step in range(1, 7):
    window.dispatched(Loss(step))
    assert finished == list(range(1, step - 1)), (step, finished)


def test_accumulation_equals_one_step_of_the_whole_batch():
  """accumulate=2 averages the gradients of examples (0, 2, ...) and (1, 3, ...): for a loss
  that is a mean over examples, that is the gradient of the whole batch."""
  import jax.numpy as jnp
  from uip2p_jax.train import step as train_step
  from uip2p_jax.train.config import load_config
  optim = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                                   "smoke.py")).optim
  optimizer, schedule = train_step.make_optimizer(optim)
  inputs = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  batch = {"x": inputs, "y": inputs @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3}

  def compute_loss(params, frozen, batch, key):
    error = batch["x"] @ params["w"] + params["b"] - batch["y"]
    loss = jnp.mean(error ** 2)
    return loss, {"loss": loss}
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  states = {}
  for accumulate in (1, 2):
    state = train_step.TrainState(jnp.zeros((), jnp.int32), params, params,
                                  optimizer.init(params), jax.random.PRNGKey(0),
                                  jnp.zeros((), jnp.int32))
    states[accumulate] = train_step.train_step(
        state, {}, batch, compute_loss=compute_loss, optimizer=optimizer, lr_schedule=schedule,
        accumulate=accumulate)
  (one, m1), (two, m2) = states[1], states[2]
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), two.params, one.params)
  assert float(m1["grad_norm"]) > 0


def test_image_channels_lr_multiplier_scales_only_conv_ins_image_channels():
  import jax.numpy as jnp
  from uip2p_jax.train import step as train_step
  from uip2p_jax.train.config import load_config
  optim = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                                   "smoke.py")).optim
  optim.warmup_steps, optim.schedule = 0, "constant"  # (a non-zero learning rate at step 0)
  params = {"conv_in": {"kernel": jnp.zeros((3, 3, 8, 4)), "bias": jnp.zeros(4)},
            "conv_out": {"kernel": jnp.zeros((3, 3, 4, 8))}}
  grads = jax.tree.map(jnp.ones_like, params)
  moved, structures = {}, set()
  for multiplier in (1.0, 10.0):
    optim.image_channels_lr_multiplier = multiplier
    optimizer, _ = train_step.make_optimizer(optim)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    moved[multiplier] = jax.tree.map(lambda u: np.abs(np.asarray(u)), updates)
    structures.add(jax.tree.structure(optimizer.init(params)))
  assert len(structures) == 1  # the same optimizer state: a run can change it and resume
  plain, scaled = moved[1.0], moved[10.0]
  assert plain["conv_in"]["kernel"][:, :, 4:].min() > 0
  np.testing.assert_allclose(scaled["conv_in"]["kernel"][:, :, 4:],
                             10 * plain["conv_in"]["kernel"][:, :, 4:], rtol=1e-6)
  np.testing.assert_array_equal(scaled["conv_in"]["kernel"][:, :, :4],
                                plain["conv_in"]["kernel"][:, :, :4])
  np.testing.assert_array_equal(scaled["conv_in"]["bias"], plain["conv_in"]["bias"])
  np.testing.assert_array_equal(scaled["conv_out"]["kernel"], plain["conv_out"]["kernel"])


@pytest.mark.parametrize("variant", ["adamw_bf16_moments", "adafactor", "no_ema", "bf16_ema"])
def test_lean_optimizer_and_ema_variants(variant):
  """bf16 AdamW moments, Adafactor, no EMA and a bf16 EMA each take a finite step and hold
  their state in the dtype they say (toy loss: no model compiles)."""
  import jax.numpy as jnp
  from uip2p_jax.train import step as train_step
  config = tiny_config(**{
      "adamw_bf16_moments": {"optim.mu_dtype": "bfloat16"},
      "adafactor": {"optim.name": "adafactor"},
      "no_ema": {"ema_decay": 0.0},
      "bf16_ema": {"ema_dtype": "bfloat16"}}[variant])
  optimizer, schedule = train_step.make_optimizer(config.optim)
  params = {"w": jnp.ones((256, 128)), "b": jnp.zeros((128,))}
  inputs = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)

  def compute_loss(params, frozen, batch, key):
    loss = jnp.mean((batch["x"] @ params["w"] + params["b"]) ** 2)
    return loss, {"loss": loss}
  ema = None if config.ema_decay == 0 else jax.tree.map(
      lambda p: p.astype(jnp.dtype(config.ema_dtype)), params)
  state = train_step.TrainState(jnp.zeros((), jnp.int32), params, ema, optimizer.init(params),
                                jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
  state, metrics = train_step.train_step(state, {}, {"x": inputs}, compute_loss=compute_loss,
                                         optimizer=optimizer, lr_schedule=schedule,
                                         ema_decay=config.ema_decay)
  assert np.isfinite(float(metrics["loss"])) and int(metrics["update_skipped"]) == 0
  assert not np.array_equal(np.asarray(state.params["w"]), np.ones((256, 128)))
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim == 2]
  if variant == "adamw_bf16_moments":
    assert {leaf.dtype for leaf in moments} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  if variant == "adafactor":  # factored: a row and a column vector, no (256, 128) moment
    assert not moments
  if variant == "no_ema":
    assert state.ema_params is None
  if variant == "bf16_ema":
    assert state.ema_params["w"].dtype == jnp.bfloat16


def test_wsd_schedule_holds_then_decays_linearly_and_bad_settings_are_refused():
  from uip2p_jax.train import step as train_step
  from uip2p_jax.train.config import ConfigError, check
  config = tiny_config(**{"optim.schedule": "wsd", "optim.lr": 1e-3, "optim.warmup_steps": 10,
                          "optim.decay_start": 100, "optim.decay_steps": 50,
                          "optim.end_lr_factor": 0.1})
  schedule = train_step.learning_rate_schedule(config.optim)
  lr = {step: float(schedule(step)) for step in (5, 10, 60, 100, 125, 150, 400)}
  np.testing.assert_allclose([lr[5], lr[10], lr[60], lr[100]], [5e-4, 1e-3, 1e-3, 1e-3],
                             rtol=1e-6)
  np.testing.assert_allclose([lr[125], lr[150], lr[400]], [5.5e-4, 1e-4, 1e-4], rtol=1e-5)
  for bad in ({"optim.decay_start": 5}, {"optim.decay_steps": 0}, {"optim.decay_start": 200}):
    with pytest.raises(ConfigError, match="decay_start"):
      check(tiny_config(**{"optim.schedule": "wsd", "optim.warmup_steps": 10,
                                  "total_steps": 200, "optim.decay_start": 100,
                                  "optim.decay_steps": 50, **bad}))
