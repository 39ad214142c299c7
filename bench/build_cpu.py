"""`uip2p data build` throughput: records/s of a captions build from webdataset shards.

Writes img2dataset-style shards (jpg + txt per key, the bundled sample photos resized and
cropped to img2dataset's usual 512 px scale, as bench/loader_cpu.py does) and an instructions
JSONL, then times whole builds (worker start, validation decode, serialization, the final
merge and metadata) with each --workers value, alternately, and reports the medians: records/s
of wall time, and records per CPU second (this process and its workers together), which a
machine shared with other jobs does not change as much.

  .venv/bin/python bench/build_cpu.py [--records 4000] [--shards 16] [--workers 1 2] [--repeats 2]
"""

import argparse
import io
import json
import os
import resource
import statistics
import tarfile
import tempfile
import time

import numpy as np
import PIL.Image


def write_inputs(folder: str, records: int, shards: int) -> tuple[str, str]:
  """(shard pattern, instructions file) of `records` samples in `shards` tar files."""
  from uip2p_jax.data import sources
  manifest = sources.sample_manifest()
  rows = [json.loads(line) for line in open(manifest)]
  root = os.path.dirname(manifest)
  photos = {r["image"]: PIL.Image.open(os.path.join(root, r["image"])).convert("RGB")
            for r in rows}
  rng = np.random.default_rng(0)
  per_shard = -(-records // shards)
  with open(os.path.join(folder, "instructions.jsonl"), "w") as instructions:
    for shard in range(shards):
      with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
        for i in range(shard * per_shard, min(records, (shard + 1) * per_shard)):
          row = rows[i % len(rows)]
          photo = photos[row["image"]]
          scale = 512 / min(photo.size) * rng.uniform(1.0, 1.2)
          image = photo.resize((round(photo.width * scale), round(photo.height * scale)))
          image = image.crop((0, 0, min(image.width, 640), min(image.height, 640)))
          data = io.BytesIO()
          image.save(data, "JPEG", quality=90)
          key = f"{shard:05d}{i:04d}"
          for ext, payload in (("jpg", data.getvalue()), ("txt", row["input_caption"].encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
          instructions.write(json.dumps({"key": key, **{k: row[k] for k in (
              "instruction", "edited_caption", "reverse_instruction")}}) + "\n")
  return os.path.join(folder, "*.tar"), os.path.join(folder, "instructions.jsonl")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--records", type=int, default=4000)
  parser.add_argument("--shards", type=int, default=16)
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  from uip2p_jax.data import builders, sources
  times = {workers: [] for workers in args.workers}
  cpu = {workers: [] for workers in args.workers}

  def cpu_seconds():  # this process and its finished children (the pool's workers)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)
  with tempfile.TemporaryDirectory() as folder:
    pattern, instructions = write_inputs(folder, args.records, args.shards)
    for _ in range(args.repeats):
      for workers in args.workers:
        out = os.path.join(folder, f"out{workers}")
        start, start_cpu = time.perf_counter(), cpu_seconds()
        report = builders.build("captions",
                                lambda: sources.webdataset_records(pattern, instructions), out,
                                workers=workers, overwrite=True)
        times[workers].append(time.perf_counter() - start)
        cpu[workers].append(cpu_seconds() - start_cpu)
        assert report.written == args.records and not report.skipped, report.summary()
  for workers, seconds in times.items():
    median = statistics.median(seconds)
    print(f"data build captions: {args.records / median:.0f} records/s with {workers} worker(s), "
          f"{args.records / statistics.median(cpu[workers]):.0f} records per CPU second "
          f"(median of {', '.join(f'{s:.1f}' for s in seconds)} s; {args.records} records in "
          f"{args.shards} shards, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
  main()
