"""The export's model card: YAML front matter huggingface_hub reads, what was trained, the
evaluation tables found beside the export, the commands; `uip2p export card --push-to-hub`
fails with a clear error without network (no upload is attempted for real)."""

import json
import os

import pytest

from uip2p_jax import cli, model_card
from uip2p_jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def export(tmp_path):
  """A LoRA run's export folder (its training record only: no weights needed for the card)
  with `uip2p eval` results beside it."""
  config = load_config(os.path.join(ROOT, "experiments", "finetune.py")
                       + ":objective=cec,data=data/mine")
  out = tmp_path / "run" / "export"
  out.mkdir(parents=True)
  (tmp_path / "run" / "provenance.jsonl").write_text(json.dumps({"commit": "0123456789abcdef"})
                                                     + "\n")
  model_card.write_training_record(str(out), config, 1234, str(tmp_path / "run"))
  evals = tmp_path / "run" / "eval_magicbrush"
  evals.mkdir()
  (evals / "summary.json").write_text("{}")
  (evals / "summary.md").write_text("# MagicBrush test: mine\n\n| setting | L1 |\n|---|---|\n"
                                    "| single-turn | 0.0712 |\n")
  return str(out)


def test_card_has_hub_metadata_training_evaluation_and_commands(export, capsys):
  from huggingface_hub import ModelCard
  assert cli.main(["export", "card", export]) == 0
  assert "README.md" in capsys.readouterr().out
  card = ModelCard.load(os.path.join(export, "README.md"))
  data = card.data.to_dict()
  assert data["license"] == "mit" and data["library_name"] == "diffusers"
  assert data["base_model"] == "timbrooks/instruct-pix2pix"
  assert {"lora", "instruct-pix2pix", "image-editing"} <= set(data["tags"])
  text = card.text
  for expected in ("`cec`: Cycle Edit Consistency (UIP2P): 1 L_clip + 1 L_sim + 1 L_attn",
                   "1234 of 3000", "rank 16, alpha 16, targets attn", "`data/mine`",
                   "### MagicBrush test: mine", "| single-turn | 0.0712 |",
                   "commit `0123456789ab`", f"uip2p edit --model {os.path.abspath(export)}",
                   'pipe.load_lora_weights("',
                   'subfolder="lora",\n                        '
                   'weight_name="pytorch_lora_weights.safetensors")'):
    assert expected in text, expected


def test_push_without_network_is_a_clear_error(export, monkeypatch, capsys):
  from huggingface_hub import constants
  argv = ["export", "card", export, "--push-to-hub", "someone/my-edit-model"]
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "cannot reach the Hugging Face Hub" in err and "OfflineModeIsEnabled" in err
  # Online but nothing answers (a closed local port): the same error, at once.
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
  monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in err
  # The card now names the repo; a bad repo id is refused before any request.
  with open(os.path.join(export, "README.md")) as f:
    assert 'from_pretrained("someone/my-edit-model")' in f.read()
  assert cli.main(argv[:-1] + ["not a repo"]) == 2
  assert "expected a Hub repo id OWNER/NAME" in capsys.readouterr().err
