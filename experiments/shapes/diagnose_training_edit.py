"""How good is the edit CEC's losses see, for an editor that can edit? CEC's training edit (K = 1,
`cycle.py`) is one conditional UNet call on the input noised to t ~ U{0..999}, taken as its x0
prediction and decoded; L_clip scores that picture. This script makes that same edit at fixed
timesteps with fixed noise on the first N test turns of `data build shapes --seed 0` and
reports, per t: the world CLIP's direction similarity (1 - L_clip), the probe's edit accuracy
and preservation of the decoded x0 edit, and L_keep (the edit's mean latent L1 to the input's
scaled latent, `loss.keep`, over `--keep-fraction` of the positions as `loss.keep_fraction`),
and the direction similarity measured from the null edit (the same edit with the empty
instruction, same t and noise) instead of from the input. The first row is the true edited
scene through the world VAE (encode, decode): the similarity L_clip would reach at its best.

For the supervised editor the question is whether a model that edits well at inference (20
sampler steps) also shows the edit in this one-call picture; if it does not at most t, L_clip
at most of CEC's timesteps scores a picture that cannot show an edit, whatever the UNet learns.

  python experiments/shapes/diagnose_training_edit.py [MODEL ...] [--count 128] [--k K]
      [--keep-fraction F]

--k: the edit as CEC's K-step training edit (`cycle.num_steps_min = max = K`; 1 = one call).

MODEL: a shipped name (default: shapes-ip2p shapes-ip2p-recolour shapes-cec) or an edit
pipeline folder. RESULTS.md (CEC on ShapesWorld, "The edit L_clip sees") has its readings.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from uip2p_jax import losses, schedules, shapes_models
from uip2p_jax.cli.common import model_folder
from uip2p_jax.cycle import CycleConfig, edit_with_k_steps
from uip2p_jax.data import shapes
from uip2p_jax.eval.shapes import World, score_labels, to_uint8, to_unit
from uip2p_jax.pipeline import EditPipeline
from uip2p_jax.tokenizer import tokenize

TIMESTEPS = (50, 200, 400, 600, 800, 950, 999)
DEFAULT_MODELS = ("shapes-ip2p", "shapes-ip2p-recolour", "shapes-cec")


def _scores(world: World, labels: tuple[np.ndarray, np.ndarray], decoded: np.ndarray,
            input_images: np.ndarray, input_text: np.ndarray, edited_text: np.ndarray,
            keep: jax.Array, null_edit: np.ndarray) -> dict:
  """Direction similarity, edit accuracy and preservation of decoded edits in [-1, 1], scored on
  their 8-bit pictures as `uip2p eval shapes` scores; keep: the edits' L_keep, passed through;
  null_similarity: the direction similarity measured from `null_edit` (the same edit made with
  the empty instruction, decoded) instead of from the input."""
  pictures = to_unit(to_uint8(decoded))
  edited_images = world.image_embeddings(pictures)
  direction = lambda reference: float(np.mean(losses.clip_direction_similarity(
      edited_image=edited_images, input_image=reference, edited_text=edited_text,
      input_text=input_text)))
  edit_ok, preserved = score_labels(*labels, world.labels(pictures))
  return {"similarity": direction(input_images), "edit_accuracy": float(edit_ok.mean()),
          "preservation": float(preserved.mean()), "keep": float(keep),
          "null_similarity": direction(world.image_embeddings(to_unit(to_uint8(null_edit))))}


def diagnose(models: list[str], count: int, keep_fraction: float,
             k: int = 1) -> dict[str, list[dict]]:
  paths = shapes_models.paths()
  world = World(paths["probe"], paths["clip"])
  examples = list(shapes.examples("test", count, 0))[:count]
  to_pixels = lambda scenes: np.stack([shapes.render(s) for s in scenes])
  inputs = to_unit(to_pixels([e.scene for e in examples]))
  input_images = world.image_embeddings(inputs)
  texts = world.text_embeddings([shapes.caption(e.scene) for e in examples]
                                + [shapes.caption(e.edited_scene) for e in examples])
  input_text, edited_text = texts[:count], texts[count:]
  labels = (np.stack([shapes.scene_labels(e.scene) for e in examples]),      # (input, target)
            np.stack([shapes.scene_labels(e.edited_scene) for e in examples]))
  readings = {}
  for model in models:
    pipe = EditPipeline.from_pretrained(model_folder(model))
    scaling = pipe.vae.config.scaling_factor
    alphas = jnp.asarray(pipe.schedule.alphas_cumprod(), jnp.float32)
    prediction_type = pipe.schedule.prediction_type
    condition = pipe.vae.encode(jnp.asarray(inputs)).mode()        # c_x, as cycle.py
    keep = lambda latent: jnp.mean(losses.latent_l1(latent, condition * scaling, keep_fraction))
    text = pipe.text_encoder(jnp.asarray(tokenize(pipe.tokenizer,
                                                  [e.instruction for e in examples])))[0]
    empty = pipe.text_encoder(jnp.asarray(tokenize(pipe.tokenizer, [""])))[0]
    empty_text = jnp.broadcast_to(empty, text.shape)
    noise = jax.random.normal(jax.random.key(1), condition.shape)

    @jax.jit
    def training_edit(t, text):  # cycle.py's forward edit: K DDIM steps from the noised input
      timesteps = jnp.full((count,), t)
      noisy = schedules.add_noise(alphas, condition * scaling, noise, timesteps)
      x0, _ = edit_with_k_steps(pipe.unet, alphas, noisy, condition, text, timesteps,
                                jax.random.key(0), CycleConfig(num_steps_min=k, num_steps_max=k),
                                None, prediction_type)
      return pipe.vae.decode(x0 / scaling), keep(x0)

    truth = pipe.vae.encode(jnp.asarray(
        to_unit(to_pixels([e.edited_scene for e in examples])))).mode()
    rows = [{"t": "true edit", **_scores(world, labels, np.asarray(pipe.vae.decode(truth)),
                                          input_images, input_text, edited_text,
                                          keep(truth * scaling),
                                          np.asarray(pipe.vae.decode(condition)))}]
    for t in TIMESTEPS:
      decoded, edit_keep = training_edit(t, text)
      null_edit, _ = training_edit(t, empty_text)
      rows.append({"t": t, **_scores(world, labels, np.asarray(decoded), input_images,
                                     input_text, edited_text, edit_keep, np.asarray(null_edit))})
    readings[model] = rows
  return readings


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
  parser.add_argument("--count", type=int, default=128)
  parser.add_argument("--keep-fraction", type=float, default=1.0,
                      help="L_keep's loss.keep_fraction: the share of latent positions it reads")
  parser.add_argument("--k", type=int, default=1,
                      help="DDIM steps per edit, as cycle.num_steps_min = max = K")
  args = parser.parse_args()
  readings = diagnose(args.models, args.count, args.keep_fraction, args.k)
  print(f"CEC's training edit (x0 after K = {args.k} DDIM steps from the input noised to t), "
        f"first {args.count} test turns: direction similarity / edit accuracy / preservation / "
        f"L_keep (keep_fraction {args.keep_fraction:g}) / direction similarity from the null edit")
  print("| t | " + " | ".join(readings) + " |")
  print("|---|" + "---|" * len(readings))
  for i, row in enumerate(next(iter(readings.values()))):
    cells = [f"{r[i]['similarity']:.3f} / {r[i]['edit_accuracy']:.3f} / "
             f"{r[i]['preservation']:.3f} / {r[i]['keep']:.3f} / {r[i]['null_similarity']:.3f}"
             for r in readings.values()]
    print(f"| {row['t']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
