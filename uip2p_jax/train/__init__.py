"""Training: one jitted, sharded step over a (data, fsdp) mesh, and the loop around it.

  config.py         experiment files, `--config.key=value`, ConfigDict -> the code's configs
  step.py           TrainState, optimizer, `train_step`, `make_step_functions`, `lower_step`
  checkpoint.py     orbax checkpoints (exact resume, unreadable ones set aside), preemption
  samples.py        sample grids, the diffusers export, the final edit
  metric_writer.py  metrics.jsonl, TensorBoard, the console line
  loop.py           `train(config, workdir)` and `main(argv)` (`uip2p train`)

Imports go one way: config <- step <- checkpoint / samples / metric_writer <- loop.
"""

from uip2p_jax.train.loop import TrainResult, main, train

__all__ = ["TrainResult", "main", "train"]
