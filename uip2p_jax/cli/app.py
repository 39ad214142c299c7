"""`uip2p app`: the browser demo (`uip2p_jax/app.py`), served until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys

from uip2p_jax.cli import common


def add_parser(commands) -> None:
  p = commands.add_parser("app", help="edit images in a browser (a local Gradio page)",
                          description=run.__doc__)
  p.add_argument("--model", default=None,
                 help=common.MODEL_HELP + f" (default: {common.DEFAULT_EDIT_MODEL})")
  p.add_argument("--shapes", action="store_true",
                 help="a ShapesWorld model (implied by the shapes-* editors): its test "
                      "scenes as examples, and a 64 px working size by default")
  p.add_argument("--resolution", type=common.resolution, default=None,
                 help="longest side of the working size (default 512; 64 for a ShapesWorld "
                      "model)")
  p.add_argument("--steps", type=common.positive_int, default=20, help="the page's initial steps")
  p.add_argument("--text-scale", type=float, default=None,
                 help=f"the page's initial text guidance (default 7.5; "
                      f"{common.SHAPES_TEXT_SCALE} for a ShapesWorld model)")
  p.add_argument("--image-scale", type=float, default=1.5)
  p.add_argument("--sampler", default="euler_ancestral",
                 choices=["euler_ancestral", "euler", "ddim", "ddpm"])
  p.add_argument("--dtype", type=common.compute_dtype, default="auto",
                 metavar="{" + ",".join(common.DTYPES) + "}", help=common.DTYPE_HELP)
  p.add_argument("--seed", type=common.non_negative_int, default=0,
                 help="seed of the tiny random model's weights")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to serve on (0.0.0.0: every interface; default this machine only)")
  p.add_argument("--port", type=common.int_at_least(1, "a port number"), default=7860)
  p.add_argument("--share", action="store_true",
                 help="also ask gradio for a public share link (needs internet; off by default)")
  p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
  """Serve a page that edits an uploaded image by instruction (steps, text and image guidance,
  seed), with the bundled sample photos (and ShapesWorld scenes) as examples. Works offline
  with the default model, the shipped ShapesWorld CEC editor; the first edit of each image size
  compiles."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
  from uip2p_jax.app import build_app, launch
  world = common.editor_defaults(args, "uip2p app")
  pipe = common.load_pipeline(args.model, args.dtype, args.seed, command="uip2p app")
  name = (f"the {common.EMBEDDED_MODEL} (its edits are noise: it shows the path runs)"
          if args.model == common.TINY_MODEL else args.model)
  app = build_app(pipe, name, resolution=args.resolution, steps=args.steps,
                  text_scale=args.text_scale, image_scale=args.image_scale,
                  sampler=args.sampler, shapes=world)
  # Quiet: gradio's own banner suggests `share=True` in Python; say it in this command's terms.
  launch(app, server_name=args.host, server_port=args.port, share=args.share,
         prevent_thread_lock=True, quiet=True)
  print(f"uip2p app: serving {app.share_url or app.local_url} (Ctrl-C stops)", file=sys.stderr)
  app.block_thread()  # until Ctrl-C, which closes the server
  return common.OK
