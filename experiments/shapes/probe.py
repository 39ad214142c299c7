"""ShapesWorld stage 4: the attribute probe (evaluation only, never in a training loss): a
small CNN that reads the background and each grid cell's object colour, shape and size off a
scene, trained on freshly rendered scenes of every colour/shape combination.

  uip2p train --config experiments/shapes/probe.py --workdir runs/shapes/probe

Export: runs/shapes/probe/export/probe. `uip2p eval shapes` reports its accuracy on the test
scenes (target >= 98% of scenes read entirely right; measured 100%); it trains on fresh draws of the whole world
(blurred and noised a little, as decoded edits are), which can repeat a small test scene.
Time on the 2-core VM: 17 min (0.6 s/step, rendering on the fly included).
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps="1500")
  c = common.shapes_config("probe", steps=int(args["steps"]), batch=64, lr=1e-3)
  c.ema_decay = 0.0  # a classifier: its last weights are its best
  return c
