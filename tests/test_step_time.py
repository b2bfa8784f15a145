"""tools.step_time: the table it prints, the parameter count, and its refusals."""

import pytest

from dllm_decode.tools.char_tokenizer import build_char_tokenizer
from dllm_decode.tools.step_time import main, non_embedding_parameters
from dllm_decode.tools.train import TrainConfig, build


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| size")]


@pytest.mark.parametrize("family, extra", [
    ("ar", []),
    ("sdar", ["--block-size", "4"]),
    ("fast_dllm_v2", ["--block-size", "8"]),
    ("dream", ["--attention-anneal", "10", "--repr-align", "1", "--loss-weight", "cart",
               "--mask-mix", "0.2,0.6,0.2"]),
])
def test_a_row_per_setting_with_the_batch_the_tokens_give(capsys, family, extra):
    main(["--family", family, "--sizes", "64x1x128", "--lengths", "48,96", "--tokens", "400",
          "--autocast", "none,bf16", "--repeats", "1", "--threads", "1", *extra])
    rows = _rows(capsys.readouterr().out)
    assert [(r[3], r[4], r[5]) for r in rows] == [("48", "8", "none"), ("48", "8", "bf16"),
                                                   ("96", "4", "none"), ("96", "4", "bf16")]
    assert all(r[2] == family and float(r[7]) > 0 for r in rows)


@pytest.mark.parametrize("family, bias", [("ar", 0), ("dream", 3), ("llada", 0)])
def test_non_embedding_parameters_are_the_layers_and_the_final_norm(family, bias):
    """Per layer: attention 4 d^2, the gated MLP 3 d m, two norms of d (and Dream's q/k/v biases,
    3 d); then the final norm, d. The embedding and the LM head are left out."""
    d, m, n = 64, 128, 2
    cfg = TrainConfig(family=family, out="unused", d_model=d, n_layers=n, n_heads=1, mlp_hidden=m)
    tok = build_char_tokenizer()
    layer = 4 * d * d + 3 * d * m + 2 * d + bias * d
    assert non_embedding_parameters(build(cfg, tok), len(tok)) == n * layer + d


@pytest.mark.parametrize("args, message", [
    (["--family", "llada", "--repr-align", "1"], "--repr-align aligns a Dream model"),
    (["--family", "ar", "--attention-anneal", "5"], "--attention-anneal opens"),
    (["--family", "ar", "--loss-weight", "cart"], "--loss-weight cart"),
])
def test_settings_train_would_refuse_are_refused_by_flag(args, message):
    with pytest.raises(SystemExit, match=message):
        main([*args, "--sizes", "64x1x128", "--lengths", "48", "--tokens", "48", "--repeats", "1",
              "--threads", "1", "--autocast", "none"])
