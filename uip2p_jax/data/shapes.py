"""ShapesWorld: procedural scenes of 1-3 coloured shapes where the right answer to every edit is
known exactly (issue 14, "The world").

**Scenes.** A :class:`Scene` is a background colour and 1-3 :class:`SceneObject` s, each a colour,
a shape and a size in its own cell of a 3x3 grid (so objects never overlap and "top left",
"center", ... are well defined). Object colours and background colours are disjoint sets, and
colour + shape is unique within a scene, so "the red circle" names one object. ``render`` draws a
scene at 4x the resolution and box-filters it down (antialiased); it is a pure function of the
scene graph.

**Captions** list the objects in reading order (by cell: top row first, left to right):
``"a large red circle in the top left corner, a small blue square in the center and a large green
triangle at the bottom on a gray background"``. The caption determines the scene graph.

**Edits** (:class:`Edit`, data, JSON-able): ``recolour`` ("make the red circle blue"),
``reshape`` ("turn the red circle into a square"), ``background`` ("make the background white"),
``add`` ("add a small blue square in the top left corner"), ``remove`` ("remove the red
circle"). ``apply_edit`` gives the edited scene; ``inverse_edit`` gives the edit that maps it back
(the reverse instruction is that edit's phrasing). Each kind has ``len(TEMPLATES[kind])``
phrasings; instruction text is lower case and spells "color" as CLIP's (American) captions do.

**Held out of training** (``split="train"`` never contains them; the test split does):

* the last phrasing of every edit kind (``TEMPLATES[kind][-1]``), for forward and reverse
  instructions: half of the test instructions use it;
* the colour/shape combinations ``HELD_OUT_COMBINATIONS`` ("purple triangle", "orange square"):
  no training scene, edited scene or instruction contains one. Test scenes draw objects from
  all combinations; where some test edits would make one (recolour, reshape or add into it), the
  edit is drawn among those with probability ``TEST_HELD_OUT_EDIT``.

**Records.** ``examples("train", n, seed)`` yields n single edits; ``examples("test", m, seed)``
m edits grouped in sessions of 1-3 turns (turn t edits turn t-1's edited scene, as in MagicBrush).
Example i depends only on (seed, split, i) for train and (seed, session) for test. ``build``
writes, with the TFDS builders, ``captions`` and ``ip2p`` train records and ``magicbrush`` test
turns under one folder, and the scene graphs as ``scenes_{train,test}.jsonl`` beside them.
The same seed gives byte-identical records (images, texts, order) and scene files; the
array_record files themselves differ between runs, as TFDS serialises each example's feature map
in an order that varies from process to process. Captions name left and right: train with the
loader's ``flip=False``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw

RESOLUTION = 64      # the world VAE (factor 4) -> 16x16 latents
SUPERSAMPLE = 4      # drawn at 4x, box-filtered down
GRID = 3

# Far apart in hue or lightness; object and background colours are disjoint sets.
COLOURS = {"red": (215, 35, 35), "green": (30, 160, 50), "blue": (35, 75, 225),
           "yellow": (245, 205, 20), "purple": (135, 45, 185), "orange": (250, 130, 15)}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (248, 248, 248), "black": (20, 20, 20),
               "beige": (205, 185, 150)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.5, "large": 0.85}  # side of the shape's box as a fraction of its cell
# Cell (row, col) -> the phrase placing an object there, in captions and "add" instructions.
POSITIONS = {(0, 0): "in the top left corner", (0, 1): "at the top",
             (0, 2): "in the top right corner", (1, 0): "on the left", (1, 1): "in the center",
             (1, 2): "on the right", (2, 0): "in the bottom left corner", (2, 1): "at the bottom",
             (2, 2): "in the bottom right corner"}
MAX_OBJECTS = 3

EDIT_KINDS = ("recolour", "reshape", "background", "add", "remove")
# Instruction phrasings per kind; the last of each is held out of training. Fields: {target}
# "red circle", {target_colour} "red", {colour} new colour or background, {shape} new shape,
# {added} "a small blue square", {where} a POSITIONS phrase.
TEMPLATES = {
    "recolour": ("make the {target} {colour}", "change the color of the {target} to {colour}",
                 "turn the {target} {colour}", "paint the {target} {colour}",
                 "recolor the {target} {colour}"),
    "reshape": ("turn the {target} into a {shape}", "make the {target} a {shape}",
                "change the {target} to a {shape}",
                "replace the {target} with a {target_colour} {shape}",
                "reshape the {target} into a {shape}"),
    "background": ("make the background {colour}", "change the background to {colour}",
                   "turn the background {colour}", "give it a {colour} background",
                   "set the background to {colour}"),
    "add": ("add {added} {where}", "put {added} {where}", "place {added} {where}",
            "draw {added} {where}", "insert {added} {where}"),
    "remove": ("remove the {target}", "delete the {target}", "take away the {target}",
               "get rid of the {target}", "erase the {target}"),
}
HELD_OUT_COMBINATIONS = frozenset({("purple", "triangle"), ("orange", "square")})
SPLITS = ("train", "test")
TEST_HELD_OUT_PHRASING = 0.5   # fraction of test instructions using the held-out phrasing
TEST_HELD_OUT_EDIT = 0.25      # chance a test edit is drawn among those making a held-out combo
MAX_TURNS = 3                  # test sessions have 1..MAX_TURNS turns


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
  row: int      # 0 top .. GRID-1 bottom
  col: int      # 0 left .. GRID-1 right
  colour: str   # a COLOURS key
  shape: str    # a SHAPES entry
  size: str     # a SIZES key

  @property
  def name(self) -> str:
    """How instructions refer to it: "red circle" (unique within a scene)."""
    return f"{self.colour} {self.shape}"

  @property
  def phrase(self) -> str:
    """"a large red circle"."""
    return f"a {self.size} {self.colour} {self.shape}"

  @property
  def where(self) -> str:
    return POSITIONS[(self.row, self.col)]


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background and 1..MAX_OBJECTS objects, kept sorted by cell (the caption's order)."""
  background: str
  objects: tuple[SceneObject, ...]

  def __post_init__(self):
    object.__setattr__(self, "objects", tuple(sorted(self.objects)))
    if self.background not in BACKGROUNDS:
      raise ValueError(f"unknown background {self.background!r}; expected one of "
                       f"{sorted(BACKGROUNDS)}")
    if not 1 <= len(self.objects) <= MAX_OBJECTS:
      raise ValueError(f"a scene holds 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
    for o in self.objects:
      if o.colour not in COLOURS or o.shape not in SHAPES or o.size not in SIZES:
        raise ValueError(f"unknown colour, shape or size in {o}; expected colours "
                         f"{sorted(COLOURS)}, shapes {SHAPES}, sizes {sorted(SIZES)}")
      if not (0 <= o.row < GRID and 0 <= o.col < GRID):
        raise ValueError(f"cell ({o.row}, {o.col}) of {o.name} is outside the {GRID}x{GRID} grid")
    cells = [(o.row, o.col) for o in self.objects]
    names = [o.name for o in self.objects]
    if len(set(cells)) < len(cells) or len(set(names)) < len(names):
      raise ValueError(f"objects must have distinct cells and distinct colour + shape: {names} "
                       f"at {cells}")

  def find(self, name: str) -> SceneObject:
    for o in self.objects:
      if o.name == name:
        return o
    raise ValueError(f"no {name} in the scene ({caption(self)})")

  def to_json(self) -> dict:
    return {"background": self.background,
            "objects": [dataclasses.asdict(o) for o in self.objects]}

  @classmethod
  def from_json(cls, data: dict) -> "Scene":
    return cls(data["background"], tuple(SceneObject(**o) for o in data["objects"]))


def caption(scene: Scene) -> str:
  """'a large red circle in the top left corner and a small blue square in the center on a gray
  background': objects in reading order, joined by ', ' and a final ' and '."""
  parts = [f"{o.phrase} {o.where}" for o in scene.objects]
  listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return f"{listed} on a {scene.background} background"


def has_held_out_combination(scene: Scene) -> bool:
  return any((o.colour, o.shape) in HELD_OUT_COMBINATIONS for o in scene.objects)


# ---------------------------------------------------------------------------------------------
# Rendering.

def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
  """(resolution, resolution, 3) uint8: drawn at SUPERSAMPLE x, then box-filtered down."""
  side = resolution * SUPERSAMPLE
  canvas = PIL.Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
  draw = PIL.ImageDraw.Draw(canvas)
  cell = side / GRID
  for o in scene.objects:
    cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
    half = SIZES[o.size] * cell / 2
    box = (round(cx - half), round(cy - half), round(cx + half) - 1, round(cy + half) - 1)
    fill = COLOURS[o.colour]
    if o.shape == "circle":
      draw.ellipse(box, fill=fill)
    elif o.shape == "square":
      draw.rectangle(box, fill=fill)
    else:  # an upward triangle filling the box
      draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
  return np.asarray(canvas.reduce(SUPERSAMPLE))


def png_bytes(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Edits.

@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit as data. Fields a kind does not use stay None."""
  kind: str                          # an EDIT_KINDS entry
  target: str | None = None          # recolour / reshape / remove: the object's name
  colour: str | None = None          # recolour: new colour; background: new background
  shape: str | None = None           # reshape: new shape
  added: SceneObject | None = None   # add: the object added

  def to_json(self) -> dict:
    data = dataclasses.asdict(self)
    return {k: v for k, v in data.items() if v is not None}

  @classmethod
  def from_json(cls, data: dict) -> "Edit":
    added = data.get("added")
    return cls(**{**data, "added": SceneObject(**added) if added else None})


def apply_edit(scene: Scene, edit: Edit) -> Scene:
  """The edited scene; ValueError when the edit does not apply (no such object, a clash)."""
  objects = list(scene.objects)
  if edit.kind == "background":
    if edit.colour == scene.background:
      raise ValueError(f"the background is already {edit.colour}")
    return Scene(edit.colour, scene.objects)
  if edit.kind == "add":
    return Scene(scene.background, tuple(objects) + (edit.added,))
  target = scene.find(edit.target)
  objects.remove(target)
  if edit.kind == "remove":
    return Scene(scene.background, tuple(objects))
  if edit.kind == "recolour":
    changed = dataclasses.replace(target, colour=edit.colour)
  elif edit.kind == "reshape":
    changed = dataclasses.replace(target, shape=edit.shape)
  else:
    raise ValueError(f"unknown edit kind {edit.kind!r}; expected one of {EDIT_KINDS}")
  if changed == target:
    raise ValueError(f"{edit} changes nothing")
  return Scene(scene.background, tuple(objects) + (changed,))


def inverse_edit(scene: Scene, edit: Edit) -> Edit:
  """The edit that maps ``apply_edit(scene, edit)`` back to ``scene``."""
  if edit.kind == "background":
    return Edit("background", colour=scene.background)
  if edit.kind == "add":
    return Edit("remove", target=edit.added.name)
  target = scene.find(edit.target)
  if edit.kind == "remove":
    return Edit("add", added=target)
  if edit.kind == "recolour":
    return Edit("recolour", target=f"{edit.colour} {target.shape}", colour=target.colour)
  return Edit("reshape", target=f"{target.colour} {edit.shape}", shape=target.shape)


def instruction(scene: Scene, edit: Edit, template: int) -> str:
  """``TEMPLATES[edit.kind][template]`` filled in for ``edit`` applied to ``scene``."""
  fields = {"colour": edit.colour, "shape": edit.shape}
  if edit.target:
    fields.update(target=edit.target, target_colour=scene.find(edit.target).colour)
  if edit.added:
    fields.update(added=edit.added.phrase, where=edit.added.where)
  return TEMPLATES[edit.kind][template].format(**fields)


def _allowed(colour: str, shape: str, held_out: bool) -> bool:
  return held_out or (colour, shape) not in HELD_OUT_COMBINATIONS


def possible_edits(scene: Scene, kind: str, held_out: bool) -> list[Edit]:
  """Every edit of ``kind`` that applies to ``scene`` (in a fixed order); without ``held_out``,
  none that makes a held-out colour/shape combination."""
  names = {o.name for o in scene.objects}
  edits = []
  if kind == "background":
    edits = [Edit("background", colour=c) for c in BACKGROUNDS if c != scene.background]
  elif kind == "recolour":
    edits = [Edit("recolour", target=o.name, colour=c) for o in scene.objects for c in COLOURS
             if f"{c} {o.shape}" not in names and _allowed(c, o.shape, held_out)]
  elif kind == "reshape":
    edits = [Edit("reshape", target=o.name, shape=s) for o in scene.objects for s in SHAPES
             if f"{o.colour} {s}" not in names and _allowed(o.colour, s, held_out)]
  elif kind == "remove" and len(scene.objects) > 1:
    edits = [Edit("remove", target=o.name) for o in scene.objects]
  elif kind == "add" and len(scene.objects) < MAX_OBJECTS:
    used = {(o.row, o.col) for o in scene.objects}
    edits = [Edit("add", added=SceneObject(r, c, colour, shape, size))
             for r in range(GRID) for c in range(GRID) if (r, c) not in used
             for colour in COLOURS for shape in SHAPES for size in SIZES
             if f"{colour} {shape}" not in names and _allowed(colour, shape, held_out)]
  return edits


# ---------------------------------------------------------------------------------------------
# Sampling and splits.

def sample_scene(rng: np.random.Generator, num_objects: int, held_out: bool) -> Scene:
  """A uniformly drawn scene of ``num_objects`` objects (held-out combinations only if
  ``held_out``)."""
  combos = [(c, s) for c in COLOURS for s in SHAPES if _allowed(c, s, held_out)]
  cells = rng.choice(GRID * GRID, num_objects, replace=False)
  picks = rng.choice(len(combos), num_objects, replace=False)
  sizes = rng.choice(len(SIZES), num_objects)
  objects = tuple(SceneObject(int(cell) // GRID, int(cell) % GRID, *combos[pick],
                              list(SIZES)[size]) for cell, pick, size in zip(cells, picks, sizes))
  return Scene(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects)


@dataclasses.dataclass(frozen=True)
class Example:
  """One edit of one scene, with everything a record or an evaluator needs."""
  id: str
  split: str
  scene: Scene
  edit: Edit
  edited_scene: Scene
  inverse: Edit                 # apply_edit(edited_scene, inverse) == scene
  template: int                 # TEMPLATES[edit.kind] index of the instruction
  reverse_template: int         # TEMPLATES[inverse.kind] index of the reverse instruction
  img_id: str = ""              # test: the session; turn t edits turn t-1's edited scene
  turn: int = 1

  @property
  def instruction(self) -> str:
    return instruction(self.scene, self.edit, self.template)

  @property
  def reverse_instruction(self) -> str:
    return instruction(self.edited_scene, self.inverse, self.reverse_template)

  @property
  def held_out_phrasing(self) -> bool:
    return self.template == len(TEMPLATES[self.edit.kind]) - 1

  @property
  def held_out_combination(self) -> bool:
    return has_held_out_combination(self.scene) or has_held_out_combination(self.edited_scene)

  def to_json(self) -> dict:
    row = {"id": self.id, "split": self.split}
    if self.split == "test":
      row.update(img_id=self.img_id, turn=self.turn)
    row.update(scene=self.scene.to_json(), caption=caption(self.scene),
               edit=self.edit.to_json(), instruction=self.instruction,
               edited_scene=self.edited_scene.to_json(),
               edited_caption=caption(self.edited_scene), inverse_edit=self.inverse.to_json(),
               reverse_instruction=self.reverse_instruction, template=self.template,
               held_out_phrasing=self.held_out_phrasing,
               held_out_combination=self.held_out_combination)
    return row


def _template(rng: np.random.Generator, kind: str, split: str) -> int:
  seen = len(TEMPLATES[kind]) - 1   # the last phrasing is held out of training
  if split == "test" and rng.random() < TEST_HELD_OUT_PHRASING:
    return seen
  return int(rng.integers(seen))


def _example(rng: np.random.Generator, scene: Scene, edit: Edit, split: str, **ids) -> Example:
  edited = apply_edit(scene, edit)
  inverse = inverse_edit(scene, edit)
  return Example(split=split, scene=scene, edit=edit, edited_scene=edited, inverse=inverse,
                 template=_template(rng, edit.kind, split),
                 reverse_template=_template(rng, inverse.kind, split), **ids)


def _train_example(seed: int, index: int, kinds: tuple[str, ...] = EDIT_KINDS) -> Example:
  rng = np.random.default_rng([seed, 0, index])
  kind = kinds[rng.integers(len(kinds))]
  low, high = {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(kind, (1, MAX_OBJECTS))
  while True:  # reshape can be impossible (e.g. red circle, red square, red triangle): redraw
    scene = sample_scene(rng, int(rng.integers(low, high + 1)), held_out=False)
    edits = possible_edits(scene, kind, held_out=False)
    if edits:
      break
  edit = edits[rng.integers(len(edits))]
  return _example(rng, scene, edit, "train", id=f"shapes-train-{index:06d}")


def _test_session(seed: int, session: int, turns: int) -> list[Example]:
  rng = np.random.default_rng([seed, 1, session])
  img_id = f"shapes-test-{session:05d}"
  kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]  # turn 1's kind first: kinds stay balanced
  low, high = {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(kind, (1, MAX_OBJECTS))
  scene = sample_scene(rng, int(rng.integers(low, high + 1)), held_out=True)
  out = []
  for turn in range(1, turns + 1):
    edits = possible_edits(scene, kind, held_out=True)
    if not edits:  # later turns, or a reshape with no free shape: any kind that applies
      by_kind = {k: possible_edits(scene, k, held_out=True) for k in EDIT_KINDS}
      kinds = [k for k in EDIT_KINDS if by_kind[k]]
      edits = by_kind[kinds[rng.integers(len(kinds))]]
    making_held_out = [e for e in edits
                       if has_held_out_combination(apply_edit(scene, e))
                       and not has_held_out_combination(scene)]
    if making_held_out and rng.random() < TEST_HELD_OUT_EDIT:
      edits = making_held_out
    example = _example(rng, scene, edits[rng.integers(len(edits))], "test",
                       id=f"{img_id}-{turn}", img_id=img_id, turn=turn)
    out.append(example)
    scene = example.edited_scene
    kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]
  return out


def check_kinds(kinds) -> tuple[str, ...]:
  kinds = tuple(kinds)
  unknown = sorted(set(kinds) - set(EDIT_KINDS))
  if not kinds or unknown:
    raise ValueError(f"edit kinds {list(kinds)}: expected a non-empty subset of {EDIT_KINDS}")
  return tuple(k for k in EDIT_KINDS if k in kinds)


def examples(split: str, count: int, seed: int,
             kinds: tuple[str, ...] = EDIT_KINDS) -> Iterator[Example]:
  """``count`` examples of ``split``. Train example i depends on (seed, i, kinds) only, its edit
  kind drawn among ``kinds`` (all by default; e.g. only "recolour" for a model supervised on one
  kind); test turns (every kind) come in sessions of 1..MAX_TURNS (the last session cut to make
  ``count``)."""
  if split == "train":
    kinds = check_kinds(kinds)
    for index in range(count):
      yield _train_example(seed, index, kinds)
    return
  if split != "test":
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  session, left = 0, count
  while left > 0:
    turns = int(np.random.default_rng([seed, 2, session]).integers(1, MAX_TURNS + 1))
    yield from _test_session(seed, session, min(turns, left))
    left -= min(turns, left)
    session += 1


# ---------------------------------------------------------------------------------------------
# The world at large (what its pretrained models see) and attribute labels (the probe's targets).

def world_scene(seed: int, index: int) -> Scene:
  """Scene ``index`` of the world the pretrained models (VAE, CLIP, text-to-image prior, probe)
  learn from: 1..MAX_OBJECTS objects from every colour/shape combination, held-out ones included
  (as SD and CLIP have seen the whole world; only the editing data holds combinations out)."""
  rng = np.random.default_rng([seed, 3, index])
  return sample_scene(rng, int(rng.integers(1, MAX_OBJECTS + 1)), held_out=True)


# The label vector: the background, then for each grid cell in reading order its object's
# colour, shape and size, each with class 0 = "no object in this cell".
_CELL_ATTRIBUTES = (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", tuple(SIZES)))
LABEL_NAMES = ("background",) + tuple(f"cell{r}{c}.{name}" for r in range(GRID)
                                      for c in range(GRID) for name, _ in _CELL_ATTRIBUTES)
LABEL_CLASSES = (len(BACKGROUNDS),) + tuple(1 + len(values) for r in range(GRID)
                                            for c in range(GRID) for _, values in _CELL_ATTRIBUTES)


def cell_label(row: int, col: int, attribute: str, value: str | None) -> tuple[int, int]:
  """(position in the label vector, class) of grid cell (row, col)'s `attribute` ("colour",
  "shape" or "size") reading `value`; None: the cell is empty (class 0)."""
  values = dict(_CELL_ATTRIBUTES)[attribute]
  return (LABEL_NAMES.index(f"cell{row}{col}.{attribute}"),
          0 if value is None else 1 + values.index(value))


def scene_labels(scene: Scene) -> np.ndarray:
  """(len(LABEL_NAMES),) int32: what the probe reads off a rendered scene."""
  labels = np.zeros(len(LABEL_NAMES), np.int32)
  labels[0] = list(BACKGROUNDS).index(scene.background)
  for o in scene.objects:
    for name, _ in _CELL_ATTRIBUTES:
      position, value = cell_label(o.row, o.col, name, getattr(o, name))
      labels[position] = value
  return labels


def describe_labels(labels: np.ndarray) -> str:
  """What a label vector (the probe's reading) says, in caption words: scene_labels's inverse,
  'a large blue circle in the top left corner and ... on a gray background' (a cell whose
  attributes disagree on being empty shows '?' for the missing ones)."""
  parts = []
  for (row, col), where in POSITIONS.items():
    read = {}
    for name, values in _CELL_ATTRIBUTES:
      value = int(labels[cell_label(row, col, name, None)[0]])
      read[name] = values[value - 1] if value else None
    if any(read.values()):
      shown = {k: v or "?" for k, v in read.items()}
      parts.append(f"a {shown['size']} {shown['colour']} {shown['shape']} {where}")
  listed = ("nothing" if not parts else parts[0] if len(parts) == 1
            else ", ".join(parts[:-1]) + " and " + parts[-1])
  return f"{listed} on a {list(BACKGROUNDS)[int(labels[0])]} background"


# ---------------------------------------------------------------------------------------------
# Records and the build.

KIND_SPLITS = {"captions": "train", "ip2p": "train", "magicbrush": "test"}


def records(kind: str, count: int, seed: int, resolution: int = RESOLUTION,
            edit_kinds: tuple[str, ...] = EDIT_KINDS):
  """The ``(id, where, fields)`` records of a dataset kind (``builders.build``'s source)."""
  split = KIND_SPLITS[kind]
  for index, ex in enumerate(examples(split, count, seed, edit_kinds)):
    where = f"shapes(seed={seed}):{split} {index}"
    fields = {"image": png_bytes(render(ex.scene, resolution)),
              "input_caption": caption(ex.scene), "instruction": ex.instruction,
              "edited_caption": caption(ex.edited_scene)}
    edited_image = lambda: png_bytes(render(ex.edited_scene, resolution))
    if kind == "captions":
      fields["reverse_instruction"] = ex.reverse_instruction
    elif kind == "ip2p":
      fields.update(edited_image=edited_image(), reverse_instruction=ex.reverse_instruction)
    else:
      fields.update(target_image=edited_image(), img_id=ex.img_id, turn_index=ex.turn)
    yield ex.id, where, fields


def scenes_path(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f"scenes_{split}.jsonl")


def build(data_dir: str, train: int, test: int, seed: int = 0, overwrite: bool = False,
          resolution: int = RESOLUTION, edit_kinds: tuple[str, ...] = EDIT_KINDS) -> dict:
  """Writes the captions + ip2p train records (edits of ``edit_kinds`` only), the magicbrush
  test turns (every kind) and ``scenes_{train,test}.jsonl`` under ``data_dir``; returns
  {kind: builders.SkipReport}.

  Refuses (before writing anything) when one of the datasets exists, unless ``overwrite``.
  """
  from uip2p_jax.data import builders
  edit_kinds = check_kinds(edit_kinds)
  if train < 1 or test < 1:
    raise ValueError(f"shapes needs at least one train and one test record, got --train {train} "
                     f"--test {test}")
  if not overwrite:
    for kind in KIND_SPLITS:
      target = builders.dataset_dir(data_dir, kind)
      if os.path.exists(os.path.join(target, "dataset_info.json")):
        raise FileExistsError(f"{target} already holds a built dataset; pass overwrite "
                              "(--overwrite) to rebuild it")
  counts = {"train": train, "test": test}
  metadata = {"source": "shapes", "seed": seed, "resolution": resolution,
              "train": train, "test": test,
              "held_out_combinations": sorted(" ".join(c) for c in HELD_OUT_COMBINATIONS),
              "held_out_template": "last of each kind", "train_edit_kinds": list(edit_kinds)}
  reports = {}
  for kind, split in KIND_SPLITS.items():
    extra = {"has_reverse": True} if kind == "ip2p" else {}
    extra = {"has_captions": True} if kind == "magicbrush" else extra
    reports[kind] = builders.build(
        kind, lambda kind=kind, split=split: records(kind, counts[split], seed, resolution,
                                                     edit_kinds),
        data_dir, split=split, metadata={**metadata, **extra}, overwrite=overwrite)
  for split, count in counts.items():
    path = scenes_path(data_dir, split)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      for ex in examples(split, count, seed, edit_kinds):
        f.write(json.dumps(ex.to_json()) + "\n")
    os.replace(path + ".tmp", path)
  return reports


def contact_sheet(rows: list[Example], scale: int = 2) -> PIL.Image.Image:
  """Input | ground-truth edit per example, each pair captioned with its instruction (wrapped)
  and kind, in two columns of pairs."""
  import textwrap
  import PIL.ImageFont
  font = PIL.ImageFont.load_default()
  side = RESOLUTION * scale
  pair_w, pair_h, gap, line = 2 * side + 8, side + 40, 12, 12
  columns = 2
  sheet_rows = (len(rows) + columns - 1) // columns
  sheet = PIL.Image.new("RGB", (columns * (pair_w + gap) + gap, sheet_rows * (pair_h + gap) + gap),
                        (255, 255, 255))
  draw = PIL.ImageDraw.Draw(sheet)
  chars = pair_w // 6
  for i, ex in enumerate(rows):
    x = gap + (i % columns) * (pair_w + gap)
    y = gap + (i // columns) * (pair_h + gap)
    for j, scene in enumerate((ex.scene, ex.edited_scene)):
      tile = PIL.Image.fromarray(render(scene)).resize((side, side), PIL.Image.NEAREST)
      sheet.paste(tile, (x + j * (side + 8), y))
    lines = textwrap.wrap(ex.instruction, chars)[:2]
    for k, text in enumerate(lines):
      draw.text((x, y + side + 2 + k * line), text, fill=(0, 0, 0), font=font)
    draw.text((x, y + side + 2 + 2 * line), f"[{ex.edit.kind}] {ex.id}", fill=(90, 90, 90),
              font=font)
  return sheet


__all__ = ["BACKGROUNDS", "COLOURS", "EDIT_KINDS", "Edit", "Example", "HELD_OUT_COMBINATIONS",
           "POSITIONS", "RESOLUTION", "SHAPES", "SIZES", "Scene", "SceneObject", "TEMPLATES",
           "apply_edit", "build", "caption", "contact_sheet", "examples",
           "has_held_out_combination", "instruction", "inverse_edit", "possible_edits", "png_bytes",
           "records", "render", "sample_scene", "scenes_path"]
