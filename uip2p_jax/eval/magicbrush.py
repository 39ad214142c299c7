"""The MagicBrush protocol: edit every test turn (single- and multi-turn), score, summarise.

Single-turn: every turn is edited from its own source image (the dataset's source for turn t is
the ground-truth output of turn t - 1). Multi-turn: turn 1 from the source, turn t from our own
edit of turn t - 1 (a turn whose previous edit is missing is skipped and reported, with its
session's later turns; never restarted from the dataset's source). Edited images are written as
they are made, so a re-run skips them (resume); out_dir/edits.json records the model and
settings that made them, and a resume with others is refused. Scores are recomputed from the
files. The summary reports the mean over all turns and, for
multi-turn, over final turns too, next to the paper's reference rows (docs/method.md, section 5).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from uip2p_jax import storage
from uip2p_jax.eval.metrics import MetricModels, magicbrush_metrics
from uip2p_jax.image_io import save_image_atomic

METRICS = ("l1", "l2", "clip_i", "dino", "clip_t")
# MagicBrush test, single turn (L1, L2, CLIP-I, DINO, CLIP-T), as the UIP2P paper reports them.
REFERENCE_ROWS = {
    "InstructPix2Pix (paper)": (0.1122, 0.0371, 0.8524, 0.7428, 0.2764),
    "HIVE (paper)": (0.1092, 0.0341, 0.8519, 0.7500, 0.2752),
    "UIP2P, IP2P data (paper)": (0.0722, 0.0193, 0.9243, 0.8876, 0.2944),
    "UIP2P, CC3M (paper)": (0.0680, 0.0183, 0.9262, 0.8924, 0.2966),
    "UIP2P, CC12M (paper)": (0.0619, 0.0174, 0.9318, 0.9039, 0.2964),
    "UIP2P ablation: Base (paper)": (0.117, 0.032, 0.878, 0.806, 0.309),
    "UIP2P ablation: +L_sim (paper)": (0.089, 0.024, 0.906, 0.872, 0.301),
    "UIP2P ablation: +L_attn (paper)": (0.062, 0.017, 0.932, 0.904, 0.296),
}


def load_turns(data_dir: str, limit: int | None = None) -> list[dict]:
  """Every test turn (decoded text, raw image bytes), sorted by (img_id, turn). `limit` keeps
  the first N *sessions* (all their turns, so multi-turn chains stay whole)."""
  from uip2p_jax.data import builders
  source, _ = builders.open_split(data_dir, "magicbrush")
  text = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  turns = []
  for i in range(len(source)):
    r = source[i]
    turns.append({"id": text(r["id"]), "img_id": text(r["img_id"]),
                  "turn": int(r["turn_index"]), "instruction": text(r["instruction"]),
                  "edited_caption": text(r["edited_caption"]), "image": r["image"],
                  "target_image": r["target_image"]})
  turns.sort(key=lambda t: (t["img_id"], t["turn"]))
  if limit:
    keep = sorted({t["img_id"] for t in turns})[:limit]
    turns = [t for t in turns if t["img_id"] in set(keep)]
  return turns


def _open(data: bytes) -> Image.Image:
  import io
  return Image.open(io.BytesIO(data)).convert("RGB")


def _read_image(path: str) -> Image.Image:
  """An edit written by run_edits (in out_dir, which may be in a bucket)."""
  with storage.open_file(path, "rb") as f:
    return _open(f.read())


EditFn = Callable[[list[Image.Image], list[str], list[int]], list[Image.Image]]


@dataclasses.dataclass
class EditsReport:
  made: int = 0      # edits made by this run
  on_disk: int = 0   # edits an earlier run made (kept)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (turn id, why)


def run_edits(turns: list[dict], edit: EditFn, out_dir: str, mode: str, batch_size: int,
              seed: int, progress: bool = True) -> EditsReport:
  """Edits every turn not yet on disk into out_dir/<mode>/<id>.png.

  Multi-turn: a turn whose previous turn's edit is missing (that turn is not in the data, or
  its own chain broke) is skipped with the reason, and so are its session's later turns; it is
  never restarted from the dataset's (ground-truth) source image."""
  folder = os.path.join(out_dir, mode)
  storage.makedirs(folder)
  path = lambda t: os.path.join(folder, f"{t['id']}.png")
  by_session: dict[str, dict[int, dict]] = {}
  for t in turns:
    by_session.setdefault(t["img_id"], {})[t["turn"]] = t
  first_turn = min((t["turn"] for t in turns), default=1)
  # One listing, not a request per turn in a bucket (where an empty folder does not exist).
  on_disk = set(storage.listdir(folder)) if storage.isdir(folder) else set()
  made = lambda t: f"{t['id']}.png" in on_disk
  pending = [t for t in turns if not made(t)]
  report = EditsReport(on_disk=len(turns) - len(pending))
  broken: dict[str, str] = {}  # turn id -> why its chain is broken

  def chain_break(t: dict) -> str:
    """Why multi-turn turn t cannot start from our previous edit ("" when it can)."""
    if mode != "multi" or t["turn"] == first_turn:
      return ""
    previous = by_session[t["img_id"]].get(t["turn"] - 1)
    if previous is None:
      return f"turn {t['turn'] - 1} of session {t['img_id']} is not in the data"
    if previous["id"] in broken:
      return broken[previous["id"]]
    if not made(previous):
      return f"the edit of turn {previous['id']} is missing"
    return ""

  from tqdm import tqdm
  bar = tqdm(total=len(pending), desc=f"magicbrush {mode}", unit="edit", disable=not progress)
  # Waves by turn index: in multi-turn mode, turn t needs turn t - 1's output first.
  for turn_index in sorted({t["turn"] for t in pending}):
    wave = []
    for t in (t for t in pending if t["turn"] == turn_index):
      why = chain_break(t)
      if why:
        broken[t["id"]] = why
        report.skipped.append((t["id"], why))
        bar.update(1)
      else:
        wave.append(t)
    for start in range(0, len(wave), batch_size):
      chunk = wave[start:start + batch_size]
      inputs = []
      for t in chunk:
        if mode == "multi" and t["turn"] != first_turn:
          inputs.append(_read_image(path(by_session[t["img_id"]][t["turn"] - 1])))
        else:
          inputs.append(_open(t["image"]))
      # Per-turn seeds (stable across runs and batch sizes): a resumed run edits the same way.
      seeds = [(seed + zlib.crc32(t["id"].encode())) % 2 ** 31 for t in chunk]
      for t, image in zip(chunk, edit(inputs, [t["instruction"] for t in chunk], seeds)):
        save_image_atomic(image, path(t))  # a killed run never leaves a half-written image
        on_disk.add(f"{t['id']}.png")
        report.made += 1
        bar.update(1)
  bar.close()
  return report


EDIT_SETTINGS_FILE = "edits.json"


def check_edit_settings(out_dir: str, settings: dict) -> None:
  """Refuses (ValueError) an output folder whose edits were made with other settings (model,
  steps, scales, resolution, ...), as recorded in out_dir/edits.json: a resumed run would mix
  two models' edits in one score. A folder with edits but no record is refused too."""
  record = os.path.join(out_dir, EDIT_SETTINGS_FILE)
  if storage.exists(record):
    made_with = json.loads(storage.read_text(record))
    differ = {k: v for k, v in settings.items() if made_with.get(k) != v}
    if differ:
      then = ", ".join(f"{k} {made_with.get(k)!r}" for k in differ)
      now = ", ".join(f"{k} {v!r}" for k, v in differ.items())
      raise ValueError(f"{out_dir}: its edits were made with {then}, this run asks for {now}; "
                       "give another --out (or remove the folder to redo its edits)")
    return
  for mode in ("single", "multi"):
    folder = os.path.join(out_dir, mode)
    if storage.isdir(folder) and any(n.endswith(".png") for n in storage.listdir(folder)):
      raise ValueError(f"{out_dir}: holds edits ({folder}) but no {EDIT_SETTINGS_FILE} saying "
                       "which model and settings made them; give another --out (or remove "
                       "the folder to redo its edits)")


def record_edit_settings(out_dir: str, settings: dict) -> None:
  """Writes out_dir/edits.json (after `check_edit_settings`), before the first edit."""
  storage.makedirs(out_dir)
  storage.write_text_atomic(os.path.join(out_dir, EDIT_SETTINGS_FILE),
                            json.dumps(settings, indent=2))


def score(turns: list[dict], out_dir: str, mode: str, models: MetricModels,
          batch_size: int = 16) -> list[dict]:
  """Per-turn rows: id, img_id, turn, instruction and every metric (NaN when unavailable)."""
  rows = []
  folder = os.path.join(out_dir, mode)
  for start in range(0, len(turns), batch_size):
    chunk = turns[start:start + batch_size]
    edited = [_read_image(os.path.join(folder, f"{t['id']}.png")) for t in chunk]
    targets = [_open(t["target_image"]) for t in chunk]
    captions = [t["edited_caption"] for t in chunk]
    values = magicbrush_metrics(models, edited, targets, captions)
    for i, t in enumerate(chunk):
      rows.append({"id": t["id"], "img_id": t["img_id"], "turn": t["turn"],
                   "instruction": t["instruction"],
                   **{m: float(values[m][i]) if m in values else math.nan for m in METRICS}})
  return rows


TURN_FIELDS = ("id", "img_id", "turn", "instruction", *METRICS)


def write_csv(rows: list[dict], path: str, fields=TURN_FIELDS) -> None:
  """Rows as CSV with columns `fields` (default: a turn's scores; the curve passes its own)."""
  with storage.open_file(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
  with storage.open_file(path, newline="") as f:
    return [{**r, "turn": int(r["turn"]), **{m: float(r[m]) for m in METRICS}}
            for r in csv.DictReader(f)]


def summarise(rows_by_mode: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
  """{setting: {metric: mean}}: "single", "multi (all turns)", "multi (final turn)"."""
  summary = {}
  mean = lambda rows, m: float(np.nanmean([r[m] for r in rows])) if rows and not all(
      math.isnan(r[m]) for r in rows) else math.nan
  for mode, rows in rows_by_mode.items():
    if mode == "single":
      summary["single"] = {m: mean(rows, m) for m in METRICS} | {"n": len(rows)}
    else:
      last = {}
      for r in rows:
        if r["turn"] >= last.get(r["img_id"], r)["turn"]:
          last[r["img_id"]] = r
      summary["multi (all turns)"] = {m: mean(rows, m) for m in METRICS} | {"n": len(rows)}
      finals = list(last.values())
      summary["multi (final turn)"] = {m: mean(finals, m) for m in METRICS} | {"n": len(finals)}
  return summary


def markdown_table(summary: dict[str, dict[str, float]], label: str,
                   expected: dict[str, float] | None = None) -> str:
  """The paper's table format, our rows first, then the reference rows."""
  fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
  lines = ["| model | setting | n | L1 ↓ | L2 ↓ | CLIP-I ↑ | DINO ↑ | CLIP-T ↑ |",
           "|---|---|---|---|---|---|---|---|"]
  for setting, values in summary.items():
    lines.append(f"| {label} | {setting} | {values['n']} | "
                 + " | ".join(fmt(values[m]) for m in METRICS) + " |")
  if expected:
    lines.append(f"| expected by the config | single | | "
                 + " | ".join(fmt(expected.get(m)) for m in METRICS) + " |")
  for name, values in REFERENCE_ROWS.items():
    lines.append(f"| {name} | single | | " + " | ".join(fmt(v) for v in values) + " |")
  return "\n".join(lines) + "\n"


def write_summary(summary: dict, out_dir: str, label: str, expected: dict | None = None) -> None:
  storage.write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(
      {"model": label, "settings": summary, "expected": expected or {}}, indent=2))
  storage.write_text_atomic(os.path.join(out_dir, "summary.md"),
                            f"# MagicBrush test: {label}\n\n"
                            + markdown_table(summary, label, expected))


def compare(run_a: str, run_b: str) -> str:
  """Two runs' summary tables side by side with differences (B - A), as Markdown."""
  load = lambda run: json.loads(storage.read_text(os.path.join(run, "summary.json")))
  a, b = load(run_a), load(run_b)
  lines = [f"| setting | metric | A: {a['model']} | B: {b['model']} | B - A |",
           "|---|---|---|---|---|"]
  for setting in [s for s in a["settings"] if s in b["settings"]]:
    for m in METRICS:
      va, vb = a["settings"][setting][m], b["settings"][setting][m]
      diff = vb - va if not (math.isnan(va) or math.isnan(vb)) else math.nan
      lines.append(f"| {setting} | {m} | {va:.4f} | {vb:.4f} | {diff:+.4f} |")
  only = sorted(set(a["settings"]) ^ set(b["settings"]))
  if only:
    lines.append(f"\n(settings in only one run: {', '.join(only)})")
  return "\n".join(lines) + "\n"


__all__ = ["EDIT_SETTINGS_FILE", "METRICS", "REFERENCE_ROWS", "EditsReport",
           "check_edit_settings", "compare", "load_turns", "markdown_table", "read_csv",
           "record_edit_settings", "run_edits", "score", "summarise", "write_csv",
           "write_summary"]
