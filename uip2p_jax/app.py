"""The browser demo (`uip2p app`): a Gradio page around `EditPipeline.edit`.

    from uip2p_jax.app import build_app, launch
    from uip2p_jax.pipeline import EditPipeline
    launch(build_app(EditPipeline.tiny_random(), "the embedded tiny random model"))

Upload an image (or pick an example), type an instruction, choose steps, text and image guidance
and a seed, and edit. Images are edited at `uip2p edit`'s working size (aspect kept, longest
side `resolution`). The edit is compiled once per shape (working size, steps, sampler; see
`pipeline.py`): the page says so on the first edit of each shape, and how long later ones take.
An unreadable upload is an error message on the page; the server keeps serving. Nothing leaves
the machine: analytics off, no share link unless asked, and gradio serves its page, scripts and
fonts itself (no CDN).
"""

from __future__ import annotations

import os
import random
import time

import gradio as gr

from uip2p_jax.image_io import load_image, working_size

MAX_SEED = 2 ** 31 - 1   # within the uint32 of a PRNG key, and an int32 anywhere else
SHAPES_EXAMPLES = 8      # ShapesWorld test turns shown as examples
IMAGE_HEIGHT = 360       # px on the page
EXAMPLES_PER_PAGE = 6
# Both images fill their boxes: a 64 px edit is shown scaled up, not as a thumbnail.
CSS = "#input-image img, #output-image img { width: 100%; height: 100%; object-fit: contain; }"


def unreadable(name: str) -> str:
  return (f"Cannot read {name or 'the upload'} as an image: upload a photo (PNG, JPEG, WebP, "
          "...) or pick an example below.")


def with_upload_message(image: gr.Image) -> gr.Image:
  """`image` (an input) with an unreadable upload turned into a message on the page: gradio's
  own preprocessing opens the file with PIL, and its failure would show only a bare "Error".
  (The instance's method is wrapped: a gr.Image subclass would make gradio write a .pyi stub
  beside this file.)"""
  preprocess = image.preprocess

  def checked(payload):
    try:
      return preprocess(payload)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError: an OSError
      name = payload.orig_name or os.path.basename(payload.path or "")
      raise gr.Error(unreadable(name)) from e

  image.preprocess = checked
  return image


def photo_examples() -> list[list]:
  """[image path, instruction] for each record of the bundled sample photos' manifest."""
  from uip2p_jax.data.sources import read_jsonl, sample_manifest
  manifest = sample_manifest()
  folder = os.path.dirname(manifest)
  return [[os.path.join(folder, fields["image"]), fields["instruction"]]
          for _, fields, _ in read_jsonl(manifest) if fields]


def shapes_examples(count: int = SHAPES_EXAMPLES, seed: int = 0) -> list[list]:
  """[rendered scene (64 px uint8), instruction] of the first ShapesWorld test turns."""
  from uip2p_jax.data import shapes
  return [[shapes.render(example.scene), example.instruction]
          for example in shapes.examples("test", count, seed)]


class Editor:
  """The page's edit: one image at a time (gradio's queue runs one edit at once) through
  `EditPipeline.edit`, remembering which shapes have been compiled, so that the page can say
  when an edit compiles."""

  def __init__(self, pipe, resolution: int = 512, sampler: str = "euler_ancestral"):
    self.pipe, self.resolution, self.sampler = pipe, resolution, sampler
    self.compiled: set[tuple] = set()

  def edit(self, image_path: str | None, instruction: str, steps: float, text_scale: float,
           image_scale: float, seed: float | None, randomize: bool):
    """Yields (edited image, seed used, status): first a "compiling" status when the shape is
    new, then the edit. Bad input raises gr.Error (a message on the page)."""
    if not image_path:
      raise gr.Error("Upload an image first (or pick an example below).")
    instruction = (instruction or "").strip()
    if not instruction:
      raise gr.Error('Type an instruction first, e.g. "make it snowy".')
    try:
      image = load_image(image_path)
    except (ValueError, OSError) as e:  # e.g. a truncated file whose header gradio could read
      raise gr.Error(unreadable(os.path.basename(image_path))) from e
    steps = int(steps)
    seed = random.randint(0, MAX_SEED) if randomize or seed is None else int(seed)
    try:
      width, height = working_size(*image.size, self.resolution, self.pipe.working_multiple)
    except ValueError as e:  # a resolution below the model's size multiple
      raise gr.Error(str(e)) from e
    shape = (width, height, steps, self.sampler)
    where = f"{width}x{height} px, {steps} step{'s' * (steps != 1)}"
    first = shape not in self.compiled
    if first:
      yield gr.skip(), seed, (f"Compiling the edit for {where} (once per shape: later edits at "
                              "this size and step count run compiled)...")
    start = time.perf_counter()
    try:
      edited = self.pipe.edit(image, instruction, steps=steps, text_scale=float(text_scale),
                              image_scale=float(image_scale), seeds=seed, sampler=self.sampler,
                              resolution=self.resolution)
    except ValueError as e:
      raise gr.Error(str(e)) from e
    seconds = time.perf_counter() - start
    self.compiled.add(shape)
    how = ("including compiling it for this shape (once; later edits at this shape run "
           "compiled)" if first else "ran compiled")
    yield edited, seed, f"Edited at {where}, seed {seed}, in {seconds:.1f} s, {how}."


def build_app(pipe, model_name: str, *, resolution: int = 512, steps: int = 20,
              text_scale: float = 7.5, image_scale: float = 1.5,
              sampler: str = "euler_ancestral", shapes: bool = False) -> gr.Blocks:
  """The demo page for `pipe` (an `EditPipeline`), named `model_name` on the page. Examples: the
  bundled sample photos, and with `shapes` ShapesWorld test scenes (for a ShapesWorld model).
  Serve it with `launch`."""
  editor = Editor(pipe, resolution, sampler)
  with gr.Blocks(title="uip2p: edit images by instruction", analytics_enabled=False) as app:
    gr.Markdown(f"## Edit an image by instruction\nModel: {model_name}. Images are edited with "
                f"their longest side at {resolution} px, {sampler} sampler.")
    with gr.Row():
      # One height for both, so that a small working size (64 px) is shown scaled up.
      image = with_upload_message(gr.Image(
          label="Image", type="filepath", image_mode=None, format="png",
          sources=["upload", "clipboard"], height=IMAGE_HEIGHT, elem_id="input-image"))
      edited = gr.Image(label="Edited", type="pil", format="png", interactive=False,
                        height=IMAGE_HEIGHT, elem_id="output-image")
    instruction = gr.Textbox(label="Instruction", placeholder="make it snowy",
                             elem_id="instruction")
    with gr.Row():
      steps_input = gr.Slider(1, 100, value=steps, step=1, label="Steps")
      text_input = gr.Slider(0, 20, value=text_scale, step=0.1, label="Text guidance")
      image_input = gr.Slider(0, 10, value=image_scale, step=0.1, label="Image guidance")
    with gr.Row():
      seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
      randomize = gr.Checkbox(True, label="Randomize seed")
    button = gr.Button("Edit", variant="primary", elem_id="edit-button")
    status = gr.Markdown("The first edit of each image size and step count compiles the model "
                         "(seconds to minutes); later ones reuse it.", elem_id="status")
    inputs = [image, instruction, steps_input, text_input, image_input, seed, randomize]
    # The bound method, not the object: gradio streams a generator *function*'s yields.
    gr.on([button.click, instruction.submit], editor.edit, inputs, [edited, seed, status],
          api_name="edit")
    examples = [(photo_examples(), "Sample photos (CC0 / public domain)", "photo-examples")]
    if shapes:  # the world's own scenes first: what its model knows
      examples.insert(0, (shapes_examples(), "ShapesWorld test scenes", "shapes-examples"))
    for rows, label, elem_id in examples:
      gr.Examples(rows, [image, instruction], label=label, elem_id=elem_id,
                  examples_per_page=EXAMPLES_PER_PAGE)
  return app


def launch(app: gr.Blocks, **kwargs):
  """`app.launch(**kwargs)` with the page's CSS (gradio 6 takes it at launch) and without
  server-side rendering (it would need node)."""
  return app.launch(css=CSS, ssr_mode=False, **kwargs)
