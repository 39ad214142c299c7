"""`uip2p export card`: (re)write an export's model card, and upload the export to the Hub."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Rewrites EXPORT/README.md, the model card of a `uip2p train` export (objectives "
               "cec, ip2p) from its uip2p_training.json, with the tables of any `uip2p eval` "
               "results in the export folder or beside it (a folder holding summary.json and "
               "summary.md). With --push-to-hub OWNER/NAME the card names that repo and the "
               "export folder is uploaded to it (created if missing; huggingface_hub's login: "
               "`hf auth login` or HF_TOKEN). Exit status: 0 done; 2 no training record, or the "
               "upload failed (no network, no login), the message says which.")


def add_parser(commands) -> None:
  group = commands.add_parser("export", help="the model card of an export; upload to the Hub")
  sub = group.add_subparsers(dest="export_command", required=True)
  p = sub.add_parser("card", help="(re)write an export's model card; --push-to-hub uploads it",
                     description=DESCRIPTION)
  p.add_argument("export", metavar="EXPORT", help="a run's export folder (runs/NAME/export)")
  p.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                 help="upload the export folder to this Hub model repo")
  p.add_argument("--private", action="store_true", help="create the repo private")
  p.add_argument("--license", default=None,
                 help="the card's license (default: the base model's: mit for "
                      "timbrooks/instruct-pix2pix, creativeml-openrail-m for SD 1.5; else other)")
  p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
  from uip2p_jax import model_card
  from uip2p_jax.cli import common
  if args.push_to_hub:
    url = model_card.push_to_hub(args.export, args.push_to_hub, private=args.private,
                                 license_id=args.license)
    print(f"uip2p export: uploaded {args.export} with its card to {url}")
  else:
    print(f"uip2p export: wrote {model_card.write_card(args.export, license_id=args.license)}")
  return common.OK
