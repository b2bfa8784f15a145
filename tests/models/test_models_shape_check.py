"""The shape check runs in seconds with small overrides and refuses what does not fit."""
import json

import pytest
import torch

from dllm_decode.tools import shape_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shape_check_small_overrides(capsys):
    rc = shape_check.main(["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "64",
                           "--prompt", "8", "--gen", "16", "32", "--block", "8",
                           "--repeats", "1", "--warmup", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line and not line.startswith(("#", "gen", " gen"))]
    rows = [r for r in rows if r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [16, 32] and [int(r[1]) for r in rows] == [24, 40]
    assert all(float(x) > 0 for r in rows for x in r[2:])


def test_shape_check_default_is_llada_8b_and_checks_memory(capsys, monkeypatch):
    # pretend the device has 1 GiB free: the 8B default shape must be refused, not faked
    monkeypatch.setattr(shape_check, "_available_bytes", lambda device: 1 << 30)
    rc = shape_check.main(["--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "params=8.016B" in cap.out and "not enough memory" in cap.err


# the block-diffusion presets at reduced sizes (real key names, smaller values)
SMALL = {"llada2-mini": ["num_experts=16", "moe_intermediate_size=32", "intermediate_size=128", "head_dim=16"],
         "sdar-8b": ["intermediate_size=128", "head_dim=16"], "fast-dllm-v2-7b": ["intermediate_size=128"]}


@pytest.mark.parametrize("preset", sorted(SMALL))
def test_preset_checkpoint_round_trip_and_cached_block(capsys, tmp_path, preset):
    """A preset's config.json (shrunk by --layers / --set) is written with random weights in the
    real names, reloaded through load_model, prefilled and run for one block step, which gives
    the same bits as the whole-canvas forward."""
    sets = SMALL[preset] + ["hidden_size=64", "vocab_size=512", "num_attention_heads=4", "num_key_value_heads=2",
                            "mask_token_id=511", "eos_token_id=510", "pad_token_id=510"]
    rc = shape_check.main(["--preset", preset, "--layers", "2", *[a for s in sets for a in ("--set", s)],
                           "--prompt", "40", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                           "--checkpoint", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    row = out.splitlines()[-1].split()
    assert row[0] == "40" and row[-2:] == ["True", "True"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == shape_check.PRESETS[preset]["architectures"] and cfg["num_hidden_layers"] == 2


def _n_params(cfg):
    from dllm_decode.models.loader import _FAMILIES, detect_family
    config_cls, model_cls = _FAMILIES[detect_family(cfg)]
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict(dict(cfg)))
    return sum(t.numel() for t in model.state_dict().values())


def test_preset_shapes_match_the_real_checkpoints():
    """Parameter counts at full size (meta device): SDAR-8B-Chat's and SDAR-4B-Chat's bf16 bytes
    equal their model.safetensors.index.json total_size (JetAstra/SDAR training/model/), SDAR-4B
    with its head_dim 128 on a 2560 hidden size; Fast-dLLM v2 7B is Qwen2.5-7B's 7.62B; LLaDA2-mini
    the 16B of its model card."""
    sdar = shape_check.PRESETS["sdar-8b"]
    assert 2 * _n_params(sdar) == 16381470720
    assert 2 * _n_params({**sdar, "hidden_size": 2560, "intermediate_size": 9728}) == 8822848512
    assert _n_params(shape_check.PRESETS["fast-dllm-v2-7b"]) == 7615616512
    assert round(_n_params(shape_check.PRESETS["llada2-mini"]) / 1e9, 1) == 16.3


def test_preset_refuses_ids_outside_a_shrunk_vocabulary(capsys):
    rc = shape_check.main(["--preset", "sdar-8b", "--layers", "1", "--set", "vocab_size=512", "--set", "hidden_size=64",
                           "--set", "intermediate_size=128", "--set", "head_dim=16", "--device", "cpu"])
    assert rc == 2 and "mask_token_id" in capsys.readouterr().err
