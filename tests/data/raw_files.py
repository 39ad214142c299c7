"""Tiny raw sources in each input format, written by the tests themselves."""

import io
import json
import tarfile

import numpy as np
import PIL.Image


def jpeg(seed: int, size=(40, 32)) -> bytes:
  rng = np.random.default_rng(seed)
  out = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
      out, "JPEG")
  return out.getvalue()


TRUNCATED = jpeg(99)[:200]  # a JPEG header with no image data


def texts(i: int) -> dict:
  return {"input_caption": f"a photo number {i}", "instruction": f"make it {i} times redder",
          "edited_caption": f"a red photo number {i}", "reverse_instruction": f"undo red {i}"}


def write_tar(path: str, samples: dict[str, dict[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for key, members in samples.items():
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_jsonl(path: str, rows: list) -> str:
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return path


def write_parquet(path: str, columns: dict[str, list]) -> str:
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table(columns), path)
  return path


def image_struct(data: bytes) -> dict:
  """How HF `datasets` stores an Image feature in parquet."""
  return {"bytes": data, "path": None}
