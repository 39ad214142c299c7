r"""Smoke test of the whole CEC training path: tiny random models, the bundled sample photos.

Command (the README's main job; no download):

  bash launch/local.sh train --config experiments/smoke.py --workdir runs/smoke

Hardware: any CPU (1 device) up to a TPU/GPU host (the mesh takes every device). Time and
loss on the 2-core development machine: BENCHMARKS.md ("Tiny model on this CPU").
Writes 300 steps of metrics, checkpoints at 100/200/300 (resumable: run the command again
with --config.total_steps=400), runs/smoke/samples/step_*.png (input | forward edit |
reconstruction), runs/smoke/export/unet (diffusers format) and runs/smoke/final_edit.png.
The edits are not meaningful: the models are random and tiny.
"""

import common


def get_config(arg=None):
  common.parse_arg(arg)  # takes no arguments
  return common.override(common.base_config(), {
      "total_steps": 300, "batch_size": 4, "ema_decay": 0.999, "log_every": 25,
      "final_edit": True,
      "model": dict(preset="tiny", compute_dtype="float32", frozen_dtype="float32",
                    remat="none"),
      "data": dict(dir="sample", resolution=64, num_workers=0),
      "cycle": dict(attention_level=0),      # the tiny UNet's 8x8 latent level
      "optim": dict(lr=3e-4, warmup_steps=20),
      "mesh": dict(data=-1, fsdp=1),
      "checkpoint": dict(every=100, keep=2),
      "sample": dict(every=100, steps=8),
  })
