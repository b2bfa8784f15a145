"""`dllm-decode trace`: the per-step record agrees with the decode, and the picture is drawn.
The framework-overhead loop decodes exactly what the engine decodes."""

import json
from pathlib import Path

import pytest

from dllm_decode.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "llada-reference"


@pytest.mark.parametrize("recipe,over", [("slowfast", ["generation.gen_length=48", "generation.block_length=48"]),
                                         ("threshold", ["generation.gen_length=48", "generation.block_length=16",
                                                        "generation.steps=48"])])
def test_trace_record_matches_the_decode(tmp_path, capsys, recipe, over):
    png, rec = tmp_path / "t.png", tmp_path / "t.json"
    args = ["trace", "--model", str(MODEL), "--recipe", recipe, "--task", "case", "--out", str(png), "--json", str(rec)]
    for o in over:
        args += ["--set", o]
    assert main(args) == 0
    data = json.loads(rec.read_text())
    G = len(data["tokens"])
    assert G == 48 and len(data["steps"]) == data["nfe"]
    seen = [p for s in data["steps"] for p in s["committed"]]
    assert sorted(seen) == list(range(G))                      # every position exactly once
    for s in data["steps"]:
        a, b = s["span"]
        assert all(a <= p < b for p in s["committed"])          # commits inside the span
        assert all(data["commit_step"][p] == s["step"] for p in s["committed"])
        assert all(s["confidence"][p] is not None for p in s["committed"])
    if recipe == "threshold":
        assert {tuple(s["span"]) for s in data["steps"]} <= {(0, 16), (16, 32), (32, 48)}
    else:
        assert {s["phase"] for s in data["steps"]} <= {"explore", "accelerate", "explore+accelerate"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "steps" in capsys.readouterr().out


def test_handwritten_loop_equals_the_engine():
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.models import load_model
    from dllm_decode.tools.overhead import handwritten_llada
    from dllm_decode.recipes import find_recipe

    model, tok = load_model(MODEL)
    prompts = [tok("copy: abcdef\n", add_special_tokens=False)["input_ids"],
               tok("case: Hello\n", add_special_tokens=False)["input_ids"]]
    recipe = load_recipe(find_recipe("llada"), overrides=["generation.gen_length=32", "generation.block_length=32",
                                                          "generation.steps=32", "generation.batch_size=2"])
    decoder = Decoder(model, recipe)
    assert handwritten_llada(model, prompts, 32, decoder.pad_id).tolist() == decoder.generate(prompts).tokens


def _record(S=7, G=96):
    """A made-up record: one position per step, the span the whole canvas."""
    steps = [{"step": i, "phase": "explore" if i % 2 else "accelerate", "span": [0, G], "committed": [i],
              "committed_confidence": [0.9], "confidence": [0.5] * G} for i in range(S)]
    return {"gen_start": 5, "tokens": [7] * G, "pieces": ["a"] * 40 + ["\n"] + ["<|endoftext|>"] * (G - 41),
            "commit_step": list(range(G)), "nfe": S, "steps": steps}


def test_the_trace_picture_is_readable():
    import matplotlib.pyplot as plt

    from dllm_decode.measure.trace import figure

    fig = figure(_record())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    order, conf = fig.axes[:2]
    assert list(order.get_yticks()) == list(range(7))                       # whole steps
    assert [t.get_text() for t in order.get_yticklabels()] == [str(i) for i in range(7)]
    spans = [p for p in order.patches if p.get_gid() == "span"]
    assert len(spans) == 7                                                   # one span outline per step
    x0, x1 = order.get_xlim()
    assert all(x0 < p.get_x() and p.get_x() + p.get_width() < x1 for p in spans)  # inside, not on the frame
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in (order, conf))
    for ax in (order, conf):
        shown = [t for t in ax.get_xticklabels() if t.get_text() and x0 <= t.get_position()[0] <= x1]
        boxes = [t.get_window_extent(renderer) for t in shown]
        assert len(boxes) >= 4 and not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
        assert all(float(t.get_position()[0]).is_integer() for t in shown)      # whole positions
    assert any("+ 55 x <|endoftext|>" in t.get_text() for t in fig.texts)   # the decoded text, tail counted
    plt.close(fig)
