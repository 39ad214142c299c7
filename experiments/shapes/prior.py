"""ShapesWorld stage 3: the world's Stable Diffusion: a 4-channel text-to-image UNet trained on
rendered scenes and captions (SD's noise-prediction loss, 10% caption dropout for guidance), on
the world's VAE (stage 1) and CLIP text tower (stage 2).

  uip2p train --config experiments/shapes/prior.py[:runs=runs/shapes] --workdir runs/shapes/prior

Export: runs/shapes/prior/export, a full SD pipeline folder (unet, vae, text_encoder, tokenizer,
scheduler): the initialisation of the edit UNets and the SDEdit baseline.
Time on the 2-core VM: about 0.6 s/step alone (1.2 s with a test run alongside), so about 30 min.
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps="3000", runs=common.RUNS)
  paths = common.paths(args["runs"])
  c = common.shapes_config("t2i", steps=int(args["steps"]), batch=32, lr=3e-4)
  c.model.vae, c.model.text_encoder = paths["vae"], paths["clip"]
  return c
