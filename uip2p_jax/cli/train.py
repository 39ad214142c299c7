"""`uip2p train`: forwards to `uip2p_jax.train.main` (absl / ml_collections flags)."""

from __future__ import annotations

HELP = ("train an experiment: uip2p train --config experiments/FILE.py[:ARGS] --workdir DIR "
        "[--config.key=value ...] (absl flags; see uip2p_jax/train/)")


def add_parser(commands) -> None:
  # Listed for `uip2p --help` only: `main` hands `uip2p train ...` to `run` before argparse,
  # since the trainer's --config.key=value flags are absl's, not argparse's.
  commands.add_parser("train", help=HELP, add_help=False)


def run(argv: list[str]) -> int:
  from uip2p_jax.train import main
  return main(argv)
