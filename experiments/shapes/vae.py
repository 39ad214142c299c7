"""ShapesWorld stage 1: the world's VAE (the project's AutoencoderKL, factor 4: 64 px scenes ->
16x16x4 latents), trained from nothing to reconstruct rendered scenes (L1 + MSE + 1e-6 KL).

  uip2p train --config experiments/shapes/vae.py --workdir runs/shapes/vae

Export: runs/shapes/vae/export/vae (scaling factor measured as 1 / latent std).
Time on the 2-core VM: 0.54 s/step alone, about 40 min (52 min with other jobs alongside).
Expected: PSNR about 32.5 dB on its training batches; scaling factor about 1.05.
BENCHMARKS.md / RESULTS.md ("ShapesWorld").
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps="4000")
  return common.shapes_config("vae", steps=int(args["steps"]), batch=16, lr=5e-4)
