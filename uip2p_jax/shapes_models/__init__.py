"""The ShapesWorld models this repository trained and ships (float16 safetensors; how each was
made: MODELS.md beside this file), and the one table of their names and folders.

`uip2p edit --model shapes-ip2p|shapes-cec` and `uip2p eval shapes --model NAME` address them by
name; `paths(world)` gives the same folders inside a `launch/shapes.sh` runs folder instead.
"""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))

# Model names -> the stage whose export they are (shapes-sdedit: the text-to-image prior, for
# the caption-only SDEdit baseline; the others edit; shapes-ip2p-recolour: supervised on recolour
# edits only, what CEC extends to the other kinds in experiments/shapes/cec.py:init=recolour).
NAMES = {"shapes-sdedit": "prior", "shapes-ip2p": "ip2p", "shapes-cec": "cec",
         "shapes-ip2p-recolour": "ip2p_recolour"}
EDIT_MODELS = ("shapes-ip2p", "shapes-cec", "shapes-ip2p-recolour")
PIPELINE_STAGES = ("prior", "ip2p", "cec", "ip2p_recolour")
STAGES = ("probe", "clip") + PIPELINE_STAGES


def paths(world: str | None = None) -> dict[str, str]:
  """Stage -> folder: a runs folder's exports (`world`), or the shipped models."""
  if world:
    return {"probe": f"{world}/probe/export/probe", "clip": f"{world}/clip/export/clip",
            **{stage: f"{world}/{stage}/export" for stage in PIPELINE_STAGES}}
  return {stage: os.path.join(ROOT, stage) for stage in STAGES}
