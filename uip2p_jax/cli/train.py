"""`uip2p train`: forwards to `uip2p_jax.train.main` (its own `--config.key=value` parser)."""

from __future__ import annotations

HELP = ("train an experiment: uip2p train --config experiments/FILE.py[:ARGS] --workdir DIR "
        "[--config.key=value ...] (see uip2p_jax/train/config.py; exit 75 when preempted)")


def add_parser(commands) -> None:
  # Listed for `uip2p --help` only: `main` hands `uip2p train ...` to `run` before argparse,
  # since `--config.a.b=value` names any key of the experiment's config.
  commands.add_parser("train", help=HELP, add_help=False)


def run(argv: list[str]) -> int:
  from uip2p_jax.train import main
  return main(argv)
