"""How well an edit UNet rebuilds the true edit from its noised latent, position by position:
the x0 prediction's mean |error| (latent units) at fixed timesteps on the first N test pairs of
`data build shapes --seed 0`, split into the positions the edit changes (all edits; one-object
edits only) and those it leaves alone (all; object; background). The t = 999 row is what
sampling starts from: a model that copies its image condition has small errors on every
unchanged position there, objects included. Fixed noise, so two models compare exactly.

  python experiments/shapes/diagnose_x0.py MODEL_FOLDER [--count 128]

RESULTS.md (ShapesWorld, "Why the copies blur") has its readings.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from uip2p_jax import schedules
from uip2p_jax.data import shapes
from uip2p_jax.pipeline import EditPipeline
from uip2p_jax.tokenizer import tokenize

TIMESTEPS = (50, 200, 400, 600, 800, 950, 999)
CHANGED = 0.1     # a position's mean |edited - input| latent change above which it is edited
OBJECT = 0.2      # an unchanged position this far from the scene's median latent holds an object


def _mean(error, mask):
  return float(jnp.sum(error * mask) / (jnp.sum(mask) * error.shape[-1]))


def diagnose(model: str, count: int) -> list[dict]:
  pipe = EditPipeline.from_pretrained(model)
  examples = list(shapes.examples("test", count, 0))[:count]
  to_pixels = lambda scenes: jnp.asarray(
      np.stack([shapes.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1)
  scaling = pipe.vae.config.scaling_factor
  condition = pipe.vae.encode(to_pixels([e.scene for e in examples])).mode()
  target = pipe.vae.encode(to_pixels([e.edited_scene for e in examples])).mode() * scaling
  changed = (jnp.mean(jnp.abs(target - condition * scaling), -1, keepdims=True) > CHANGED)
  one_object = jnp.asarray([e.edit.kind != "background" for e in examples])[:, None, None, None]
  median = jnp.median(condition.reshape(count, -1, condition.shape[-1]), axis=1)[:, None, None]
  objects = (jnp.mean(jnp.abs(condition - median), -1, keepdims=True) > OBJECT) & ~changed
  text = pipe.text_encoder(jnp.asarray(tokenize(pipe.tokenizer,
                                                [e.instruction for e in examples])))[0]
  alphas = jnp.asarray(pipe.schedule.alphas_cumprod(), jnp.float32)
  noise = jax.random.normal(jax.random.key(1), target.shape)
  rows = []
  for t in TIMESTEPS:
    timesteps = jnp.full((count,), t)
    noisy = schedules.add_noise(alphas, target, noise, timesteps)
    output = pipe.unet(jnp.concatenate([noisy, condition], -1), timesteps, text)
    x0 = schedules.predict_x0(schedules.alpha_at(alphas, timesteps), noisy, output,
                              pipe.schedule.prediction_type)
    error = jnp.abs(x0 - target)
    rows.append({"t": t, "changed": _mean(error, changed),
                 "changed_one_object": _mean(error, changed & one_object),
                 "unchanged": _mean(error, ~changed), "unchanged_object": _mean(error, objects),
                 "unchanged_background": _mean(error, ~changed & ~objects)})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("model", help="an edit pipeline folder (a run's export)")
  parser.add_argument("--count", type=int, default=128)
  args = parser.parse_args()
  rows = diagnose(args.model, args.count)
  print(f"{args.model}: x0 mean |error| on {args.count} test pairs")
  print("| t | " + " | ".join(k for k in rows[0] if k != "t") + " |")
  for row in rows:
    print(f"| {row['t']} | " + " | ".join(f"{v:.3f}" for k, v in row.items() if k != "t") + " |")


if __name__ == "__main__":
  main()
