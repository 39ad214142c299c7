"""Training metrics: metrics.jsonl, TensorBoard scalars and images, and the console line.

Only process 0 writes. A resumed run first drops what an interrupted run logged after the
restored step (metrics.jsonl rows are rewritten; TensorBoard is told to purge those steps), so
each step appears once.
"""

from __future__ import annotations

import json
import os


def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps the rows of `path` with step <= last_step (atomically); returns how many it dropped."""
  if not os.path.isfile(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):  # a line cut off by a kill
        dropped += 1
        continue
      if step <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
      f.writelines(kept)
    os.replace(temporary, path)
  return dropped


class MetricWriter:
  """Writes a run's metrics from `start_step` on (0 for a new run)."""

  def __init__(self, workdir: str, start_step: int, enabled: bool = True):
    self.enabled = enabled
    self.jsonl = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      truncate_jsonl(self.jsonl, start_step)
      # purge_step: TensorBoard discards events at or after it (written by an interrupted run).
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                        purge_step=start_step + 1)

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in metrics.items():
      self._tensorboard.add_scalar(f"train/{name}", value, step)
    with open(self.jsonl, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
    print(f"step {step:6d} | loss {metrics['loss']:.4f} | lr {metrics['learning_rate']:.2e}"
          f" | grad {metrics['grad_norm']:.3f} | {metrics['images_per_second']:.1f} img/s"
          f" | {metrics['step_time'] * 1000:.0f} ms/step{mfu}"
          f" | skipped {int(metrics['skipped_updates'])}", flush=True)

  def image(self, name: str, image, step: int) -> None:
    """An (H, W, 3) uint8 image."""
    if self.enabled:
      self._tensorboard.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
