"""Does L_clip point at the right edit in this world? For each of the first N test turns of
`data build shapes --seed 0`, the world CLIP's direction similarity
cos(E_I(x_e) - E_I(x), E_T(c_out) - E_T(c_in)) (CEC's L_clip is 1 minus it) of the true edited
scene against every other edit of the same scene the world allows (all five kinds; up to
`--per-kind` of each, drawn with a fixed seed), the unedited scene, and the scene emptied of
its objects. Every picture goes through the world VAE (encode, decode), as CEC's edits reach
its CLIP. Per kind: the true edit's similarity, how often it scores highest (top-1), its mean
rank, and the kinds of the candidates that beat it. A kind whose true edit is not the
similarity's best candidate cannot be learnt from L_clip alone, however long CEC trains.

  python experiments/shapes/diagnose_clip_direction.py [--count 200] [--per-kind 4]

RESULTS.md (CEC on ShapesWorld, "What L_clip rewards") has its readings.
"""

import argparse
import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from uip2p_jax import losses, shapes_models, weights
from uip2p_jax.data import shapes
from uip2p_jax.eval.shapes import World, to_unit


def candidates(example: shapes.Example, rng: np.random.Generator, per_kind: int):
  """(label, rendered picture) pairs: the true edit first, the unedited scene second, then the
  alternatives (the emptied scene is its background alone: no Scene holds zero objects)."""
  scene, true = example.scene, example.edited_scene
  background = np.full((shapes.RESOLUTION, shapes.RESOLUTION, 3),
                       shapes.BACKGROUNDS[scene.background], np.uint8)
  out = [("true " + example.edit.kind, shapes.render(true)), ("unedited", shapes.render(scene)),
         ("emptied", background)]
  for kind in shapes.EDIT_KINDS:
    edits = shapes.possible_edits(scene, kind, held_out=True)
    for i in rng.permutation(len(edits))[:per_kind]:
      edited = shapes.apply_edit(scene, edits[i])
      if edited != true:
        out.append((kind, shapes.render(edited)))
  return out


def diagnose(count: int, per_kind: int, batch: int = 128):
  paths = shapes_models.paths()
  world = World(paths["probe"], paths["clip"])
  vae = weights.load_vae(os.path.join(shapes_models.ROOT, "vae"), subfolder=None)  # shared
  round_trip = jax.jit(lambda x: vae.decode(vae.encode(x).mode()))
  rng = np.random.default_rng(0)
  examples = list(shapes.examples("test", count, 0))[:count]
  per_turn = [candidates(e, rng, per_kind) for e in examples]
  pictures = np.stack([picture for turn in per_turn for _, picture in turn])
  images = np.concatenate([np.asarray(round_trip(jnp.asarray(to_unit(pictures[i:i + batch]))))
                           for i in range(0, len(pictures), batch)])
  image_embeddings = world.image_embeddings(images)
  texts = world.text_embeddings([shapes.caption(e.scene) for e in examples]
                                + [shapes.caption(e.edited_scene) for e in examples])
  input_text, edited_text = texts[:count], texts[count:]
  rows, start = [], 0
  for i, (example, turn) in enumerate(zip(examples, per_turn)):
    embedded = image_embeddings[start:start + len(turn)]
    start += len(turn)
    similarity = np.array(losses.clip_direction_similarity(
        edited_image=embedded, input_image=np.repeat(embedded[1:2], len(turn), 0),
        edited_text=np.repeat(edited_text[i:i + 1], len(turn), 0),
        input_text=np.repeat(input_text[i:i + 1], len(turn), 0)))
    similarity[1] = 0.0  # the unedited scene: no image direction (cos of a zero vector)
    beaten_by = [label for label, s in zip([l for l, _ in turn][1:], similarity[1:])
                 if s >= similarity[0]]
    rows.append({"kind": example.edit.kind, "true": float(similarity[0]),
                 "rank": 1 + len(beaten_by), "candidates": len(turn), "beaten_by": beaten_by})
  return rows


def summarise(rows):
  table = []
  for kind in shapes.EDIT_KINDS + ("all",):
    chosen = [r for r in rows if kind in (r["kind"], "all")]
    if not chosen:
      continue
    beaten = collections.Counter(b for r in chosen for b in r["beaten_by"])
    table.append({"kind": kind, "turns": len(chosen),
                  "true_similarity": np.mean([r["true"] for r in chosen]),
                  "top1": np.mean([r["rank"] == 1 for r in chosen]),
                  "mean_rank": np.mean([r["rank"] for r in chosen]),
                  "candidates": np.mean([r["candidates"] for r in chosen]),
                  "beaten_by": ", ".join(f"{k} {v}" for k, v in beaten.most_common(4))})
  return table


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--count", type=int, default=200)
  parser.add_argument("--per-kind", type=int, default=4)
  args = parser.parse_args()
  table = summarise(diagnose(args.count, args.per_kind))
  print(f"the world CLIP's direction similarity, first {args.count} test turns, the shipped "
        "models (VAE round trip)")
  print("| edit kind | turns | true edit's similarity | true edit top-1 | mean rank | "
        "candidates | what beat it (count) |")
  print("|---|---|---|---|---|---|---|")
  for row in table:
    print(f"| {row['kind']} | {row['turns']} | {row['true_similarity']:.3f} | {row['top1']:.3f} "
          f"| {row['mean_rank']:.2f} | {row['candidates']:.1f} | {row['beaten_by']} |")


if __name__ == "__main__":
  main()
