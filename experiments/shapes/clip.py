"""ShapesWorld stage 2: the world's CLIP (the project's CLIP text + vision towers, small; 64 px
images, patch 8), trained contrastively on rendered scenes and their captions. Its text tower is
also the text encoder of the world's UNets (as SD shares CLIP's).

  uip2p train --config experiments/shapes/clip.py --workdir runs/shapes/clip

Export: runs/shapes/clip/export/clip (a transformers CLIPModel folder).
Time on the 2-core VM: 22 min (0.55 s/step). Expected: in-batch retrieval 100% at the end,
zero-shot caption retrieval about 0.93 on the test scenes (RESULTS.md).
"""

import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps="2000")
  return common.shapes_config("clip", steps=int(args["steps"]), batch=64, lr=5e-4)
