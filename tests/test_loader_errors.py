"""Checkpoint paths that cannot be loaded are refused in a line or two naming the path (and,
given, where it came from): a missing directory, a diffusion checkpoint asked for as an
autoregressive one, a config.json that does not match its weights."""

import json
import shutil
from pathlib import Path

import pytest

from dllm_decode.errors import CheckpointError, CheckpointNotFoundError
from dllm_decode.measure.evaluate import load_ar
from dllm_decode.models.loader import build_random_model, load_causal_lm, load_model, save_pretrained

MODELS = Path(__file__).resolve().parents[1] / "models"


# ----------------------------------------------------------------------------- where the path is


def test_a_missing_directory_is_said_to_be_missing_without_guessing_the_flag(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(CheckpointNotFoundError) as info:
        load_model(gone)
    assert str(info.value) == f"{gone}: directory does not exist"
    with pytest.raises(CheckpointError, match=r"^r.yaml: model.path '.*gone': directory does not exist$"):
        load_model(gone, what="r.yaml: model.path")


def test_a_directory_without_config_json_and_a_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no config.json in this directory") as info:
        load_model(tmp_path)
    assert "--model" not in str(info.value)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="a file, not a checkpoint directory"):
        load_model(tmp_path / "weights.bin")


# ----------------------------------------------------------------------------- config.json vs weights


def test_a_config_that_does_not_match_the_weights_names_both_and_the_tensor(tmp_path):
    save_pretrained(build_random_model("llada", vocab_size=48, d_model=32, n_layers=1, n_heads=4), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path, tokenizer=False)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'config.json'} does not match the weights in model.safetensors: tensor "), msg
    assert "tensor 'model.transformer.blocks.0.attn_norm.weight' is [32] there, config.json implies [64]" in msg, msg
    assert "corrupt" not in msg and len(msg.splitlines()) == 1, msg


# ----------------------------------------------------------------------------- autoregressive models


def test_load_causal_lm_refuses_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"^--ar-model '.*nowhere': directory does not exist$"):
        load_causal_lm(tmp_path / "nowhere", what="--ar-model")


def test_load_causal_lm_refuses_a_diffusion_checkpoint_naming_it():
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(MODELS / "llada-reference")
    msg = str(info.value)
    assert msg.startswith(f"{MODELS / 'llada-reference'}: not an autoregressive checkpoint"), msg
    assert "model_type 'llada'" in msg and "--model" in msg, msg
    with pytest.raises(CheckpointError, match=r"^--ar-model '.*llada-reference': not an autoregressive"):
        load_ar(str(MODELS / "llada-reference"), what="--ar-model")


def test_load_causal_lm_wraps_what_transformers_refuses(tmp_path):
    # a Llama config without weights: transformers' own OSError, as one line naming the path
    shutil.copy(MODELS / "ar-reference" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(tmp_path, what="verifier")
    msg = str(info.value)
    assert msg.startswith(f"verifier '{tmp_path}': transformers cannot load it as AutoModelForCausalLM (OSError"), msg
    assert len(msg.splitlines()) == 1, msg


def test_load_ar_refuses_a_model_without_a_tokenizer(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(MODELS / "ar-reference" / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_ar(str(tmp_path))
