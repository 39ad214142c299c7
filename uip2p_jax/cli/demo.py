"""`uip2p demo`: every model once on random weights, then a full edit (no download), then the
shipped ShapesWorld editor on a rendered scene, its edit read by the world's attribute probe."""

from __future__ import annotations

import argparse
import os
import time

from uip2p_jax.cli import common


def add_parser(commands) -> None:
  p = commands.add_parser("demo", help="every model and a full edit on random weights; a "
                          "trained ShapesWorld edit", description=run.__doc__)
  p.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
  p.add_argument("--resolution", type=common.resolution, default=64)
  p.add_argument("--instruction", default="make it snowy")
  p.add_argument("--seed", type=common.non_negative_int, default=0)
  p.add_argument("--steps", type=common.positive_int, default=4,
                 help="sampling steps of the demo edit")
  p.add_argument("--out-dir", default="demo_out", help="where the demo edit's images go")
  p.add_argument("--editor", default=None,
                 help="the trained editor of the ShapesWorld edit: a shipped model's name or an "
                      "export folder (default shapes-cec); none skips it")
  p.set_defaults(run=run)


def parameter_count(module) -> int:
  import numpy as np
  from flax import nnx
  return sum(int(np.prod(v.get_value().shape))
             for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def _timed(label: str, fn, *args):
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  print(f"  {label:<34s} {time.perf_counter() - start:7.2f} s (compile + run)")
  return out


def run(args: argparse.Namespace) -> int:
  """Every model once on random weights, then a full edit: the InstructPix2Pix data path; then
  a trained ShapesWorld editor (shapes-cec unless --editor) recolours a rendered scene's circle
  and the world's attribute probe reads the result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from uip2p_jax.image_io import to_pil
  from uip2p_jax.model_set import build_models
  from uip2p_jax.models import AttentionCapture
  from uip2p_jax.pipeline import EditPipeline
  from uip2p_jax.tokenizer import tokenize

  print(f"uip2p demo: preset {args.preset!r}, random weights, {args.resolution} px, "
        f"backend {jax.default_backend()} ({jax.device_count()} device(s))")
  models = build_models(preset=args.preset, seed=args.seed, with_clip=True)
  unet, vae, text_encoder, clip = models.unet, models.vae, models.text_encoder, models.clip
  for name, module in (("unet", unet), ("vae", vae), ("text encoder", text_encoder),
                       ("clip", clip)):
    print(f"  {name:<14s} {parameter_count(module) / 1e6:9.2f} M parameters")

  instruction = args.instruction
  token_ids = tokenize(models.tokenizer, [instruction, ""])
  print(f"  tokens of {instruction!r}: {token_ids[0][:token_ids[0].argmax() + 1].tolist()}")

  size = args.resolution
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  image = jnp.asarray(np.stack([xx, yy, xx * yy], -1)[None], jnp.float32)

  encode_text = nnx.jit(lambda m, ids: m(ids)[0])
  encode_image = nnx.jit(lambda m, x: m.encode(x).mode())
  factor = vae.downsample_factor
  capture = AttentionCapture(resolutions=(size // factor // 2,))
  predict = nnx.jit(lambda m, x, t, c: m(x, t, c, capture=capture))
  decode = nnx.jit(lambda m, z: m.decode(z))
  clip_similarity = nnx.jit(lambda m, x, ids: jnp.sum(m.embed_images(x) * m.embed_texts(ids), -1))

  text_embeddings = _timed("text encoder (2 x 77 tokens)", encode_text, text_encoder, token_ids)
  image_latent = _timed(f"vae encode ({size}x{size})", encode_image, vae, image)
  noisy = jax.random.normal(jax.random.key(args.seed), image_latent.shape)
  unet_input = jnp.concatenate([noisy, image_latent], axis=-1)
  noise_pred, maps = _timed("unet + cross-attention capture", predict, unet, unet_input,
                            jnp.array([500]), text_embeddings[:1])
  decoded = _timed("vae decode", decode, vae, image_latent)
  similarity = _timed("clip image-text similarity", clip_similarity, clip, decoded,
                      token_ids[:1])
  print(f"  image latent {tuple(image_latent.shape)}, noise prediction "
        f"{tuple(noise_pred.shape)} (std {float(noise_pred.std()):.3f}), decoded "
        f"{tuple(decoded.shape)}")
  for layer, probs in maps.items():
    print(f"  captured {layer}: {tuple(probs.shape)}, rows sum to "
          f"{float(probs.sum(-1).mean()):.4f}")
  print(f"  clip similarity (random weights): {float(similarity[0]):+.4f}")

  # The whole edit path (what `uip2p edit` runs), on the same random models.
  pipe = EditPipeline.from_models(models)
  edited = _timed(f"edit, {args.steps} Euler ancestral steps", lambda: pipe.edit(
      np.asarray(image), [instruction], steps=args.steps, seeds=[args.seed]))
  os.makedirs(args.out_dir, exist_ok=True)
  to_pil(np.asarray(image[0])).save(os.path.join(args.out_dir, "input.png"))
  to_pil(edited[0]).save(os.path.join(args.out_dir, "edited.png"))
  print(f"  wrote {args.out_dir}/input.png and {args.out_dir}/edited.png")
  if args.editor != "none":
    shapes_edit(common.edit_model(args.editor, "uip2p demo"), args.out_dir, args.seed)
  print("demo finished: every model ran on this machine with no download.")
  return common.OK


# The demo's ShapesWorld scene: a red circle and a green square on gray; the circle turns blue.
DEMO_INSTRUCTION = "make the red circle blue"


def demo_scene():
  from uip2p_jax.data import shapes
  return shapes.Scene("gray", (shapes.SceneObject(0, 0, "red", "circle", "large"),
                               shapes.SceneObject(2, 2, "green", "square", "large")))


def shapes_edit(model: str, out_dir: str, seed: int = 0, instruction: str = DEMO_INSTRUCTION):
  """`model` edits the demo scene by `instruction`; the world's probe (shipped) reads the edit.
  Returns the probe's labels of the edit (shapes.scene_labels's layout)."""
  import numpy as np

  from uip2p_jax import shapes_models
  from uip2p_jax.data import shapes
  from uip2p_jax.eval.shapes import World, to_uint8, to_unit
  from uip2p_jax.image_io import to_pil
  scene = demo_scene()
  image = to_unit(shapes.render(scene))
  pipe = common.load_pipeline(model, command="uip2p demo")
  start = time.perf_counter()
  edited = to_uint8(np.asarray(pipe.edit(image[None], [instruction], steps=20,
                                         text_scale=common.SHAPES_TEXT_SCALE, image_scale=1.5,
                                         seeds=[seed]))[0])
  seconds = time.perf_counter() - start
  models = shapes_models.paths()
  labels = World(models["probe"], models["clip"]).labels(to_unit(edited)[None])[0]
  read = shapes.describe_labels(labels)
  to_pil(image).save(os.path.join(out_dir, "shapes_input.png"))
  to_pil(to_unit(edited)).save(os.path.join(out_dir, "shapes_edited.png"))
  print(f"  {model} on a rendered scene ({shapes.caption(scene)}), {instruction!r}: "
        f"{seconds:.1f} s (compile + 20 steps); the probe reads the edit as: {read}")
  print(f"  wrote {out_dir}/shapes_input.png and {out_dir}/shapes_edited.png")
  return labels
