"""Input pipeline throughput: images/s at 256 px (decode + augment + tokenize + batch).

Builds a captions dataset of N JPEGs (the sample photos resized and cropped to img2dataset's
usual 512 px scale, so decode cost is realistic), then times the loader after warm-up.

  .venv/bin/python bench/loader_cpu.py [--records 512] [--workers 2] [--batch 32] [--batches 40]
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import PIL.Image


def build(out: str, records: int) -> None:
  from uip2p_jax.data import builders, sources
  manifest = sources.sample_manifest()
  rows = [json.loads(line) for line in open(manifest)]
  root = os.path.dirname(manifest)
  photos = {r["image"]: PIL.Image.open(os.path.join(root, r["image"])).convert("RGB")
            for r in rows}
  rng = np.random.default_rng(0)

  def source():
    for i in range(records):
      row = rows[i % len(rows)]
      photo = photos[row["image"]]
      scale = 512 / min(photo.size) * rng.uniform(1.0, 1.2)
      image = photo.resize((round(photo.width * scale), round(photo.height * scale)))
      image = image.crop((0, 0, min(image.width, 640), min(image.height, 640)))
      data = io.BytesIO()
      image.save(data, "JPEG", quality=90)
      yield f"{row['id']}-{i}", f"bench record {i}", {
          "image": data.getvalue(), **{k: row[k] for k in sources.TEXT_FIELDS["captions"]}}
  builders.build("captions", source, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--records", type=int, default=512)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--resolution", type=int, default=256)
  args = parser.parse_args()
  from uip2p_jax.data.loader import Loader, LoaderConfig
  with tempfile.TemporaryDirectory() as out:
    build(out, args.records)
    loader = Loader(LoaderConfig(out, batch_size=args.batch, resolution=args.resolution,
                                 num_workers=args.workers, worker_buffer=4))
    for _ in range(3):  # warm-up: worker start, tokenizer load
      next(loader)
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
  rate = args.batches * args.batch / elapsed
  print(f"loader: {rate:.0f} images/s at {args.resolution} px ({args.workers} worker processes, "
        f"batch {args.batch}, {os.cpu_count()} CPUs; image batch {batch['image'].shape})")


if __name__ == "__main__":
  main()
