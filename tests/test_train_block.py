"""Block-diffusion training (train --family sdar): the two-copy canvas gives every noisy block the
view a block-causal decoder has of it, checked against plain block-causal forwards."""

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
