"""ShapesWorld's supervised baseline: InstructPix2Pix on the world's pairs (input, instruction,
true edited scene), the 8-channel UNet initialised from the world's text-to-image prior (image
channels zero), trained with the `ip2p` objective (conditioning dropout 5%), offset noise 0.1 and
the v-prediction loss weighting (`ip2p.noise_offset`, `ip2p.loss_weighting`: without them the
model barely reads its image condition; RESULTS.md has the two runs that showed it).

  uip2p data build shapes --out runs/shapes/data --train 20000 --test 500 --seed 0
  uip2p train --config experiments/shapes/ip2p.py[:runs=runs/shapes] --workdir runs/shapes/ip2p

Export: runs/shapes/ip2p/export, a full InstructPix2Pix folder (`uip2p edit --model`,
`uip2p eval shapes --model`). Pairs cover only the training phrasings and combinations.

`kinds=recolour`: supervised on recolour pairs only (the editor that CEC then extends to the
other kinds, experiments/shapes/cec.py:init=recolour):

  uip2p data build shapes --out runs/shapes/data_recolour --train 20000 --test 500 --seed 0 \
      --edit-kinds recolour
  uip2p train --config experiments/shapes/ip2p.py:kinds=recolour --workdir runs/shapes/ip2p_recolour
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps="3000", runs=common.RUNS, kinds="all")
  kinds = common.choice(args, "kinds", ("all", "recolour"))
  paths = common.paths(args["runs"])
  c = common.shapes_config("ip2p", steps=int(args["steps"]), batch=32, lr=2e-4)
  c.model.init_from_sd = paths["prior"]
  c.data.dir = paths["data"] if kinds == "all" else f"{args['runs']}/data_recolour"
  c.data.kind = "ip2p"
  # Without it the model reads a scene's colours off the noisy latent at every trained t and
  # leaves the image condition nearly unused (conv_in's image weights 9x smaller than its noisy
  # ones after 3000 steps): sampled edits from pure noise then get the background wrong.
  c.ip2p.noise_offset = 0.1
  # And the image condition is what the high timesteps need but the plain noise MSE gives them the
  # least gradient: with offset noise alone, 3000 steps still left conv_in's image weights 9x
  # smaller than its noisy ones (edit accuracy 0.26, preservation 0.14). The v-prediction loss
  # weights them up (docs/method.md, "Loss weighting").
  c.ip2p.loss_weighting = "v"
  return c
