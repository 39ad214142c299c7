"""`uip2p plan`: per-device memory and FLOPs of a config's train step (uip2p_jax.plan)."""

from __future__ import annotations

import argparse

from uip2p_jax.cli import common

DESCRIPTION = ("AOT-compiles a config's full train step on abstract shapes (no weights) for a "
               "(data, fsdp) mesh and prints per-device memory and FLOPs. On a CPU, the mesh's "
               "devices are simulated (the command re-runs itself with XLA flags for that).")


def add_parser(commands) -> None:
  p = commands.add_parser("plan", help="per-device memory and FLOPs of a config's train step",
                          description=DESCRIPTION)
  p.add_argument("--config", required=True, help="experiments/FILE.py[:ARGS]")
  p.add_argument("--mesh", type=common.mesh_shape, default=(1, 1), metavar="data=N,fsdp=M",
                 help="the device mesh (default data=1,fsdp=1)")
  p.add_argument("--global-batch", type=common.positive_int, required=True)
  p.add_argument("--resolution", type=common.positive_int, default=256)
  p.add_argument("--preset", default="sd15", choices=["sd15", "tiny"],
                 help="model size to plan (sd15: the real SD 1.5 / CLIP ViT-L/14 shapes)")
  p.add_argument("--wait-for-executable", action="store_true",
                 help="on a CPU, finish the compile (FLOPs after optimisation; can take an hour "
                      "at SD 1.5 size) instead of reading memory from the buffer assignment")
  p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
  from uip2p_jax.plan import plan_command
  data, fsdp = args.mesh
  return plan_command(args.config, data, fsdp, args.global_batch, args.resolution, args.preset,
                      wait_for_executable=args.wait_for_executable, argv=args.command_line)
