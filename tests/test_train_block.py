"""Block-diffusion training (train --family sdar, fast_dllm_v2): the two-copy canvas gives every noisy block the
view a block-causal decoder has of it, checked against plain block-causal forwards."""

import json

import pytest
import torch

from dllm_decode.models import ComputePlan, build_random_model
from dllm_decode.tools.train import block_attend

MASK = 47


def test_noisy_blocks_see_what_a_block_causal_decoder_sees():
    """Each noisy block's logits on the [noisy | clean] canvas equal those of a plain block-causal
    forward of the clean blocks before it followed by the noisy block, left padding included."""
    size = 4
    model = build_random_model("sdar", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               mask_token_id=MASK, eos_token_id=1, pad_token_id=0, seed=2, dtype=torch.float64,
                               block_size=size).eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(2, 46, (2, 14), generator=g)
    att = torch.ones_like(clean, dtype=torch.bool)
    clean[1, :3], att[1, :3] = 0, False                                     # a left-padded row
    noisy = torch.where(torch.rand(clean.shape, generator=g) < 0.5, MASK, clean)
    pos = (att.long().cumsum(-1) - 1).clamp(min=0)
    plan = ComputePlan(position_ids=torch.cat([pos, pos], 1), attend=block_attend(pos, size))
    both = model.execute(torch.cat([noisy, clean], 1), torch.cat([att, att], 1), plan).logits[:, :14]
    for b in range(2):
        first = int((~att[b]).sum())
        for start in range(first, 14, size):                                # the row's own blocks
            end = min(start + size, 14)
            canvas = torch.cat([clean[b, :start], noisy[b, start:end]])[None]
            want = model(canvas, attention_mask=att[b, :end][None])[0, start:end]
            torch.testing.assert_close(both[b, start:end], want, rtol=1e-12, atol=1e-12)


def test_the_mask_has_the_block_diffusion_shape():
    pos = torch.arange(8)[None]
    m = block_attend(pos, 4)[0]
    noisy_q, clean_q = m[:8], m[8:]
    assert noisy_q[5, :8].tolist() == [False] * 4 + [True] * 4             # its own noisy block
    assert noisy_q[5, 8:].tolist() == [True] * 4 + [False] * 4             # earlier clean blocks
    assert not clean_q[:, :8].any()                                        # clean never sees noisy
    assert clean_q[2, 8:].tolist() == [True] * 4 + [False] * 4


def test_init_from_an_ar_checkpoint_adds_qk_norms_at_one(tmp_path):
    """SDAR from an AR checkpoint: every AR tensor under its own name, Qwen3's q/k norms at one."""
    from safetensors.torch import load_file

    from dllm_decode.tools.train import TrainConfig, train

    tiny = dict(steps=2, batch_size=4, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32, canvas=(96,),
                canvas_weights=(1.0,), threads=1, log_every=1)
    ar = train(TrainConfig(family="ar", out=str(tmp_path / "ar"), **tiny), progress=False)
    out = train(TrainConfig(family="sdar", out=str(tmp_path / "sdar"), init=str(ar), block_sizes=(4, 8),
                            **{**tiny, "steps": 0}), progress=False)
    arw, ours = load_file(str(ar / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(arw) <= set(ours) and all(torch.equal(v, ours[k]) for k, v in arw.items())
    norms = [k for k in ours if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert norms and all(bool((ours[k] == 1).all()) for k in norms)


def _fdv2(size, seed=2):
    return build_random_model("fast_dllm_v2", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=MASK, eos_token_id=1, pad_token_id=0, seed=seed, dtype=torch.float64,
                              bd_size=size).eval()


def test_fast_dllm_v2_loss_is_the_reference_objective():
    """shifted_block_diffusion_loss against the training branch of Fast-dLLM v2's modeling.py, re-derived
    one target at a time: each row seen with its masks and with their complement on the answer; a
    masked token at i scored by the raw output at i - 1 of the noisy copy, which sees its own noisy
    block and the clean blocks before it (a plain block-causal forward of those, the noisy block last),
    also where i opens a block; unweighted cross-entropy summed and divided by the answer positions."""
    from dllm_decode.tools.train import block_masks, shifted_block_diffusion_loss

    size, P, eps = 4, 5, 1e-3
    model = _fdv2(size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 46, (2, P + 11), generator=g)
    att = torch.ones_like(ids, dtype=torch.bool)
    ids[1, :2], att[1, :2] = 0, False                                       # a left-padded prompt
    loss = shifted_block_diffusion_loss(model, ids, att, P, MASK, eps, torch.Generator().manual_seed(7), size)

    masked = block_masks(att, P, size, eps, torch.Generator().manual_seed(7))
    answer = torch.zeros_like(masked)
    answer[:, P:] = True
    assert masked.any() and (answer & ~masked).any()
    total, L = 0.0, ids.shape[1]
    for view in (masked, answer & ~masked):
        noisy = torch.where(view, MASK, ids)
        for b in range(2):
            first = int((~att[b]).sum())
            for i in view[b].nonzero().flatten().tolist():
                start = first + (i - 1 - first) // size * size                  # the block holding i - 1
                end = min(start + size, L)
                canvas = torch.cat([ids[b, :start], noisy[b, start:end]])[None]
                raw = model.execute(canvas, att[b, :end][None], ComputePlan(shift=False)).logits[0, i - 1]
                total += -torch.log_softmax(raw, -1)[ids[b, i]].item()
    # the loss takes its cross-entropy in float32 (as under autocast); the reference sums in float64
    torch.testing.assert_close(loss.double(), torch.tensor(total / (2 * (L - P)), dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_block_masks_draw_one_ratio_per_block():
    """The prompt is never masked; within a block the masked count spreads as one t ~ U(0, 1) for the
    block gives (variance 8/6 + 64/12 for blocks of 8, against 2 for independent coin flips), and the
    next block of the same row draws its own t (their counts uncorrelated)."""
    from dllm_decode.tools.train import block_masks

    P, size = 8, 8
    att = torch.ones(4000, P + 16, dtype=torch.bool)
    m = block_masks(att, P, size, 1e-3, torch.Generator().manual_seed(0))
    assert not m[:, :P].any()
    a, b = m[:, P:P + 8].sum(1).double(), m[:, P + 8:].sum(1).double()
    assert 5.5 < a.var().item() < 8.0 and 5.5 < b.var().item() < 8.0
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.08


def test_fast_dllm_v2_from_an_ar_checkpoint_reads_as_it_with_blocks_of_one(tmp_path):
    """Adapted from an AR checkpoint (q/k/v biases at zero, logits shifted as the AR model's), blocks of
    one position are causal attention: the untrained model predicts every next token as the AR model
    does. Blocks of four let a position see the rest of its block, and the reading changes."""
    from transformers import AutoModelForCausalLM

    from dllm_decode.models import load_model
    from dllm_decode.tools.train import TrainConfig, train

    tiny = dict(steps=2, batch_size=4, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32, canvas=(96,),
                canvas_weights=(1.0,), threads=1, log_every=1)
    ar = train(TrainConfig(family="ar", out=str(tmp_path / "ar"), **tiny), progress=False)
    want = AutoModelForCausalLM.from_pretrained(str(ar)).eval()
    ids = torch.randint(3, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    for size in (1, 4):
        out = train(TrainConfig(family="fast_dllm_v2", out=str(tmp_path / f"b{size}"), init=str(ar), block_size=size,
                                **{**tiny, "steps": 0}), progress=False)
        model = load_model(out, tokenizer=False)[0]
        assert model.spec.shift_logits and model.spec.block_size == size
        with torch.no_grad():
            got, ref = model(ids)[:, 1:], want(input_ids=ids).logits[:, :-1]
        if size == 1:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        else:
            assert (got - ref).abs().max() > 1e-3


def test_a_fast_dllm_v2_run_writes_its_card(tmp_path):
    """The model card of a Fast-dLLM v2 run names its format and objective (here trained at two block
    sizes), decodes it with the fast-dllm-v2 recipe at its block size and gives the commands that
    retrain it."""
    from dllm_decode.tools.model_card import main
    from dllm_decode.tools.train import TrainConfig, train

    tiny = dict(steps=2, batch_size=4, d_model=16, n_layers=1, n_heads=2, mlp_hidden=32, canvas=(96,),
                canvas_weights=(1.0,), threads=1, log_every=1, tasks=("copy",))
    ar = train(TrainConfig(family="ar", out=str(tmp_path / "ar"), **tiny), progress=False)
    out = train(TrainConfig(family="fast_dllm_v2", out=str(tmp_path / "fd"), init=str(ar), block_size=8,
                            block_sizes=(4, 8), fit_canvas=True, **tiny), progress=False)
    main([str(out), "--n", "2", "--grid-n", "0", "--gen-length", "96", "--write"])
    text = (out / "README.md").read_text()
    kind = json.loads((out / "config.json").read_text())["model_type"]         # the card names the real one
    assert f"Fast-dLLM v2 (`config.json` model_type `{kind}`" in text and "blocks of 8 (`bd_size`)" in text
    assert "shifted_block_diffusion_loss" in text and "The `fast-dllm-v2` recipe at the checkpoint's block size" in text
    assert "--family fast_dllm_v2" in text and "--block-size 8" in text and "--fit-canvas" in text
    assert "Block size drawn per batch from 4, 8" in text and "--block-sizes 4,8" in text
    assert "padded with EOS to the end of the block holding the EOS of the batch's longest answer" in text


@pytest.mark.parametrize("family, sizes, by_task", [("fast_dllm_v2", (), True), ("sdar", (4, 6), True),
                                                    ("sdar", (), False)])
def test_a_fitted_canvas_ends_at_the_block_holding_the_longest_answers_eos(family, sizes, by_task):
    """--fit-canvas: every row's answer, its EOS and the rest of that EOS's block (blocks counted from
    the row's first token; for SDAR's drawn sizes, every size's block) lie on the canvas, and one
    position less would cut one of them; the budget sizes the rows by the task's longest answer."""
    import math
    import random

    from dllm_decode.measure.tasks import get_task
    from dllm_decode.tools.char_tokenizer import build_char_tokenizer
    from dllm_decode.tools.train import Batcher, TrainConfig

    tok = build_char_tokenizer()
    cfg = TrainConfig(family=family, out="unused", tasks=("copy", "chain"), batch_by_task=by_task,
                      batch_tokens=4096 if by_task else 0, batch_size=8, block_size=4, block_sizes=sizes,
                      fit_canvas=True, canvas=(512,), canvas_weights=(1.0,))
    unit = math.lcm(*(sizes or (4,)))
    b, rng, widths = Batcher(cfg, tok), random.Random(0), set()
    for _ in range(10):
        ids, att, P = b.task_batch(rng) if by_task else b.next(None)
        G = ids.shape[1] - P
        need = []
        for row, keep in zip(ids, att):
            p = int(keep[:P].sum())
            a = int((row[P:] == tok.eos_token_id).long().argmax())                  # the answer's length
            assert (row[P + a:] == tok.eos_token_id).all() and keep[P:].all()
            need.append(-(-(p + a + 1) // unit) * unit - p)                          # the EOS block's end
        assert max(need) == G                                                        # all fit; G - 1 would not
        widths.add(G)
        if by_task:
            task = get_task("copy" if tok.decode(ids[0, :P].tolist(), skip_special_tokens=True)
                            .startswith("copy") else "chain")
            assert ids.shape[0] == 4096 // (task.max_prompt_tokens + task.max_answer_tokens + unit)
    assert len(widths) > 1 and max(widths) < 512


def test_fast_dllm_v2_draws_its_block_size_per_batch():
    """--block-sizes for Fast-dLLM v2 (one checkpoint decoded at several block sizes): each batch's loss is
    the objective at the size the run's stream drew, both sizes come up, and the two sizes' losses differ
    (a step that ignored the draw would fail here)."""
    import random
    from types import SimpleNamespace

    from dllm_decode.tools.train import TrainConfig, batch_loss, shifted_block_diffusion_loss

    model, P = _fdv2(4), 5
    ids = torch.randint(2, 46, (2, P + 16), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids, dtype=torch.bool)
    cfg = TrainConfig(family="fast_dllm_v2", out="unused", block_size=4, block_sizes=(4, 8), autocast="none")
    rng, drawn = random.Random(3), set()
    for _ in range(8):
        twin = random.Random()
        twin.setstate(rng.getstate())
        size = twin.choice(cfg.block_sizes)
        got = batch_loss(cfg, model, SimpleNamespace(mask_token_id=MASK), ids, att, P, 0,
                         torch.Generator().manual_seed(7), rng)
        assert rng.getstate() == twin.getstate()
        want = {s: shifted_block_diffusion_loss(model, ids, att, P, MASK, cfg.eps, torch.Generator().manual_seed(7), s)
                for s in (4, 8)}
        assert torch.equal(got, want[size]) and not torch.equal(want[4], want[8])
        drawn.add(size)
    assert drawn == {4, 8}
