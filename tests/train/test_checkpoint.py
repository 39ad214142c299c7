"""Checkpoints: a damaged latest checkpoint (truncated array file, garbled metadata, garbled
data-iterator state or metrics) is set aside and the previous one restored; strict_resume
refuses; a checkpoint of another train state or data stream is refused, never set aside."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uip2p_jax.train.checkpoint import Checkpoints, ResumeError


class FakeLoader:
  def __init__(self, position=0):
    self.position = position

  def get_state(self) -> str:
    return f'{{"position": {self.position}}}'

  def set_state(self, state: str) -> None:
    import json
    self.position = json.loads(state)["position"]


def _config(strict=False):
  return ml_collections.ConfigDict(dict(checkpoint=dict(every=1, keep=3, use_async=False,
                                                        strict_resume=strict)))


def _state(step):
  return {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((64, 64), float(step))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _saved_run(directory, prediction_type=None):
  checkpoints = Checkpoints(directory, _config(), _abstract(_state(0)), prediction_type)
  for step in (1, 2):
    checkpoints.save(step, _state(step), FakeLoader(step * 10), loss=1.0 / step)
  checkpoints.close()


def _truncate_array(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and "d/" in f.replace(os.sep, "/")]
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(max(1, os.path.getsize(path) // 3))


def _garble(path):
  assert os.path.isfile(path), path
  with open(path, "w") as f:
    f.write("{not json")


DAMAGE = {
    "truncated array file": _truncate_array,
    "garbled _METADATA": lambda d: _garble(os.path.join(d, "state", "_METADATA")),
    "garbled data-iterator state": lambda d: _garble(
        next(f for f in glob.glob(os.path.join(d, "data", "*")) if os.path.isfile(f))),
    "garbled metrics": lambda d: _garble(os.path.join(d, "metrics", "metrics")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_set_aside(tmp_path, damage, capsys):
  directory = str(tmp_path / "checkpoints")
  _saved_run(directory)
  DAMAGE[damage](os.path.join(directory, "2"))
  abstract = _abstract(_state(0))

  with pytest.raises(ResumeError, match=r"checkpoints/2 cannot be restored .*strict_resume"):
    Checkpoints(directory, _config(strict=True), abstract).restore_latest(FakeLoader())
  assert os.path.isdir(os.path.join(directory, "2"))  # refused, not moved

  checkpoints = Checkpoints(directory, _config(), abstract)
  loader = FakeLoader()
  state, step = checkpoints.restore_latest(loader)
  assert step == 1 and loader.position == 10
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((64, 64)))
  assert sorted(os.listdir(directory)) == ["1", "2.unreadable-0"]  # kept for inspection
  warning = capsys.readouterr().err
  assert "checkpoints/2 cannot be restored" in warning and "2.unreadable-0" in warning
  # The run goes on: the next save of step 2 is a fresh checkpoint.
  checkpoints.save(2, _state(2), FakeLoader(20), loss=0.5)
  checkpoints.close()
  assert sorted(os.listdir(directory)) == ["1", "2", "2.unreadable-0"]


def test_a_checkpoint_of_another_state_is_refused_not_set_aside(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _saved_run(directory)
  other = {"step": jax.ShapeDtypeStruct((), jnp.int32),
           "w": jax.ShapeDtypeStruct((32, 64), jnp.float32)}
  with pytest.raises(ResumeError, match=r"checkpoints/2 holds another train state .*new --workdir"):
    Checkpoints(directory, _config(), other).restore_latest(FakeLoader())
  assert sorted(os.listdir(directory)) == ["1", "2"]
  # Nor is one of another data stream (the loader's DataError: another config.sample.count).
  from uip2p_jax.data.loader import DataError

  class OtherStream(FakeLoader):
    def set_state(self, state):
      raise DataError("another config.sample.count")
  with pytest.raises(DataError, match=r"checkpoints/2: another config.sample.count"):
    Checkpoints(directory, _config(), _abstract(_state(0))).restore_latest(OtherStream())
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_a_checkpoint_of_the_same_arrays_in_another_tree_is_refused(tmp_path):
  # An optimizer chain with one more stateless part: same leaves (signature), another tree.
  directory = str(tmp_path / "checkpoints")
  _saved_run(directory)
  regrouped = {**_abstract(_state(0)), "extra": ()}
  with pytest.raises(ResumeError, match=r"checkpoints/2 holds the same arrays in another tree"):
    Checkpoints(directory, _config(), regrouped).restore_latest(FakeLoader())
  # Checkpoints saved before the tree was recorded: orbax's own mismatch is refused too.
  import json
  for step in ("1", "2"):
    path = os.path.join(directory, step, "metrics", "metrics")
    record = json.load(open(path))
    del record["state_tree"]
    json.dump(record, open(path, "w"))
  with pytest.raises(ResumeError, match=r"checkpoints/2 holds another train state .*tree "
                                        r"structures do not match"):
    Checkpoints(directory, _config(), regrouped).restore_latest(FakeLoader())
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_a_checkpoint_of_another_prediction_type_is_refused(tmp_path):
  # Same arrays, another output (epsilon vs v): the signature alone would let it resume.
  directory = str(tmp_path / "checkpoints")
  _saved_run(directory, prediction_type="epsilon")
  with pytest.raises(ResumeError, match=r"checkpoints/2 holds a UNet trained to predict "
                                        r"'epsilon', this run's predicts 'v_prediction'"):
    Checkpoints(directory, _config(), _abstract(_state(0)), "v_prediction").restore_latest(
        FakeLoader())
  assert sorted(os.listdir(directory)) == ["1", "2"]
  _, step = Checkpoints(directory, _config(), _abstract(_state(0)), "epsilon").restore_latest(
      FakeLoader())
  assert step == 2
