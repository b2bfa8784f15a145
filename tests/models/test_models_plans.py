"""Compute plans and the cache store.

Cached plans are compared with the naive per-row reference of conftest.py, which is fed the
stale features explicitly (K/V etc. computed by a full forward on the OLD canvas), and with the
plain full forward when nothing is stale."""
import pytest
import torch

from dllm_decode.models import CacheStore, ComputePlan

FAMILIES = ["llada", "dream"]
P, G = 6, 8
L = P + G
PADS = (0, 2, 4)
TIGHT = dict(rtol=1e-9, atol=1e-9)


def _setup(lib, family):
    model = lib.make_model(family)
    ids0, mask = lib.canvas(pads=PADS, P=P, G=G, seed=5)
    return model, lib.weights(model), ids0, mask


def _naive_banks(lib, W, ids, mask):
    """Per-row banks after a full forward on `ids` (what a refresh plan stores)."""
    banks = []
    for b in range(ids.shape[0]):
        bank = lib.new_bank(W, L)
        lib.naive_row(W, ids[b], mask[b], list(range(L)), bank=bank)
        banks.append(bank)
    return banks


def _naive(lib, W, model, ids, mask, fed_rows, banks, **kw):
    """Aligned naive logits (B, q, V) for per-row fed lists."""
    out = []
    for b, fed in enumerate(fed_rows):
        raw = lib.naive_row(W, ids[b], mask[b], fed, bank=None if banks is None else banks[b], **kw)
        out.append(lib.align(raw, fed, model.spec.shift_logits))
    return torch.stack(out)


def _run(model, ids, mask, plan, store=None):
    with torch.no_grad():
        return model(ids, mask, plan=plan, store=store)


# ------------------------------------------------------------------ exactness of refresh plans
@pytest.mark.parametrize("family", FAMILIES)
def test_refresh_plans_bit_identical_to_plain_forward(lib, family):
    model, _, ids, mask = _setup(lib, family)
    plain = _run(model, ids, mask, None)
    for plan in (ComputePlan.full(), ComputePlan.refresh(), ComputePlan.refresh(features=True)):
        store = CacheStore()
        assert torch.equal(_run(model, ids, mask, plan, store), plain), plan.name
    # dLLM-Cache plan that recomputes every position, reading K/V back from the store
    store = CacheStore()
    _run(model, ids, mask, ComputePlan.refresh(features=True), store)
    plan = ComputePlan.feature_step(P, refresh_prompt=True, refresh_response=True)
    assert torch.equal(_run(model, ids, mask, plan, store), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_store_holds_the_reference_kv(lib, family):
    model, W, ids, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids, mask, ComputePlan.refresh(features=True), store)
    banks = _naive_banks(lib, W, ids, mask)
    for li in range(model.arch.n_layers):
        for b in range(ids.shape[0]):
            k = store.k[li][b].transpose(0, 1)                          # (L, Hkv, D)
            torch.testing.assert_close(k, banks[b][li]["k"], **TIGHT)
            torch.testing.assert_close(store.v[li][b].transpose(0, 1), banks[b][li]["v"], **TIGHT)
            torch.testing.assert_close(store.attn[li][b], banks[b][li]["attn"], **TIGHT)
            torch.testing.assert_close(store.ffn[li][b], banks[b][li]["ffn"], **TIGHT)
    assert bool(store.kv_valid.all())


# ------------------------------------------------------------------ everything fresh == full
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_plans_with_fresh_cache_equal_full_forward(lib, family):
    model, _, ids, mask = _setup(lib, family)
    raw_full = _run(model, ids, mask, ComputePlan.full().with_(shift=False))
    index = torch.tensor([[6, 7, 10, 11], [2, 6, 9, 13], [7, 8, 9, 13]])
    plans = [ComputePlan.prefix_step(P), ComputePlan.dual_step(P, P + 4),
             ComputePlan.cached_window(P, L), ComputePlan.subset(index),
             ComputePlan.feature_step(P), ComputePlan.feature_step(P, rho=0.25, full_layers=(0,)),
             ComputePlan.feature_step(P, refresh_prompt=True, rho=0.5)]
    for plan in plans:
        store = CacheStore()
        _run(model, ids, mask, ComputePlan.refresh(features=True), store)
        got = _run(model, ids, mask, plan.with_(shift=False), store)
        q = plan.query_positions(L, ids.shape[0])
        want = raw_full.gather(1, q.unsqueeze(-1).expand(-1, -1, raw_full.shape[-1]))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=plan.name)


# ------------------------------------------------------------------ stale reuse == naive
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_fast_dllm_steps_reuse_stale_kv(lib, family, kind):
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(), store)
    banks = _naive_banks(lib, W, ids0, mask)
    s, e = P, P + 4
    ids1 = lib.commit(ids0, [6, 8], seed=11)
    ids2 = lib.commit(ids1, [7], seed=12)
    fed = list(range(s, L)) if kind == "prefix" else list(range(s, e))
    plan = ComputePlan.prefix_step(s) if kind == "prefix" else ComputePlan.dual_step(s, e)
    for x in (ids1, ids2):       # two steps: the second also sees the first step's writes
        got = _run(model, x, mask, plan, store)
        want = _naive(lib, W, model, x, mask, [fed] * 3, banks, keys="bank")
        torch.testing.assert_close(got, want, **TIGHT)
    # not vacuous: stale K/V give other logits than a full recomputation
    full = _run(model, ids2, mask, ComputePlan.full())[:, s:s + len(fed)]
    assert (got - full).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_window_is_truncated_canvas(lib, family):
    model, W, ids, mask = _setup(lib, family)
    got = _run(model, ids, mask, ComputePlan.window(0, 10))
    torch.testing.assert_close(got, _run(model, ids[:, :10], mask[:, :10], None), rtol=1e-12, atol=1e-12)
    got = _run(model, ids, mask, ComputePlan.window(4, 12))
    want = _naive(lib, W, model, ids, mask, [list(range(4, 12))] * 3, None)
    torch.testing.assert_close(got, want, **TIGHT)
    if family == "dream":   # reference in-window shift: first position keeps its own logit
        raw = _run(model, ids, mask, ComputePlan.window(4, 12).with_(shift=False))
        assert torch.equal(got[:, 0], raw[:, 0]) and torch.equal(got[:, 1:], raw[:, :-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_apd_cached_window(lib, family):
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(), store)
    banks = _naive_banks(lib, W, ids0, mask)
    ids1 = lib.commit(ids0, [6], seed=21)
    ids2 = lib.commit(ids1, [7, 8], seed=22)
    for x, (l, r) in ((ids1, (6, 11)), (ids2, (8, 13))):
        got = _run(model, x, mask, ComputePlan.cached_window(l, r), store)
        want = _naive(lib, W, model, x, mask, [list(range(l, r))] * 3, banks, keys="bank", key_end=r)
        torch.testing.assert_close(got, want, **TIGHT)
    assert got.shape[1] == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_dllm_cache_interval_refresh_with_v_verify(lib, family):
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(features=True), store)
    banks = _naive_banks(lib, W, ids0, mask)
    ids1 = lib.commit(ids0, [6, 9], seed=31)
    ids2 = lib.commit(ids1, [[7, 12], [10], [8, 13, 11]], seed=32)
    ids3 = lib.commit(ids2, [11], seed=33)
    ids4 = lib.commit(ids3, [[13], [6], [12]], seed=34)
    steps = [  # (canvas, plan, naive kwargs)
        (ids1, ComputePlan.feature_step(P, refresh_prompt=True, rho=0.25, full_layers=(0,)),
         dict(recompute=list(range(P)), verify=(P, L), rho=0.25, full_layers=(0,))),
        # upstream always recomputes layer 0 in full; it also keeps the V-verify ranking away
        # from near-ties (unchanged positions have cosine 1 up to rounding at layer 0)
        (ids2, ComputePlan.feature_step(P, rho=0.5, full_layers=(0,)),
         dict(recompute=[], verify=(P, L), rho=0.5, full_layers=(0,))),
        (ids3, ComputePlan.feature_step(P, refresh_response=True),
         dict(recompute=list(range(P, L)))),
        (ids4, ComputePlan.feature_step(P), dict(recompute=[])),
    ]
    for x, plan, kw in steps:
        got = _run(model, x, mask, plan, store)
        want = _naive(lib, W, model, x, mask, [list(range(L))] * 3, banks, keys="bank", **kw)
        torch.testing.assert_close(got, want, **TIGHT)
        full = _run(model, x, mask, ComputePlan.full())
        assert (got - full)[mask].abs().max() > 1e-6   # stale features really are reused


@pytest.mark.parametrize("family", FAMILIES)
def test_slowfast_truncated_over_dllm_cache(lib, family):
    """SlowFast's fast phase over dLLM-Cache: the canvas is cut at e, features are reused."""
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(features=True), store)
    banks = _naive_banks(lib, W, ids0, mask)
    ids1 = lib.commit(ids0, [6, 8, 12], seed=81)
    e = 12
    plan = ComputePlan.feature_step(P, rho=0.5, full_layers=(0,), end=e)
    got = _run(model, ids1, mask, plan, store)
    want = _naive(lib, W, model, ids1, mask, [list(range(e))] * 3, banks, keys="bank", key_end=e,
                  recompute=[], verify=(P, e), rho=0.5, full_layers=(0,))
    assert got.shape[1] == e
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("refresh", [False, True])
def test_per_row_cut_over_dllm_cache(lib, family, refresh):
    """Rows cut at different ends in one batched feature step (SlowFast + dLLM-Cache, rows in
    different cycles): each row computes, writes and verifies exactly what it would alone, and
    nothing is written for a row past its cut."""
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(features=True), store)
    banks = _naive_banks(lib, W, ids0, mask)
    ids1 = lib.commit(ids0, [[6, 8], [7, 12], [6, 9, 10]], seed=91)
    ends = [10, L, 12]
    limit = torch.tensor(ends)
    before = {name: [t.clone() for t in getattr(store, name)] for name in ("k", "v", "attn", "ffn")}
    plan = ComputePlan.feature_step(P, refresh_response=refresh, rho=0.5, full_layers=(0,))
    got = _run(model, ids1, mask, plan.with_(key_limit=limit), store)
    for b, e in enumerate(ends):
        kw = dict(recompute=list(range(P, e))) if refresh else dict(recompute=[], verify=(P, e), rho=0.5)
        raw = lib.naive_row(W, ids1[b], mask[b], list(range(e)), bank=banks[b], keys="bank", key_end=e,
                            full_layers=(0,), **kw)
        want = lib.align(raw, list(range(e)), model.spec.shift_logits)
        torch.testing.assert_close(got[b, :e], want, **TIGHT)
        for li in range(1, model.arch.n_layers):   # layer 0 is a full layer: it writes every fed row
            for name in ("k", "v", "attn", "ffn"):
                t, old = getattr(store, name)[li][b], before[name][li][b]
                if name in ("k", "v"):
                    t, old = t.transpose(0, 1), old.transpose(0, 1)      # (L, Hkv, D)
                assert torch.equal(t[e:], old[e:]), (name, li, b)
                torch.testing.assert_close(t[:e], banks[b][li][name][:e], **TIGHT)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_cut_refresh_writes_only_inside(lib, family):
    model, W, ids0, mask = _setup(lib, family)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(features=True), store)
    k_before = [t.clone() for t in store.k]
    ids1 = lib.commit(ids0, [7, 9], seed=92)
    limit = torch.tensor([9, L, 11])
    got = _run(model, ids1, mask, ComputePlan.refresh(features=True).with_(key_limit=limit), store)
    for b, e in enumerate(limit.tolist()):
        alone = _run(model, ids1[b:b + 1, :e], mask[b:b + 1, :e], None)
        torch.testing.assert_close(got[b:b + 1, :e], alone, rtol=1e-12, atol=1e-12)
        for li, t in enumerate(store.k):
            assert torch.equal(t[b, :, e:], k_before[li][b, :, e:])


def test_shift_from_gives_own_logit_per_row(lib):
    model, _, ids, mask = _setup(lib, "dream")
    raw = _run(model, ids, mask, ComputePlan.window(0, L).with_(shift=False))
    got = _run(model, ids, mask, ComputePlan.window(0, L).with_(shift_from=torch.tensor([P, 9, 0])))
    for b, own in enumerate((P, 9, 0)):
        for p in range(L):
            want = raw[b, p] if p in (own, 0) else raw[b, p - 1]
            assert torch.equal(got[b, p], want), (b, p)


@pytest.mark.parametrize("family", FAMILIES)
def test_v_verify_recomputes_only_least_similar(lib, family):
    """rho = 0 vs rho = 1 bracket the V-verify step; rho = 1 recomputes the whole response."""
    model, W, ids0, mask = _setup(lib, family)
    ids1 = lib.commit(ids0, [6, 7, 8], seed=41)
    outs = {}
    for rho in (0.0, 1.0):
        store = CacheStore()
        _run(model, ids0, mask, ComputePlan.refresh(features=True), store)
        outs[rho] = _run(model, ids1, mask, ComputePlan.feature_step(P, refresh_prompt=True, rho=rho), store)
        store2 = CacheStore()
        _run(model, ids0, mask, ComputePlan.refresh(features=True), store2)
        resp = _run(model, ids1, mask, ComputePlan.feature_step(P, refresh_prompt=True,
                                                                 refresh_response=True), store2)
    # rho = 1: every response position recomputed == full refresh of the response
    torch.testing.assert_close(outs[1.0], resp, rtol=1e-12, atol=1e-12)
    assert (outs[0.0] - resp)[mask].abs().max() > 1e-6


def _subset_expected(lib, W, model, ids, mask, index, pad, banks, L):
    """What an index plan returns, from the naive forward: each row feeds only its real slots
    (padding slots write nothing and take no part, so leaving them out changes no other query);
    position p is predicted by the output at p (LLaDA family, p real) or at p - 1 (shifted
    family, p - 1 real); a column whose position gets no prediction repeats the nearest one
    before it that does (after it, for leading ones)."""
    shift = 1 if model.spec.shift_logits else 0
    logits, positions = [], []
    for b, row in enumerate(index.tolist()):
        fed = [p for j, p in enumerate(row) if pad is None or not pad[b, j]]
        raw = lib.naive_row(W, ids[b], mask[b], fed, bank=banks[b], keys="bank")
        slot = {p: k for k, p in enumerate(fed)}
        ok = [j for j, p in enumerate(row) if p - shift in slot]
        cols, pos = [], []
        for j in range(len(row)):
            src = max([r for r in ok if r <= j], default=min(ok))
            cols.append(raw[slot[row[src] - shift]])
            pos.append(row[src])
        logits.append(torch.stack(cols))
        positions.append(pos)
    return torch.stack(logits), torch.tensor(positions)


def _run_out(model, ids, mask, plan, store=None):
    with torch.no_grad():
        return model.execute(ids, mask, plan=plan, store=store)


@pytest.mark.parametrize("family", FAMILIES)
def test_dkv_delayed_subset(lib, family):
    model, W, ids0, mask = _setup(lib, family)
    store = model.new_store()
    _run(model, ids0, mask, ComputePlan.refresh(), store)
    banks = _naive_banks(lib, W, ids0, mask)
    # step 1: row-specific query sets (still-masked + just-decoded positions), own RoPE positions;
    # in a shifted family a fed position whose predecessor is not fed gets no prediction
    ids1 = lib.commit(ids0, [[6], [9], [13]], seed=51)
    index = torch.tensor([[6, 7, 10, 11], [8, 9, 12, 13], [7, 11, 12, 13]])
    out = _run_out(model, ids1, mask, ComputePlan.subset(index), store)
    want, pos = _subset_expected(lib, W, model, ids1, mask, index, None, banks, L)
    torch.testing.assert_close(out.logits, want, **TIGHT)
    assert out.positions.tolist() == pos.tolist()
    if family == "dream":
        assert out.positions[0].tolist() == [7, 7, 7, 11]
    # step 2 from a bool mask with unequal counts: topped up with the smallest other positions,
    # padding slots (their stored K/V stay, they take no part); with the model's shift every
    # fed p's prediction for p + 1 joins the index
    ids2 = lib.commit(ids1, [[7], [8], [12]], seed=52)
    sel = torch.zeros(3, L, dtype=torch.bool)
    sel[0, [7, 10, 11]] = True
    sel[1, [5, 12]] = True
    sel[2, [9, 10, 11]] = True
    shift = store.shift
    plan = ComputePlan.subset(sel, shift=shift)
    if family == "llada":
        assert plan.query_positions(L)[1].tolist() == [0, 5, 12]
        assert plan.index_pad.tolist() == [[False] * 3, [True, False, False], [False] * 3]
    else:
        assert plan.query_positions(L)[1].tolist() == [0, 5, 6, 12, 13]
        assert plan.index_pad[1].tolist() == [True, False, True, False, True]
    k_before = [k.clone() for k in store.k]
    out = _run_out(model, ids2, mask, plan, store)
    want, pos = _subset_expected(lib, W, model, ids2, mask, plan.index, plan.index_pad, banks, L)
    torch.testing.assert_close(out.logits, want, **TIGHT)
    assert out.positions.tolist() == pos.tolist()
    assert out.positions[1].tolist() == ([5, 5, 12] if family == "llada" else [6, 6, 6, 6, 13])
    assert all(torch.equal(k[1, :, 0], k0[1, :, 0]) for k, k0 in zip(store.k, k_before))   # top-up kept
    assert not all(torch.equal(k[1, :, 5], k0[1, :, 5]) for k, k0 in zip(store.k, k_before))


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_rows_compute_what_they_would_alone(lib, family):
    """A padded batch of subset plans topped up to a common width: every row's logits (columns
    that predict something) and store writes equal those of the row fed alone."""
    model, W, ids0, mask = _setup(lib, family)
    sel = torch.zeros(3, L, dtype=torch.bool)
    sel[0, [6, 7, 8, 9, 10, 11, 12]] = True
    sel[1, [9, 13]] = True
    sel[2, [7, 8, 12]] = True
    ids1 = lib.commit(ids0, [[6], [9], [13]], seed=61)
    store = model.new_store()
    _run(model, ids0, mask, ComputePlan.refresh(), store)
    batch = _run_out(model, ids1, mask, ComputePlan.subset(sel, shift=store.shift), store)
    for b in range(3):
        alone = model.new_store()
        _run(model, ids0[b:b + 1], mask[b:b + 1], ComputePlan.refresh(), alone)
        one = _run_out(model, ids1[b:b + 1], mask[b:b + 1], ComputePlan.subset(sel[b:b + 1], shift=alone.shift), alone)
        got = dict(zip(batch.positions[b].tolist(), batch.logits[b]))
        want = dict(zip(one.positions[0].tolist(), one.logits[0]))
        assert got.keys() == want.keys()
        for p in want:
            torch.testing.assert_close(got[p], want[p], rtol=1e-12, atol=1e-12)
        for k, k1 in zip(store.k, alone.k):
            torch.testing.assert_close(k[b], k1[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_are_returned_and_kept(lib, family):
    """plan.attention: per layer the head-mean attention probabilities of the fed queries over
    the keys, equal to the naive forward's; logits equal the plan without them (explicit
    softmax instead of the fused kernel: equal up to rounding); the store keeps the last ones."""
    model, W, ids0, mask = _setup(lib, family)
    store = model.new_store()
    full = _run_out(model, ids0, mask, ComputePlan.refresh().with_(attention=True), store)
    assert store.attention is full.attention and len(full.attention) == model.arch.n_layers
    torch.testing.assert_close(full.logits, _run(model, ids0, mask, None), rtol=1e-12, atol=1e-12)
    for b in range(3):
        probs = []
        lib.naive_row(W, ids0[b], mask[b], list(range(L)), attention=probs)
        for layer, p in enumerate(probs):
            torch.testing.assert_close(full.attention[layer][b], p, **TIGHT)
            assert float(full.attention[layer][b][:, ~mask[b]].abs().sum()) == 0.0     # pads are no keys
    banks = _naive_banks(lib, W, ids0, mask)
    ids1 = lib.commit(ids0, [[6], [9], [13]], seed=71)
    index = torch.tensor([[6, 7, 10, 11], [8, 9, 12, 13], [7, 11, 12, 13]])
    plain_store = model.new_store()
    _run(model, ids0, mask, ComputePlan.refresh(), plain_store)
    plain = _run_out(model, ids1, mask, ComputePlan.subset(index), plain_store)
    out = _run_out(model, ids1, mask, ComputePlan.subset(index, attention=True), store)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-12, atol=1e-12)
    for b in range(3):
        probs = []
        lib.naive_row(W, ids1[b], mask[b], index[b].tolist(), bank=banks[b], keys="bank", attention=probs)
        for layer, p in enumerate(probs):
            assert out.attention[layer][b].shape == (4, L)
            torch.testing.assert_close(out.attention[layer][b], p, **TIGHT)
    assert store.attention is out.attention
    with pytest.raises(ValueError, match="attention"):
        ComputePlan.feature_step(P).with_(attention=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_out_start_skips_prompt_logits(lib, family):
    model, _, ids, mask = _setup(lib, family)
    full = _run(model, ids, mask, None)
    got = _run(model, ids, mask, ComputePlan.full(out_start=P))
    torch.testing.assert_close(got, full[:, P:], rtol=1e-12, atol=1e-12)
    assert ComputePlan.full(out_start=P).query_positions(L).tolist() == [list(range(P, L))]


# ------------------------------------------------------------------ the store
def test_stores_are_independent(lib):
    model, _, ids0, mask = _setup(lib, "llada")
    ids1 = lib.commit(ids0, [6, 7, 8, 9], seed=61)
    a, b = CacheStore(), CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(), a)
    step = ComputePlan.dual_step(P, P + 4)
    before = _run(model, ids0, mask, step, a)
    _run(model, ids1, mask, ComputePlan.refresh(), b)
    _run(model, ids1, mask, step, b)
    assert torch.equal(_run(model, ids0, mask, step, a), before)
    assert not torch.equal(_run(model, ids0, mask, step, b), before)


def test_store_errors_and_clear(lib):
    model, _, ids, mask = _setup(lib, "dream")
    with pytest.raises(ValueError, match="store=None"):
        _run(model, ids, mask, ComputePlan.refresh())
    store = CacheStore()
    with pytest.raises(RuntimeError, match="refresh"):
        _run(model, ids, mask, ComputePlan.prefix_step(P), store)
    _run(model, ids, mask, ComputePlan.refresh(), store)
    with pytest.raises(RuntimeError, match="features"):
        _run(model, ids, mask, ComputePlan.feature_step(P), store)
    with pytest.raises(ValueError, match="clear"):
        _run(model, ids[:, :-1], mask[:, :-1], ComputePlan.prefix_step(P), store)
    assert store.nbytes() > 0
    store.clear()
    assert store.nbytes() == 0 and not store.has_kv
    with pytest.raises(RuntimeError):
        _run(model, ids, mask, ComputePlan.dual_step(P, L), store)


def test_select_rows(lib):
    model, _, ids0, mask = _setup(lib, "dream")
    ids1 = lib.commit(ids0, [6, 7], seed=71)
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(), store)
    plan = ComputePlan.prefix_step(P)
    all_rows = _run(model, ids1, mask, plan, store)
    rows = torch.tensor([2, 0])
    store.select_rows(rows)
    torch.testing.assert_close(_run(model, ids1[rows], mask[rows], plan, store), all_rows[rows],
                               rtol=1e-12, atol=1e-12)


def test_plan_validation():
    with pytest.raises(ValueError):
        ComputePlan(keys="nope")
    with pytest.raises(ValueError):
        ComputePlan(reuse_features=True)                 # needs keys='store'
    with pytest.raises(ValueError):
        ComputePlan(verify=(0, 4), verify_rho=0.5)      # verify without feature reuse
    with pytest.raises(ValueError):
        ComputePlan(index=torch.zeros(1, 2, dtype=torch.long), keys="store", reuse_features=True)
    with pytest.raises(ValueError):
        ComputePlan.window(5, 3)
    assert ComputePlan.window(2, 6).num_queries(10) == 4
    assert ComputePlan.dual_step(2, 6).query_positions(10, 3).shape == (3, 4)


# ------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("family", FAMILIES)
def test_flop_count_matches_torch_counter(lib, family):
    """The executor's FLOP count equals torch's FlopCounterMode over the same forward (linear
    layers, LM head) plus the attention matmuls, which torch does not count for the CPU SDPA
    kernel: 4 * B * H * D * queries * keys per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _, ids, mask = _setup(lib, family)
    a = model.arch
    B = ids.shape[0]
    hd = a.n_heads * a.head_dim
    store = CacheStore()
    # (plan, [(queries, keys)] per layer)
    cases = [(None, [(L, L)] * 2),
             (ComputePlan.refresh(features=True), [(L, L)] * 2),
             (ComputePlan.prefix_step(8), [(L - 8, L)] * 2),
             (ComputePlan.dual_step(8, 12), [(4, L)] * 2),
             (ComputePlan.window(0, 10).with_(out_start=4), [(10, 10)] * 2),
             (ComputePlan.feature_step(P, rho=0.25, full_layers=(0,)), [(L, L), (int(0.25 * G), L)]),
             (ComputePlan.feature_step(P, refresh_prompt=True, rho=0.5), [(P + int(0.5 * G), L)] * 2),
             (ComputePlan.feature_step(P, refresh_response=True, end=12), [(12 - P, 12)] * 2)]
    for plan, per_layer in cases:
        before = store.flops
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids, mask, plan=plan, store=store)
        attention = sum(4 * B * hd * n * k for n, k in per_layer)
        assert store.flops - before == counter.get_total_flops() + attention, plan and plan.name


# ------------------------------------------------------------------ sparse feeds (DPad)
def _kept_rows():
    """Per-row kept positions (different counts): rows 0 and 1 drop parts of the masked tail."""
    kept = [list(range(10)) + [12], list(range(9)) + [11, 13], list(range(L))]
    keep = torch.zeros(3, L, dtype=torch.bool)
    for b, ps in enumerate(kept):
        keep[b, ps] = True
    return kept, keep


def _predicted(out, b):
    """Row b of an index feed's output as {canvas position: logits}."""
    return dict(zip(out.positions[b].tolist(), out.logits[b]))


def _expected(raw, fed, index, shift, shift_from=None):
    """{position: logits} an index feed should return for one row, from the naive raw outputs of
    its real slots `fed`: position p of the index is predicted by the output at p (unshifted,
    p real) or at p - 1 (shifted, p - 1 real; or p's own at shift_from)."""
    slot = {p: j for j, p in enumerate(fed)}
    if not shift:
        return {p: raw[slot[p]] for p in index if p in slot}
    want = {p: raw[slot[p - 1]] for p in index if p - 1 in slot}
    if shift_from in slot and shift_from - 1 not in slot:
        want[shift_from] = raw[slot[shift_from]]
    return want


def _assert_rows_match(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for p in want:
        torch.testing.assert_close(got[p], want[p], **TIGHT)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_feeds_each_row_its_own_positions(lib, family):
    """ComputePlan.sparse with keep: each row sees only its kept positions (the pruned canvas of
    DPad's suffix dropout), whatever the other rows keep: top-up slots are neither keys nor read."""
    model, W, ids, mask = _setup(lib, family)
    kept, keep = _kept_rows()
    plan = ComputePlan.sparse(keep, keep=keep)
    assert plan.index.shape == (3, L) and plan.index_pad.sum(1).tolist() == [3, 3, 0]
    got = _run_out(model, ids, mask, plan)
    for b, fed in enumerate(kept):
        raw = lib.naive_row(W, ids[b], mask[b], fed)
        want = _expected(raw, fed, plan.index[b].tolist(), model.spec.shift_logits)
        _assert_rows_match(_predicted(got, b), want)
        alone = ComputePlan.sparse(keep[b:b + 1], keep=keep[b:b + 1])
        one = _predicted(_run_out(model, ids[b:b + 1], mask[b:b + 1], alone), 0)
        _assert_rows_match(one, {p: want[p] for p in one})


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_prefix_step_over_kept_store(lib, family):
    """DPad with the prefix cache: a kept refresh fills the store, then each row feeds its span
    and kept tail (own window start per row) against it; positions outside keep stay out of the
    keys even where an earlier forward wrote them, and top-ups write nothing."""
    model, W, ids0, mask = _setup(lib, family)
    kept, keep = _kept_rows()
    store = CacheStore()
    _run(model, ids0, mask, ComputePlan.refresh(), store)     # K/V everywhere: keep must hide some
    _run(model, ids0, mask, ComputePlan.sparse(keep, keys="store", keep=keep), store)
    banks = []
    for b, fed in enumerate(kept):
        bank = lib.new_bank(W, L)
        lib.naive_row(W, ids0[b], mask[b], fed, bank=bank)
        banks.append(bank)
    before = [t.clone() for t in store.k]
    ids1 = lib.commit(ids0, [[6], [7], [8]], seed=81)
    starts = [6, 7, 8]
    cols = torch.arange(L)[None, :]
    fed_mask = keep & (cols >= torch.tensor(starts)[:, None])
    plan = ComputePlan.sparse(fed_mask, keys="store", keep=keep).with_(shift_from=torch.tensor(starts))
    got = _run_out(model, ids1, mask, plan, store)
    for b, fed in enumerate(kept):
        step = [p for p in fed if p >= starts[b]]
        raw = lib.naive_row(W, ids1[b], mask[b], step, bank=banks[b], keys="bank")
        want = _expected(raw, step, plan.index[b].tolist(), model.spec.shift_logits, starts[b])
        assert starts[b] in want
        _assert_rows_match(_predicted(got, b), want)
        # positions the row did not feed kept their stored K/V (top-ups included)
        quiet = [p for p in range(L) if p < starts[b]]
        torch.testing.assert_close(store.k[0][b, :, quiet], before[0][b, :, quiet], rtol=0, atol=0)


def test_sparse_plan_validation():
    keep = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        ComputePlan(keep=keep.long())
    with pytest.raises(ValueError):
        ComputePlan(index_pad=torch.zeros(2, 3, dtype=torch.bool))            # no index
    with pytest.raises(ValueError):
        ComputePlan.feature_step(2).with_(keep=keep)                           # feature reuse
    plan = ComputePlan.sparse(keep, keep=keep)
    assert plan.repeat_rows(2).keep.shape == (4, 4) and plan.repeat_rows(2).index_pad.shape == (4, 4)


# ------------------------------------------------------------------ layer-adaptive forwards (Elastic-Cache)
def _first_true(mask, k):
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return idx, ~mask.gather(1, idx)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gamma", [0.0, 0.96, 2.0], ids=["never", "some", "always"])
def test_layer_adaptive_step_matches_the_reference_per_row(lib, family, gamma):
    """A refresh with write_hidden, then a sparse step with a drift test, on a left-padded batch:
    each row's logits, switch layer and most-attended tokens equal tests/reference_elastic.py's
    batch-1 forward on the row without padding (rows switch at their own layers: the batch runs
    full width once one has, the others recomputing only what they were fed)."""
    import reference_elastic as ref
    from dllm_decode.models import Drift

    model, W, ids0, mask = _setup(lib, family)
    shift, n_layers = model.spec.shift_logits, len(W.layers)
    B = ids0.shape[0]
    cols = torch.arange(L)[None, :]
    store = CacheStore()
    watch = torch.arange(P, P + 4).expand(B, 4)                             # the first window
    _run(model, ids0, mask, ComputePlan(write_kv=True, write_hidden=True, drift=Drift(gamma=gamma, watch=watch)), store)
    # the tracked tokens: per layer the most attended non-masked key
    mass = store.attn_mass.masked_fill((cols >= P)[:, None, :], 0.0).masked_fill(~mask[:, None, :], float("-inf"))
    track = torch.zeros(B, L, dtype=torch.bool).scatter_(1, mass.topk(1, dim=-1).indices.flatten(1), True)
    probe, probe_pad = _first_true(track, n_layers)
    ids1 = lib.commit(ids0, [7, 9], seed=91)                                # decoded by the first step
    new = torch.zeros(B, L, dtype=torch.bool)
    new[:, [7, 9]] = True
    win = (cols >= P) & ~new
    win &= win.cumsum(1) <= 4                                               # the next window
    before = torch.zeros_like(win)
    before[:, :-1] = win[:, 1:]
    watch2 = win.nonzero()[:, 1].view(B, 4)
    step = ComputePlan.sparse(track | new, out=win | before, keys="store", write_hidden=True,
                              drift=Drift(gamma=gamma, watch=watch2, probe=probe, probe_pad=probe_pad))
    got = _run(model, ids1, mask, step, store)
    q = step.query_positions(L)
    for b in range(B):
        pad = int((~mask[b]).sum())
        C = ref._Caches(W, L - pad)
        ref._forward(W, ids0[b, pad:], C, list(range(L - pad)), [p - pad - shift for p in range(P, P + 4)],
                     list(range(P - pad, L - pad)), -1, gamma, 1)
        assert sorted({t + pad for layer in C.track for t in layer}) == torch.nonzero(track[b]).flatten().tolist()
        rows = [int(p) - pad - shift for p in watch2[b]]
        query = list(dict.fromkeys(ref._track_positions(C) + [7 - pad, 9 - pad] + rows))
        masked = [p - pad for p in range(P, L) if p not in (7, 9)]
        raw, start = ref._forward(W, ids1[b, pad:], C, query, rows, masked, n_layers, gamma, 1)
        assert int(store.refresh_from[b]) == start, (b, gamma)
        mine = torch.stack([got[b, q[b].tolist().index(int(p))] for p in watch2[b]])
        torch.testing.assert_close(mine, raw, **TIGHT)
    switched = store.refresh_from.tolist()
    assert switched == {0.0: [n_layers] * B, 2.0: [1] * B}.get(gamma, switched)
    if gamma == 0.96:                       # this gamma splits the rows: some switch, some do not
        assert 1 in switched and n_layers in switched


def test_layer_adaptive_plan_validation(lib):
    from dllm_decode.models import Drift

    watch = torch.zeros(1, 2, dtype=torch.long)
    drift = Drift(gamma=0.9, watch=watch)
    with pytest.raises(ValueError, match="write_hidden"):
        ComputePlan(write_kv=True, drift=drift)
    with pytest.raises(ValueError, match="keys='store'"):
        ComputePlan(write_kv=True, write_hidden=True, drift=Drift(gamma=0.9, watch=watch, probe=watch))
    with pytest.raises(ValueError):
        ComputePlan(write_hidden=True)                                      # writes nothing
    with pytest.raises(ValueError):
        ComputePlan.sparse(torch.ones(1, 4, dtype=torch.bool), keep=torch.ones(1, 4, dtype=torch.bool),
                           keys="store", write_hidden=True)
    assert ComputePlan(write_kv=True, write_hidden=True, drift=drift).repeat_rows(2).drift.watch.shape == (2, 2)
    model, _, ids, mask = _setup(lib, "llada")
    fed = torch.ones(ids.shape, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="hidden"):                      # nothing to resume from
        _run(model, ids, mask, ComputePlan.sparse(fed, keys="store", write_hidden=True), CacheStore())
    with pytest.raises(ValueError, match="whole canvas"):
        _run(model, ids, mask, ComputePlan(end=8, write_kv=True, write_hidden=True), CacheStore())
