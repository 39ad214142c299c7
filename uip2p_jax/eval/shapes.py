"""ShapesWorld evaluation (`uip2p eval shapes`): every test edit has a known answer, so edit
quality is a number.

For each test turn (single-turn protocol: the input is the turn's own true input scene) the
editor's output is read by the world's attribute probe into a label vector (background; per
grid cell: colour, shape, size or empty) and compared with the true edited scene's labels:

- **edit accuracy**: every label the edit changes (the attributes the instruction names: the
  recoloured object's colour, the reshaped object's shape, the background, the added or
  removed object's cell) reads as the true edited scene's;
- **preservation**: every other label reads as the true edited scene's (= the input's).

Both are per-example booleans, averaged; the identity editor scores 0 and 1 by construction, the
true edited image 1 and 1 (up to the probe's own errors, reported as `probe_accuracy` on the
true test images). Besides them: L1 / L2 to the true edited image, CLIP-I (output vs true
image) and CLIP-T (output vs edited caption) with the world's CLIP, per edit kind and for the
held-out phrasings and colour/shape combinations, a picture grid, CSV, summary JSON + Markdown.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from typing import Callable

import numpy as np
from PIL import Image

from uip2p_jax import storage
from uip2p_jax.data import shapes
from uip2p_jax.image_io import save_image_atomic

METRICS = ("edit_accuracy", "preservation", "l1", "l2", "clip_i", "clip_t")
GROUPS = ("all",) + tuple(f"kind:{k}" for k in shapes.EDIT_KINDS) + (
    "held_out_phrasing", "seen_phrasing", "held_out_combination", "seen_combination")
GRID_EXAMPLES = 12  # the first test turns, drawn as input | ours | ground truth


def load_test(data_dir: str, limit: int | None = None) -> list[dict]:
  """The test turns of a `uip2p data build shapes` folder (scenes_test.jsonl), first `limit`."""
  path = shapes.scenes_path(data_dir, "test")
  if not storage.isfile(path):
    raise FileNotFoundError(f"{data_dir}: no scenes_test.jsonl (expected a folder written by "
                            "`uip2p data build shapes --out DIR ...`)")
  rows = []
  with storage.open_file(path) as f:
    for number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
        row["scene"] = shapes.Scene.from_json(row["scene"])
        row["edited_scene"] = shapes.Scene.from_json(row["edited_scene"])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{number}: not a ShapesWorld test turn ({e})") from None
      rows.append(row)
      if limit is not None and len(rows) >= limit:
        break
  return rows


def score_labels(input_labels: np.ndarray, target_labels: np.ndarray,
                 predicted_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(edit correct, preserved) per example from (N, L) label arrays: the labels the edit changes
  must read as the target's, and all others too."""
  changed = input_labels != target_labels
  right = predicted_labels == target_labels
  edit_ok = np.all(right | ~changed, axis=1)
  preserved = np.all(right | changed, axis=1)
  return edit_ok, preserved


def group_masks(turns: list[dict]) -> dict[str, np.ndarray]:
  kinds = np.asarray([t["edit"]["kind"] for t in turns])
  phrasing = np.asarray([bool(t["held_out_phrasing"]) for t in turns])
  combination = np.asarray([bool(t["held_out_combination"]) for t in turns])
  masks = {"all": np.ones(len(turns), bool)}
  masks.update({f"kind:{k}": kinds == k for k in shapes.EDIT_KINDS})
  masks.update(held_out_phrasing=phrasing, seen_phrasing=~phrasing,
               held_out_combination=combination, seen_combination=~combination)
  return masks


@functools.cache
def _world_functions():
  """The probe's and CLIP's jitted calls, made once per process: every World (one per model
  evaluated in a process) reuses their compiled programs instead of tracing fresh lambdas."""
  from flax import nnx
  return (nnx.jit(lambda m, x: m.predict(x)), nnx.jit(lambda m, x: m.embed_images(x)),
          nnx.jit(lambda m, ids: m.embed_texts(ids)))


class World:
  """The world's evaluation models: the probe (reads labels) and the CLIP (CLIP-I / CLIP-T)."""

  def __init__(self, probe_dir: str, clip_dir: str):
    from uip2p_jax import weights
    from uip2p_jax.tokenizer import default_tokenizer
    self.probe = weights.load_probe(probe_dir)
    self.clip = weights.load_clip(clip_dir)
    self.tokenizer = default_tokenizer()
    self._labels, self._images, self._texts = _world_functions()

  def labels(self, images: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([np.asarray(self._labels(self.probe, images[i:i + batch]))
                           for i in range(0, len(images), batch)])

  def image_embeddings(self, images: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([np.asarray(self._images(self.clip, images[i:i + batch]))
                           for i in range(0, len(images), batch)])

  def text_embeddings(self, texts: list[str], batch: int = 100) -> np.ndarray:
    from uip2p_jax.tokenizer import tokenize
    return np.concatenate([np.asarray(self._texts(self.clip, tokenize(self.tokenizer,
                                                                      texts[i:i + batch])))
                           for i in range(0, len(texts), batch)])


def to_unit(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.astype(np.float32) * (2 / 255) - 1


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] as the 8-bit pictures that are saved and scored."""
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def evaluate(turns: list[dict], edit: Callable[[np.ndarray, list[dict]], np.ndarray],
             world: World, out_dir: str, label: str, settings: dict, batch_size: int = 50,
             roundtrip: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
  """Edits every turn (`edit(images in [-1, 1], turns) -> edited images in [-1, 1]`), scores
  them, writes OUT/edits/*.png, scores.csv, summary.json, summary.md and grid.png.
  `roundtrip` (images -> the model VAE's decode(encode(images))): also scores the true edited
  images after the round trip, the ceiling of any editor working in that latent space."""
  inputs = np.stack([shapes.render(t["scene"]) for t in turns])
  targets = np.stack([shapes.render(t["edited_scene"]) for t in turns])
  edited = []
  for start in range(0, len(turns), batch_size):
    chunk = turns[start:start + batch_size]
    edited.append(np.asarray(edit(to_unit(inputs[start:start + batch_size]), chunk)))
  edited = np.concatenate(edited)
  edited_uint8 = to_uint8(edited)
  storage.makedirs(os.path.join(out_dir, "edits"))
  for turn, image in zip(turns, edited_uint8):
    save_image_atomic(Image.fromarray(image), os.path.join(out_dir, "edits", f"{turn['id']}.png"))
  # Scored on the saved 8-bit pictures (what a user sees, and what a rerun reads back).
  output = to_unit(edited_uint8)
  input_labels = np.stack([shapes.scene_labels(t["scene"]) for t in turns])
  target_labels = np.stack([shapes.scene_labels(t["edited_scene"]) for t in turns])
  edit_ok, preserved = score_labels(input_labels, target_labels, world.labels(output))
  truth = to_unit(targets)
  # The probe on every distinct true scene of the test set (a turn's target is often the next
  # turn's input: counted once).
  distinct = {json.dumps(s.to_json(), sort_keys=True): s
              for t in turns for s in (t["scene"], t["edited_scene"])}
  scenes = list(distinct.values())
  read = world.labels(to_unit(np.stack([shapes.render(s) for s in scenes])))
  probe_accuracy = float(np.mean(np.all(
      read == np.stack([shapes.scene_labels(s) for s in scenes]), axis=1)))
  error = output - truth
  output_embeddings = world.image_embeddings(output)
  per_example = {
      "edit_accuracy": edit_ok.astype(np.float64), "preservation": preserved.astype(np.float64),
      "l1": np.mean(np.abs(error), axis=(1, 2, 3)) / 2,   # in [0, 1] pixel units
      "l2": np.mean(error ** 2, axis=(1, 2, 3)) / 4,
      "clip_i": np.sum(output_embeddings * world.image_embeddings(truth), -1),
      "clip_t": np.sum(output_embeddings * world.text_embeddings(
          [t["edited_caption"] for t in turns]), -1)}
  groups = {}
  for group, mask in group_masks(turns).items():
    groups[group] = {"count": int(mask.sum()), **{
        m: float(np.mean(v[mask])) if mask.any() else math.nan for m, v in per_example.items()}}
  summary = {"model": label, **{m: groups["all"][m] for m in METRICS},
             "count": len(turns), "probe_accuracy": probe_accuracy,
             "clip_retrieval": clip_retrieval(world, to_unit(inputs),
                                              [t["caption"] for t in turns]),
             "groups": groups, "settings": settings}
  if roundtrip is not None:
    decoded = np.concatenate([np.asarray(roundtrip(truth[i:i + batch_size]))
                              for i in range(0, len(truth), batch_size)])
    decoded = to_unit(to_uint8(decoded))
    ok, kept = score_labels(input_labels, target_labels, world.labels(decoded))
    summary["vae_ceiling"] = {"edit_accuracy": float(ok.mean()), "preservation": float(kept.mean())}
  with storage.open_file(os.path.join(out_dir, "scores.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "kind", "instruction", "held_out_phrasing", "held_out_combination",
                     *per_example])
    for i, t in enumerate(turns):
      writer.writerow([t["id"], t["edit"]["kind"], t["instruction"], t["held_out_phrasing"],
                       t["held_out_combination"],
                       *(f"{per_example[m][i]:.6g}" for m in per_example)])
  storage.write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
  storage.write_text_atomic(os.path.join(out_dir, "summary.md"),
                            f"# ShapesWorld test: {label}\n\n{markdown(summary)}")
  save_image_atomic(grid(inputs, edited_uint8, targets, turns), os.path.join(out_dir, "grid.png"))
  return summary


GROUNDED_KINDS = ("recolour", "reshape", "remove")  # the edits of one named object


def grounding_edits(turns: list[dict]) -> list[dict]:
  """For each test turn that edits one object of a scene with others: the turn's own edit, and
  the same edit (kind, new value, phrasing template) of another object of the scene where it
  applies. Each: id, instruction, scene, kind, named (the object the instruction names), others,
  value (the new colour / shape; None for a removal)."""
  edits = []
  for t in turns:
    kind = t["edit"]["kind"]
    scene = t["scene"]
    if kind not in GROUNDED_KINDS or len(scene.objects) < 2:
      continue
    target = scene.find(t["edit"]["target"])
    swapped = next(o for o in scene.objects if o != target)
    value = t["edit"].get("colour") or t["edit"].get("shape")
    for suffix, named in (("named", target), ("swapped", swapped)):
      edit = shapes.Edit.from_json({**t["edit"], "target": named.name})
      try:
        shapes.apply_edit(scene, edit)  # (the other object may have the value already)
      except ValueError:
        continue
      edits.append({"id": f"{t['id']}-{suffix}", "scene": scene, "kind": kind, "value": value,
                    "instruction": shapes.instruction(scene, edit, t["template"]),
                    "named": named, "others": [o for o in scene.objects if o != named]})
  return edits


def _shows_edit(labels: np.ndarray, input_labels: np.ndarray, obj, kind: str, value) -> bool:
  """Whether the probe's `labels` show the edit of `kind` (to `value`) at `obj`'s cell, where
  the input did not already: removed (empty), or recoloured / reshaped to the value."""
  attribute = {"remove": "colour", "recolour": "colour", "reshape": "shape"}[kind]
  position, wanted = shapes.cell_label(obj.row, obj.col, attribute,
                                       None if kind == "remove" else value)
  return bool(labels[position] == wanted and input_labels[position] != wanted)


def grounding(turns: list[dict], edit: Callable[[np.ndarray, list[dict]], np.ndarray],
              world: World, batch_size: int = 50) -> dict:
  """Does the object the instruction names decide which object is edited? Per kind of
  `GROUNDED_KINDS`, over `grounding_edits(turns)`: `named`, the share of edits that the probe
  reads at the named object; `others`, the share of the scenes' other objects that show the
  same edit (an editor that edits objects regardless of the instruction scores both alike; the
  true edits score 1 and 0, the identity 0 and 0)."""
  edits = grounding_edits(turns)
  result = {}
  if not edits:
    return result
  inputs = to_unit(np.stack([shapes.render(e["scene"]) for e in edits]))
  outputs = np.concatenate([np.asarray(edit(inputs[i:i + batch_size], edits[i:i + batch_size]))
                            for i in range(0, len(edits), batch_size)])
  outputs = to_unit(to_uint8(outputs))
  read = world.labels(outputs)
  for kind in GROUNDED_KINDS:
    named, others = [], []
    for e, labels in zip(edits, read):
      if e["kind"] != kind:
        continue
      input_labels = shapes.scene_labels(e["scene"])
      named.append(_shows_edit(labels, input_labels, e["named"], kind, e["value"]))
      others += [_shows_edit(labels, input_labels, o, kind, e["value"]) for o in e["others"]]
    if named:
      result[kind] = {"edits": len(named), "named": float(np.mean(named)),
                      "others": float(np.mean(others))}
  return result


def clip_retrieval(world: World, images: np.ndarray, captions: list[str]) -> float:
  """The world CLIP's zero-shot caption retrieval: the fraction of images whose most similar
  caption, among all distinct captions of the set, is their own."""
  distinct = sorted(set(captions))
  similarity = world.image_embeddings(images) @ world.text_embeddings(distinct).T
  own = np.asarray([distinct.index(c) for c in captions])
  return float(np.mean(np.argmax(similarity, axis=1) == own))


def markdown(summary: dict) -> str:
  """Per group: count and the metrics, as a Markdown table."""
  lines = ["| group | n | " + " | ".join(METRICS) + " |", "|---|---" + "|---" * len(METRICS) + "|"]
  for group in GROUPS:
    g = summary["groups"].get(group)
    if g and g["count"]:
      lines.append(f"| {group} | {g['count']} | " + " | ".join(f"{g[m]:.3f}" for m in METRICS)
                   + " |")
  text = "\n".join(lines) + ("\n\nprobe accuracy on the true test images (every label of a "
                             f"scene right): {summary['probe_accuracy']:.3f}; the world CLIP's "
                             f"caption retrieval (top-1 among the test captions): "
                             f"{summary['clip_retrieval']:.3f}\n")
  if "vae_ceiling" in summary:
    c = summary["vae_ceiling"]
    text += (f"the true edits through the model's VAE (the latent editors' ceiling): edit "
             f"accuracy {c['edit_accuracy']:.3f}, preservation {c['preservation']:.3f}\n")
  return text


def grid(inputs, edited, targets, turns, count: int = GRID_EXAMPLES, scale: int = 2) -> Image.Image:
  """input | ours | ground truth for the first `count` turns, the instruction above each row."""
  from PIL import ImageDraw
  count = min(count, len(turns))
  side, band = inputs.shape[1] * scale, 14
  sheet = Image.new("RGB", (3 * side, count * (side + band)), "white")
  draw = ImageDraw.Draw(sheet)
  for r in range(count):
    top = r * (side + band)
    draw.text((2, top + 1), turns[r]["instruction"][:60], fill="black")
    for c, image in enumerate((inputs[r], edited[r], targets[r])):
      sheet.paste(Image.fromarray(image).resize((side, side), Image.NEAREST),
                  (c * side, top + band))
  return sheet


def compare(summary_paths: list[str]) -> str:
  """Several `eval shapes` summaries as one Markdown table (overall and per edit kind).

  Summaries that share a `model` label (`eval shapes --label`) are replicates, e.g. one run per
  seed: they make one row, "label (n=K)", whose cells are the mean ± the sample standard
  deviation over the K runs."""
  by_label: dict[str, list[dict]] = {}
  for summary in map(_read_summary, summary_paths):
    by_label.setdefault(summary["model"], []).append(summary)
  header = ["model", *METRICS, *(f"edit acc. {k}" for k in shapes.EDIT_KINDS),
            "edit acc. held-out phrasing", "edit acc. held-out combination"]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for label, runs in by_label.items():
    columns = [[s[m] for s in runs] for m in METRICS]
    columns += [[s["groups"][group]["edit_accuracy"] for s in runs]
                for group in (*(f"kind:{k}" for k in shapes.EDIT_KINDS), "held_out_phrasing",
                              "held_out_combination")]
    name = label if len(runs) == 1 else f"{label} (n={len(runs)})"
    lines.append("| " + " | ".join([name, *map(_mean_and_spread, columns)]) + " |")
  return "\n".join(lines) + "\n"


def summary_value(summary: dict, key: str, group: str = "all") -> float:
  """A metric of one summary (of `group`: all, kind:recolour, held_out_phrasing, ...) or one
  of its settings (train_step, image_scale, text_scale, steps, ...)."""
  if key in METRICS:
    if group not in summary["groups"]:
      raise ValueError(f"group {group!r} is not in the summary (it has "
                     f"{sorted(summary['groups'])})")
    return float(summary["groups"][group][key])
  if key not in summary["settings"]:
    raise ValueError(f"{key!r} is neither a metric {METRICS} nor a setting of the run labelled "
                   f"{summary['model']!r} (its settings: {sorted(summary['settings'])})")
  return float(summary["settings"][key])


def plot(summary_paths: list[str], x: str, y: str, path: str, group: str = "all",
         annotate: str | None = None, title: str | None = None) -> dict[str, list[tuple]]:
  """`y` against `x` (metrics or settings, `summary_value`), one line per label; the runs of a
  label at the same x (seeds) are one point, their mean, with the sample sd as an error bar.
  Points are joined in the order of x; `annotate` labels each with a setting (e.g. image_scale
  on a preservation vs edit accuracy trade-off). Returns what it drew: {label: [(x, annotation,
  mean y, sd y, runs)]}."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points: dict[str, dict[tuple, list[float]]] = {}
  for summary in map(_read_summary, summary_paths):
    key = (summary_value(summary, x, group),
           summary_value(summary, annotate) if annotate else None)
    points.setdefault(summary["model"], {}).setdefault(key, []).append(
        summary_value(summary, y, group))
  figure, axes = plt.subplots(figsize=(6, 4.5), dpi=120)
  drawn = {}
  for label, by_x in points.items():
    keys = sorted(by_x)
    ys = [float(np.mean(by_x[k])) for k in keys]
    spread = [float(np.std(by_x[k], ddof=1)) if len(by_x[k]) > 1 else 0.0 for k in keys]
    replicates = max(len(v) for v in by_x.values())
    drawn[label] = [(*k, m, sd, len(by_x[k])) for k, m, sd in zip(keys, ys, spread)]
    axes.errorbar([k[0] for k in keys], ys, yerr=spread if replicates > 1 else None,
                  marker="o", capsize=3,
                  label=label if replicates == 1 else f"{label} (n={replicates})")
    if annotate:
      for (kx, ka), ky in zip(keys, ys):
        axes.annotate(f"{ka:g}", (kx, ky), fontsize=7, xytext=(3, 3), textcoords="offset points")
  axes.set_xlabel(x if group == "all" else f"{x} ({group})")
  axes.set_ylabel(y if group == "all" else f"{y} ({group})")
  axes.set_title(title or f"ShapesWorld: {y} vs {x}" + (f" (labels: {annotate})" if annotate
                                                         else ""), fontsize=9)
  from uip2p_jax.eval.curve import save_figure
  save_figure(figure, axes, path)
  return drawn


def _read_summary(path: str) -> dict:
  if storage.isdir(path):
    path = os.path.join(path, "summary.json")
  return json.loads(storage.read_text(path))


def _mean_and_spread(values: list[float]) -> str:
  """One value as is; replicates as mean ± sample standard deviation."""
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


__all__ = ["GROUPS", "METRICS", "World", "compare", "evaluate", "grid", "group_masks",
           "load_test", "markdown", "plot", "score_labels", "summary_value"]
