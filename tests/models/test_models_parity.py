"""Both families against transformers' EuroBertForMaskedLM on the same weights (float64)."""
import pytest
import torch

from dllm_decode.models import ComputePlan

FAMILIES = ["llada", "dream"]
BATCHES = {"batch1": (0,), "padded3": (0, 2, 4)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_eurobert(lib, family, batch):
    model = lib.make_model(family)
    ref = lib.eurobert(model)
    ids, mask = lib.canvas(pads=BATCHES[batch], P=6, G=8, seed=1)
    want = lib.eurobert_logits(ref, ids, mask)                          # raw, (B, L, V)
    with torch.no_grad():
        raw = model(ids, mask, plan=ComputePlan.full().with_(shift=False))
        got = model(ids, mask)                                          # aligned
    real = mask
    assert lib.rel_err(raw[real], want[real]) < 1e-6
    if family == "dream":
        # aligned logits are the reference samplers' shift of the raw ones
        shifted = torch.cat((want[:, :1], want[:, :-1]), dim=1)
        prev_real = torch.cat((mask[:, :1], mask[:, :-1]), dim=1) & mask
        assert lib.rel_err(got[prev_real], shifted[prev_real]) < 1e-6
        assert not torch.allclose(got[prev_real], want[prev_real])    # the shift is real
    else:
        assert torch.equal(got, raw)


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_reference_matches_eurobert(lib, family):
    """The naive reference used by the plan tests is itself checked against EuroBERT."""
    model = lib.make_model(family)
    ids, mask = lib.canvas(pads=(0, 3), seed=2)
    want = lib.eurobert_logits(lib.eurobert(model), ids, mask)
    W = lib.weights(model)
    L = ids.shape[1]
    for b in range(ids.shape[0]):
        raw = lib.naive_row(W, ids[b], mask[b], list(range(L)))
        assert lib.rel_err(raw[mask[b]], want[b][mask[b]]) < 1e-6


def test_nudged_weight_breaks_parity(lib):
    """The parity check is not vacuous: one changed weight is detected."""
    model = lib.make_model("llada")
    ref = lib.eurobert(model)
    with torch.no_grad():
        model.model.transformer.blocks[1].up_proj.weight[3, 5] += 0.5
    ids, mask = lib.canvas(pads=(0,), seed=1)
    assert lib.rel_err(model(ids, mask), lib.eurobert_logits(ref, ids, mask)) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_row_alone(lib, family):
    model = lib.make_model(family)
    pads = (0, 2, 5)
    ids, mask = lib.canvas(pads=pads, P=7, G=6, seed=3)
    with torch.no_grad():
        batch = model(ids, mask)
        batch_raw = model(ids, mask, plan=ComputePlan.full().with_(shift=False))
        for b, n in enumerate(pads):
            alone = model(ids[b:b + 1, n:])[0]
            alone_raw = model(ids[b:b + 1, n:], plan=ComputePlan.full().with_(shift=False))[0]
            torch.testing.assert_close(batch_raw[b, n:], alone_raw, rtol=1e-12, atol=1e-12)
            # aligned: identical except the first real position, which in the batch takes the
            # pad's logit (the reference shift over the whole canvas)
            k = 1 if family == "dream" else 0
            torch.testing.assert_close(batch[b, n + k:], alone[k:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_padding_row_is_finite(lib, family):
    model = lib.make_model(family)
    ids, mask = lib.canvas(pads=(0, 14), P=6, G=8)   # second row is only padding
    with torch.no_grad():
        out = model(ids, mask)
        win = model(ids, mask, plan=ComputePlan.window(0, 4))   # window of pads only in row 1
    assert torch.isfinite(out).all() and torch.isfinite(win).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_close_to_float64(lib, family, dtype):
    ref = lib.make_model(family)
    low = lib.make_model(family, dtype=dtype)
    ids, mask = lib.canvas(seed=4)
    with torch.no_grad():
        a, b = low(ids, mask), ref(ids, mask)
    assert a.dtype == dtype and torch.isfinite(a).all()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert lib.rel_err(a.double()[mask], b[mask]) < tol
