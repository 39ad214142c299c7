"""The ShapesWorld models this repository trained and ships (float16 safetensors; how each was
made: MODELS.md beside this file). `paths()` gives their folders; `uip2p eval shapes` and
`uip2p edit` address them by name (shapes-ip2p, shapes-sdedit, shapes-cec)."""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def paths() -> dict[str, str]:
  return {name: os.path.join(ROOT, name) for name in ("probe", "clip", "prior", "ip2p", "cec")}
