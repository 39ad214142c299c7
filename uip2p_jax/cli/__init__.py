"""The `uip2p` command (`python -m uip2p_jax`): edit, app, demo, train, plan, eval, data, export.

One module per command group (`edit.py`, `app.py`, `demo.py`, `train.py`, `plan.py`, `eval.py`,
`data.py`, `export.py`), each with `add_parser(commands)` and its run function; `common.py`
holds what they share (argument types, exit statuses, loading the edit pipeline).
"""

from __future__ import annotations

import argparse
import sys

from uip2p_jax.cli import (app, common, data, demo, edit, eval as evaluation, export, plan,
                           train)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="uip2p", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for group in (demo, edit, app, train, plan, evaluation, data, export):
    group.add_parser(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # its own parser: --config FILE.py:ARGS --config.key=value
    return train.run(argv[1:])
  args = build_parser().parse_args(argv)
  args.command_line = argv  # `uip2p plan` re-runs itself with XLA flags
  try:
    return args.run(args)
  except (ValueError, OSError) as e:  # weights.CheckpointError is a ValueError
    print(f"uip2p {args.command}: error: {e}", file=sys.stderr)
    return common.USAGE_ERROR


if __name__ == "__main__":
  sys.exit(main())
