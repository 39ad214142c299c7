r"""Smoke test of the whole CEC training path: tiny random models, the bundled sample photos.

Command (the README's main job; about 3 minutes on a 2-core CPU, no download):

  bash launch/local.sh train --config experiments/smoke.py --workdir runs/smoke

Hardware: any CPU (1 device) up to a TPU/GPU host (the mesh takes every device).
Expected: 300 steps at ~0.4 s each; the loss (all four terms, weight 1) falls from ~2.1 over
the first 50 steps to ~1.5 by step 250-300 (measured 2026-11-27: 2.13 at step 25, 1.46 at 300);
checkpoints at 100/200/300 (resumable: run the command again with --config.total_steps=400);
runs/smoke/samples/step_*.png (input | forward edit | reconstruction),
runs/smoke/export/unet (diffusers format) and runs/smoke/final_edit.png.
The edits are not meaningful: the models are random and tiny.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "cec"
  c.total_steps = 300
  c.batch_size = 4                     # global
  c.ema_decay = 0.999
  c.log_every = 25
  c.export = True
  c.final_edit = True

  c.model = dict(preset="tiny", pretrained="", init_from_sd="", clip="", seed=0,
                 attention_backend="auto", compute_dtype="float32", frozen_dtype="float32",
                 remat="none")
  c.data = dict(dir="sample", kind="captions", resolution=64, num_workers=0, min_scale=1.0,
                max_scale=1.125, flip=True, strict=False)
  c.cycle = dict(start="noised_input", num_steps_min=1, num_steps_max=1, timestep_min=0,
                 timestep_max=1000, share_noise=True, reencode=False, attention_resolution=8,
                 conditioning_dropout=0.0)
  c.loss = dict(clip=1.0, sim=1.0, attn=1.0, recon=1.0, sim_kind="reconstruction",
                recon_kind="l1")
  c.ip2p = dict(conditioning_dropout=0.05)
  c.optim = dict(lr=3e-4, warmup_steps=20, schedule="constant", decay_steps=0,
                 end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                 grad_clip=1.0, accumulate=1)
  c.mesh = dict(data=-1, fsdp=1)
  c.checkpoint = dict(every=100, keep=2, use_async=True)
  c.sample = dict(every=100, count=4, steps=8, text_scale=7.5, image_scale=1.5)
  c.expected = dict()                  # random weights: no reference numbers
  return c
