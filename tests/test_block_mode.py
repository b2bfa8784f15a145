"""Block-causal requests (dllm_decode/block_mode.py) and their exact KV cache (caches/block_kv.py):
token parity with SDAR's official decoder re-derived in tests/reference_sdar.py, alone and in a
padded batch, the cache bit for bit against the uncached block-causal forward, per-row stopping,
and the refusals."""

import pytest
import torch

from dllm_decode import Decoder, load_recipe
from dllm_decode.block_mode import block_starts
from dllm_decode.errors import RecipeError
from dllm_decode.models import CacheStore, build_random_model
from dllm_decode.recipes import find_recipe
from reference_fdv2 import fdv2_generate
from reference_sdar import llada2_generate, sdar_generate

MASK, EOS, PAD = 47, 1, 0
PROMPTS = [[5, 9, 12, 3, 7], [20, 4], [8, 9, 10, 11, 12, 13, 14, 15], [30, 31, 32, 33, 34, 35, 36]]


@pytest.fixture(scope="module")
def sdar():
    return build_random_model("sdar", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, seed=4,
                              dtype=torch.float64, block_size=4).eval()


def whole_batch(dec, state):
    """The step's forward over every row of the batch: a plain forward leaves finished rows out,
    and a row's last bits depend on the rows it runs beside, so the uncached forward runs the
    cached one's batch for their bits to compare."""
    state.live_rows = None
    return dec.forward(state, dec.begin_step(state))


def recipe(select="llada", cache="block_kv", gen=16, block=4, per_block=4, threshold=0.05, stop=(), batch=4):
    sets = [f"cache_policy={cache}", f"generation.gen_length={gen}", f"generation.block_length={block}",
            f"generation.steps={gen // block * per_block}", f"generation.batch_size={batch}",
            f"generation.eos.ids={list(stop)}"]
    if select == "threshold":
        sets += ["select_tokens.plugin=threshold", f"select_tokens.threshold={threshold}"]
    return load_recipe("llada", sets)


def reference(model, prompts, **kw):
    return [sdar_generate(model, p, mask_id=MASK, **kw)[0] for p in prompts]


@pytest.mark.parametrize("cache", ["block_kv", "none"])
@pytest.mark.parametrize("batch", [1, 4])
def test_static_schedule_matches_sdar(sdar, cache, batch):
    """One token per step (SDAR's defaults: block 4, 4 steps), prompts ending anywhere in a block."""
    got = Decoder(sdar, recipe(cache=cache, batch=batch)).generate(PROMPTS).tokens
    assert got == reference(sdar, PROMPTS, gen_length=16, block=4, steps=4, stop_ids=())


def test_two_per_step_matches_sdar_on_whole_blocks():
    """Blocks of 8 in 4 steps (two tokens per step) with prompts that fill whole blocks, where the
    mask count of the first block is the block length (SDAR splits the block length, LLaDA the masks)."""
    model = build_random_model("sdar", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, seed=5,
                               dtype=torch.float64, block_size=8).eval()
    prompts = [list(range(2, 10)), list(range(10, 26))]
    got = Decoder(model, recipe(gen=24, block=8, per_block=4, batch=2)).generate(prompts).tokens
    assert got == reference(model, prompts, gen_length=24, block=8, steps=4, stop_ids=())


@pytest.mark.parametrize("batch", [1, 4])
def test_dynamic_threshold_matches_sdar(sdar, batch):
    """SDAR's low_confidence_dynamic at one token per step: every mask above the threshold, at
    least one (Fast-dLLM's threshold rule, as the ``threshold`` plugin commits it)."""
    dec = Decoder(sdar, recipe("threshold", threshold=0.045, batch=batch))
    res = dec.generate(PROMPTS)
    assert res.tokens == reference(sdar, PROMPTS, gen_length=16, block=4, steps=4,
                                   strategy="low_confidence_dynamic", threshold=0.045, stop_ids=())
    # the threshold took several tokens in some steps: the test exercises the parallel path
    assert sum(r.nfe for r in res.rows) < sum(len(r.tokens) for r in res.rows)


def test_rows_stop_at_the_block_where_a_stop_id_appears(sdar):
    """Native variable length: a row stops after the block in which a stop id was committed, per
    row in a padded batch; the others go on to their full length."""
    common = [t for row in reference(sdar, PROMPTS, gen_length=16, block=4, steps=4) for t in row]
    stop = max(set(common), key=common.count)                 # a token these rows do produce
    want = reference(sdar, PROMPTS, gen_length=16, block=4, steps=4, stop_ids=(stop,))
    res = Decoder(sdar, recipe(stop=[stop])).generate(PROMPTS)
    assert res.tokens == want
    full = reference(sdar, PROMPTS, gen_length=16, block=4, steps=4)
    assert [len(r) for r in want] != [len(r) for r in full]       # somebody stopped early
    assert any(len(w) == len(f) for w, f in zip(want, full))      # and somebody did not


def test_the_cache_is_exact_bit_for_bit(sdar):
    """Every step's logits for the positions both plans return are identical bits with the cache
    and with a plain block-causal forward of the whole canvas; the cached forwards feed less."""
    decs = {c: Decoder(sdar, recipe(cache=c)) for c in ("block_kv", "none")}
    states = {c: d.start(PROMPTS) for c, d in decs.items()}
    fed = {c: 0 for c in decs}
    for step in range(200):
        outs = {}
        for c, d in decs.items():
            outs[c] = whole_batch(d, states[c])
            fed[c] += outs[c].logits.shape[1]
        cached, full = outs["block_kv"], outs["none"]
        lo = cached.positions[0, 0]
        assert torch.equal(cached.logits, full.logits[:, lo:]), f"step {step}"
        done = [d.end_step(states[c], outs[c]) for c, d in decs.items()]
        assert torch.equal(states["block_kv"].x, states["none"].x)
        assert done[0] == done[1]
        if done[0]:
            break
    assert fed["block_kv"] < fed["none"] / 2


def test_a_finished_row_does_not_hold_the_feed_back(sdar):
    """Rows of a batch stop at their own blocks: once a row has finished, the steps feed the blocks of
    the rows still decoding (at most three blocks: rows' blocks sit at their own columns, and a step
    also feeds the block finished last), not the range from the finished row's end, which grew with
    every block the others decoded. The rows still decoding get the same logit bits as from the uncached
    forward, and the batch the same tokens."""
    full = reference(sdar, PROMPTS, gen_length=32, block=4, steps=4)
    early = [t for row in full for t in row[:8]]
    for stop in sorted(set(early), key=early.count, reverse=True):     # a stop id some rows meet early
        lengths = [len(r) for r in reference(sdar, PROMPTS, gen_length=32, block=4, steps=4, stop_ids=(stop,))]
        if min(lengths) <= 8 and max(lengths) >= 24:
            break
    decs = {c: Decoder(sdar, recipe(cache=c, gen=32, stop=[stop])) for c in ("block_kv", "none")}
    states = {c: d.start(PROMPTS) for c, d in decs.items()}
    widths = []
    for step in range(200):
        outs = {c: whole_batch(d, states[c]) for c, d in decs.items()}
        cached, whole = outs["block_kv"], outs["none"]
        widths.append(cached.logits.shape[1])
        live = states["none"].masked.any(1)                       # a finished row's logits are read by nobody
        assert torch.equal(cached.logits[live], whole.logits[live, cached.positions[0, 0]:]), f"step {step}"
        done = [d.end_step(states[c], outs[c]) for c, d in decs.items()]
        assert torch.equal(states["block_kv"].x, states["none"].x) and done[0] == done[1]
        if done[0]:
            break
    assert len(widths) >= 24 and max(widths[1:]) <= 3 * 4, widths


def test_store_is_widened_not_cleared_as_rows_grow(sdar):
    dec = Decoder(sdar, recipe())
    state = dec.start([PROMPTS[1]])
    widths, valid = [], []
    for state in dec.steps(state):
        if state.store.kv_valid is not None:
            widths.append(state.store.shape[1])
            valid.append(int(state.store.kv_valid[0].sum()))
    assert widths == sorted(widths) and widths[-1] > widths[0]
    assert valid == sorted(valid)                             # nothing written was ever dropped


def test_widen_keeps_values_at_their_positions():
    store = CacheStore()
    store.ensure_kv(2, 1, 2, 5, 3, torch.float64, torch.device("cpu"))
    store.k[0].normal_()
    store.kv_valid[0, :3] = True
    before = store.k[0].clone()
    store.widen(9)
    assert store.shape == (1, 9) and store.k[0].shape[2] == 9
    assert torch.equal(store.k[0][:, :, :5], before) and not store.k[0][:, :, 5:].any()
    assert store.kv_valid[0].tolist() == [True] * 3 + [False] * 6
    with pytest.raises(ValueError, match="shrink"):
        store.widen(4)


def test_widening_block_by_block_reallocates_rarely_and_keeps_every_write():
    """A canvas widened by a block at a time (the block-causal decode) reuses room kept past
    its end: 60 widenings by 4 reallocate a handful of times, not 60 (each a whole-cache copy);
    every value written before any widening stays, every new position reads zero, and rows
    selected out of a widened store widen correctly from their own copy."""
    store = CacheStore()
    store.ensure_kv(2, 2, 2, 8, 3, torch.float64, torch.device("cpu"))
    ref = torch.zeros(2, 2, 8, 3, dtype=torch.float64)
    ptrs = set()
    for L in range(12, 252, 4):
        store.widen(L)
        ref = torch.cat([ref, ref.new_zeros(2, 2, 4, 3)], dim=2)
        assert torch.equal(store.k[1], ref) and not store.kv_valid[:, L - 4:].any()
        new = torch.randn(2, 2, 4, 3, dtype=torch.float64)
        store.k[1][:, :, L - 4:] = new                   # the next block's keys, written in place
        ref[:, :, L - 4:] = new
        store.kv_valid[:, L - 4:] = True
        ptrs.add(store.k[1].data_ptr())
    assert len(ptrs) <= 12, len(ptrs)                    # 1.5x room: about log_1.5(252 / 12) copies
    assert store.nbytes() >= 4 * 2 * 2 * 248 * 3 * 8     # the room is counted, not only the canvas
    store.select_rows(torch.tensor([1]))
    store.widen(260)
    assert torch.equal(store.k[1], torch.cat([ref[1:], ref.new_zeros(1, 2, 12, 3)], dim=2))
    assert store.kv_valid[0].tolist() == [False] * 8 + [True] * 240 + [False] * 12


def test_keys_past_the_canvas_read_zeros_from_the_room_without_a_copy():
    """Block-causal attention spans keys past the canvas end: kv_upto gives the stored keys then
    zeros, a view of widen()'s room when there is one (no copy of the cache), a padded copy when
    there is none (a store never widened)."""
    store = CacheStore()
    store.ensure_kv(1, 2, 2, 6, 3, torch.float64, torch.device("cpu"))
    store.k[0].normal_()
    K, V = store.kv_upto(0, 9)                            # no room yet: a copy
    assert K.shape == (2, 2, 9, 3) and torch.equal(K[:, :, :6], store.k[0]) and not K[:, :, 6:].any()
    assert K.data_ptr() != store.k[0].data_ptr() and not V.any()
    store.widen(10)
    store.k[0][:, :, 6:10] = 1.0
    K, _ = store.kv_upto(0, 13)                           # 15 positions of room: a view
    assert K.data_ptr() == store.k[0].data_ptr()
    assert torch.equal(K[:, :, :10], store.k[0]) and not K[:, :, 10:].any()
    assert torch.equal(store.kv_upto(0, 4)[0], store.k[0][:, :, :4])


def test_row_lengths_follow_the_official_canvas(sdar):
    """A row generates up to ceil((P + gen_length) / block) * block - P positions."""
    res = Decoder(sdar, recipe()).generate(PROMPTS)
    assert [len(r.tokens) for r in res.rows] == [-(-(len(p) + 16) // 4) * 4 - len(p) for p in PROMPTS]


def test_refusals_name_the_key_or_plugin(sdar):
    with pytest.raises(RecipeError, match=r"generation.block_length is 8, but the block-causal model decodes one "
                                          r"block of 4 positions at a time"):
        Decoder(sdar, recipe(block=8, gen=16, per_block=8))
    with pytest.raises(RecipeError, match=r"resize_canvas: plugin 'daedal' moves columns"):
        Decoder(sdar, load_recipe("daedal", ["generation.block_length=4"]))
    llada = build_random_model("llada", vocab_size=48, d_model=32, n_layers=1, n_heads=4, mask_token_id=MASK)
    with pytest.raises(RecipeError, match=r"plugin 'block_kv' caches the blocks of a block-causal model, but "
                                          r"LLaDAModel is a llada model"):
        Decoder(llada, recipe())


def test_a_checkpoint_decodes_at_another_block_size(sdar, tmp_path):
    """load_model(block_size=) (recipe model.block_size) as SDAR's generate.py --block_length."""
    from dllm_decode.errors import CheckpointError
    from dllm_decode.models import load_model, save_pretrained

    save_pretrained(sdar, tmp_path / "sdar")
    eight, _ = load_model(tmp_path / "sdar", dtype="float64", tokenizer=False, block_size=8)
    assert eight.spec.block_size == 8
    res = Decoder(eight, recipe(block=8, gen=16, per_block=8)).generate(PROMPTS[:1])
    assert res.tokens == reference(eight, PROMPTS[:1], gen_length=16, block=8, steps=8)
    save_pretrained(build_random_model("llada", vocab_size=48, d_model=32, n_layers=1, n_heads=4,
                                       mask_token_id=MASK), tmp_path / "llada")
    with pytest.raises(CheckpointError, match="block_size 8 asked of a llada model"):
        load_model(tmp_path / "llada", tokenizer=False, block_size=8)


@pytest.mark.parametrize("batch", [1, 4])
def test_llada2_recipe_matches_llada2_generate(batch):
    """The shipped llada2 recipe (blocks of 32 on the model's blocks, one step per position, every
    mask above the threshold, at least one) against LLaDA2's generate() re-derived, on a tiny
    mixture-of-experts LLaDA2 in blocks of 8, with its EOS: tokens up to the first EOS."""
    model = build_random_model("llada2", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, seed=2,
                               dtype=torch.float64, block_size=8).eval()
    gen, thr = 24, 0.05
    common = [t for p in PROMPTS for t in llada2_generate(model, p, mask_id=MASK, eos_id=999, gen_length=gen,
                                                          block=8, steps=8, threshold=thr)[0]]
    stop = max(set(common), key=common.count)                # a token the model writes: stops some rows
    rec = load_recipe("llada2", [f"generation.gen_length={gen}", "generation.block_length=8",
                                 f"generation.steps={gen}", f"generation.batch_size={batch}",
                                 f"select_tokens.threshold={thr}", f"generation.eos.ids=[{stop}]"])
    rows = Decoder(model, rec).generate(PROMPTS).tokens
    got = [(r[:r.index(stop) + 1] if stop in r else r)[:gen] for r in rows]
    want = [llada2_generate(model, p, mask_id=MASK, eos_id=stop, gen_length=gen, block=8, steps=8,
                            threshold=thr)[0] for p in PROMPTS]
    assert got == want
    assert any(stop in w for w in want) and any(stop not in w for w in want)


def test_every_builtin_select_rule_runs_inside_blocks_or_is_refused_by_name(sdar):
    """Inside the blocks every built-in select_tokens plugin either decodes with every invariant
    holding, or is refused when the recipe meets the model, naming the plugin; the four rules
    that declare they follow a growing canvas run."""
    from dllm_decode.config import recipe_from_dict
    from dllm_decode.plugins import get_plugin_manager, list_plugins
    from dllm_decode.testing import check_invariants

    ran, refused = [], []
    for info in list_plugins(get_plugin_manager()):
        if info.distribution != "dllm-decode" or "select_tokens" not in info.slots or info.meta.auxiliary:
            continue
        slots = {"choose_span": "llada", "score": "llada", "cache_policy": "block_kv", "select_tokens": info.name}
        for _, other in info.meta.pairs:             # a rule that reads its own score (or span)
            slots[other] = info.name
        data = {**slots, "generation": {"gen_length": 12, "block_length": 4, "steps": 12, "dtype": "float64"}}
        try:
            Decoder(sdar, recipe_from_dict(data))
        except RecipeError as err:
            assert f"plugin '{info.name}'" in str(err) or f"plugin {info.name!r}" in str(err), str(err)
            refused.append(info.name)
            continue
        check_invariants(sdar, data, prompts=PROMPTS[:3])
        ran.append(info.name)
    assert {"llada", "threshold", "dream", "localleap"} <= set(ran), ran
    assert {"klass", "slowfast", "wino"} <= set(refused), refused


def test_generate_picks_the_family_recipe_for_the_shipped_block_diffusion_model(capsys):
    """`dllm-decode generate --model models/sdar-reference` with no --recipe decodes block by
    block with the sdar recipe (and says so), and a swapped select rule works inside the blocks."""
    from pathlib import Path

    from dllm_decode.cli import main

    model = Path(__file__).resolve().parents[1] / "models" / "sdar-reference"
    assert main(["generate", "--model", str(model), "--task", "copy,case", "--n", "2", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "using sdar" in out.err and "exact match 1.000 on 4" in out.out
    assert main(["generate", "--model", str(model), "--task", "repeat", "--n", "2", "--no-progress",
                 "--set", "select_tokens=localleap"]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["generate", "--model", str(model), "--task", "repeat", "--n", "1", "--no-progress",
                 "--set", "select_tokens=klass", "--set", "score=klass"]) == 2
    assert "plugin 'klass' does not declare that it follows a canvas that grows" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Fast-dLLM v2

#: prompt lengths 5 and 2 (inside the first block), 16 (two whole blocks: prefill, then the first
#: token from the prompt's last output) and 11 (prefill of one block, the tail in the next); never 8,
#: a prompt the original never sees (tests/reference_fdv2.py)
FDV2_PROMPTS = [[5, 9, 12, 3, 7], [20, 4], list(range(2, 18)), [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


@pytest.fixture(scope="module")
def fdv2():
    return build_random_model("fast_dllm_v2", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, seed=0,
                              dtype=torch.float64, bd_size=8).eval()


def fdv2_reference(model, prompt, gen, stop, thr):
    """Fast-dLLM v2's generate() over the blocks our row covers: max_new_tokens counts blocks from
    the one holding the prompt's last token, ours ends at ceil((P + gen) / 8) * 8."""
    P = len(prompt)
    max_new = -(-(P + gen) // 8) * 8 - P // 8 * 8
    return fdv2_generate(model, prompt, mask_id=MASK, stop_id=stop, max_new_tokens=max_new, block=8, small_block=4,
                         threshold=thr)


def fdv2_stop(model, gen, thr):
    """A token the original writes that stops some rows after a few tokens and never appears in another."""
    free = [fdv2_reference(model, p, gen, 999, thr)[0] for p in FDV2_PROMPTS]
    counts = {}
    for row in free:
        for t in row:
            counts[t] = counts.get(t, 0) + 1
    for t in sorted(counts, key=lambda t: (-counts[t], t)):
        if any(t in row[3:] and t not in row[:3] for row in free) and any(t not in row for row in free):
            return t
    raise AssertionError("no stop token fits")


@pytest.mark.parametrize("cache,batch", [("block_kv", 1), ("block_kv", 4), ("none", 4)])
def test_fast_dllm_v2_recipe_matches_its_generate(fdv2, cache, batch):
    """The shipped fast-dllm-v2 recipe against Fast-dLLM v2's generate() re-derived, on a tiny
    Fast-dLLM v2 in blocks of 8 with sub-blocks of 4, alone and in a left-padded batch, with a
    stop id some rows write: the same tokens up to the first stop; where a row runs to its
    length the original has one token more (the next block's first, from the forward that
    stores the last block's K/V). Forwards: the original's, less its separate prefill of a
    prompt that ends inside a block and that last store forward."""
    gen, thr = 24, 0.05
    stop = fdv2_stop(fdv2, gen, thr)
    rec = load_recipe("fast-dllm-v2", [f"generation.gen_length={gen}", "generation.block_length=4",
                                       f"generation.steps={gen}", f"generation.batch_size={batch}",
                                       f"select_tokens.threshold={thr}", f"generation.eos.ids=[{stop}]",
                                       f"cache_policy={cache}"])
    res = Decoder(fdv2, rec).generate(FDV2_PROMPTS)
    hit = []
    for prompt, row in zip(FDV2_PROMPTS, res.rows):
        P = len(prompt)
        want, forwards = fdv2_reference(fdv2, prompt, gen, stop, thr)
        got = row.tokens[:row.tokens.index(stop) + 1] if stop in row.tokens else row.tokens
        extra = len(want) - len(got)
        assert extra in (0, 1) and got == want[:len(got)], (prompt, got, want)
        if extra:                                     # ran to its length: ours ends with the block
            assert len(got) == -(-(P + gen) // 8) * 8 - P
        assert row.nfe == forwards - (P > 8 and P % 8 != 0) - extra, prompt
        hit.append(stop in got)
    assert any(hit) and not all(hit)
    # the threshold took several tokens in some steps: the parallel path is exercised
    assert sum(r.nfe for r in res.rows) < sum(len(r.tokens) for r in res.rows)


@pytest.mark.parametrize("batch", [1, 4])
def test_the_cache_is_exact_for_shifted_logits_under_any_order(fdv2, batch):
    """With Fast-dLLM v2's token shift a block's first position is predicted by the previous block's
    last output. Decoded by low confidence (LLaDA's rule, one token a step), that position is often
    still masked after the block's first step, when the cached feed starts at the block: every
    masked position's logits are still the uncached forward's bits, and the tokens the same.
    Alone, blocks lie on the canvas's block multiples and the feed starts at the row's block, so
    the count of such positions makes the check bite; the padded batch checks the same exactness
    where rows' blocks sit at their own columns."""
    late = 0                               # steps a block's first position was masked past its first step
    # alone, an empty prompt too: its first position has no predecessor, its own logit either way
    for prompts in ([FDV2_PROMPTS] if batch > 1 else [[p] for p in [*FDV2_PROMPTS, []]]):
        decs = {c: Decoder(fdv2, recipe(cache=c, gen=24, batch=batch)) for c in ("block_kv", "none")}
        states = {c: d.start(prompts) for c, d in decs.items()}
        for step in range(200):
            st = states["none"]
            masked = st.masked.clone()
            after = torch.zeros_like(masked)                        # committed, right after a column
            after[:, :-1] = ~masked[:, 1:] & (st.columns[1:] < st.ends[:, None])
            late += int((block_starts(st) & after).sum())
            outs = {c: whole_batch(d, states[c]) for c, d in decs.items()}
            cached, whole = outs["block_kv"], outs["none"]
            lo = int(cached.positions[0, 0])
            assert torch.equal(cached.logits[masked[:, lo:]], whole.logits[:, lo:][masked[:, lo:]]), f"step {step}"
            done = [d.end_step(states[c], outs[c]) for c, d in decs.items()]
            assert torch.equal(states["block_kv"].x, st.x) and done[0] == done[1]
            if done[0]:
                break
    assert late >= 1, "no block's first position was left masked: the test would be vacuous"


@pytest.mark.parametrize("family", ["sdar", "fdv2"])
def test_rows_blocks_apart_feed_their_own_columns_with_the_same_bits(request, family):
    """An adaptive rule lets some rows of a batch run many blocks ahead of others. A range feed
    would then hand every row every column from the last row's block to the canvas end; each row
    feeds its own blocks instead (``block_kv:rows``), and gets the same logit bits as the uncached
    forward of the whole canvas, with and without the token shift."""
    model, prompts, thr, gen = {"sdar": (request.getfixturevalue("sdar"), PROMPTS, 0.1, 96),
                                "fdv2": (request.getfixturevalue("fdv2"), FDV2_PROMPTS, 0.07, 128)}[family]
    decs = {c: Decoder(model, recipe("threshold", cache=c, gen=gen, threshold=thr)) for c in ("block_kv", "none")}
    states = {c: d.start(prompts) for c, d in decs.items()}
    apart = []                                   # (fed columns, range a block step would feed)
    for step in range(400):
        st = states["none"]
        outs = {c: whole_batch(d, states[c]) for c, d in decs.items()}
        cached, whole = outs["block_kv"], outs["none"]
        pos = cached.positions.expand(len(prompts), -1)
        if cached.logits.shape[1] and not torch.equal(pos, pos[:1].expand_as(pos)):
            apart.append((pos.shape[1], st.length - int(pos[:, 0].min())))
        ref = whole.logits.gather(1, pos[..., None].expand(-1, -1, whole.logits.shape[-1]))
        masked = st.masked.gather(1, pos)
        assert torch.equal(cached.logits[masked], ref[masked]), f"step {step}"
        done = [d.end_step(states[c], outs[c]) for c, d in decs.items()]
        assert torch.equal(states["block_kv"].x, st.x) and done[0] == done[1]
        if done[0]:
            break
    assert len(apart) >= 20, apart
    assert all(fed < span for fed, span in apart) and max(span for _, span in apart) >= 4 * 12, apart


def test_rows_blocks_apart_match_sdar(sdar):
    """The same batch against SDAR's official decoder, row by row alone: the same tokens."""
    res = Decoder(sdar, recipe("threshold", gen=96, threshold=0.1)).generate(PROMPTS)
    assert res.tokens == reference(sdar, PROMPTS, gen_length=96, block=4, steps=4,
                                   strategy="low_confidence_dynamic", threshold=0.1, stop_ids=())


def test_fast_dllm_v2_recipe_keeps_every_invariant(fdv2):
    from dllm_decode.testing import check_invariants

    check_invariants(fdv2, find_recipe("fast-dllm-v2"), prompts=FDV2_PROMPTS,
                     overrides=["generation.gen_length=16", "generation.block_length=4", "generation.steps=16",
                                "select_tokens.threshold=0.05", "generation.eos.ids=[21]"])


def test_fast_dllm_v2_checkpoints_default_to_their_recipe(fdv2, tmp_path):
    from dllm_decode.models import save_pretrained
    from dllm_decode.recipes import default_recipe

    save_pretrained(fdv2, tmp_path / "v2")
    assert default_recipe(tmp_path / "v2") == "fast-dllm-v2"


def test_the_family_recipe_fits_a_checkpoint_with_smaller_blocks(fdv2, tmp_path, capsys):
    """Fast-dLLM v2's recipe decodes sub-blocks of 8; on a checkpoint with blocks of 4, taken by
    default (no --recipe), its sub-blocks become the model's blocks, said on stderr, where an
    explicit recipe is refused naming the fix. A --set of the block length is kept as given."""
    import argparse

    from dllm_decode.cli import _load_recipe
    from dllm_decode.models import save_pretrained
    from dllm_decode.recipes import fit_blocks

    small = build_random_model("fast_dllm_v2", vocab_size=48, d_model=32, n_layers=1, n_heads=4,
                               mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bd_size=4)
    save_pretrained(small, tmp_path / "v2-4")
    save_pretrained(fdv2, tmp_path / "v2-8")
    assert fit_blocks(tmp_path / "v2-4", "fast-dllm-v2") == ["generation.block_length=4"]
    assert fit_blocks(tmp_path / "v2-8", "fast-dllm-v2") == [] == fit_blocks(tmp_path / "nowhere", "sdar")
    args = dict(overrides=[], gen_length=None, device=None, dtype=None)
    rec = _load_recipe(argparse.Namespace(model=str(tmp_path / "v2-4"), recipe=None, **args), None)
    assert rec.generation.block_length == 4 and "generation.block_length=4 (the model's blocks)" in capsys.readouterr().err
    mine = dict(args, overrides=["generation.block_length=2"])
    assert _load_recipe(argparse.Namespace(model=str(tmp_path / "v2-4"), recipe=None, **mine), None) \
        .generation.block_length == 2
    explicit = _load_recipe(argparse.Namespace(model=str(tmp_path / "v2-4"), recipe="fast-dllm-v2", **args),
                            "fast-dllm-v2")
    with pytest.raises(RecipeError, match="decodes one block of 4 positions at a time; set block_length to 4"):
        Decoder(small, explicit)


def test_block_first_token_is_refused_without_blocks():
    """Refused when the recipe meets the model, before any forward, naming plugin and option."""
    llada = build_random_model("llada", vocab_size=48, d_model=32, n_layers=1, n_heads=4, mask_token_id=MASK)
    rec = load_recipe("threshold", ["select_tokens.block_first_token=true", "generation.gen_length=8",
                                    "generation.block_length=8", "generation.steps=8"])
    with pytest.raises(RecipeError, match=r"plugin 'threshold' with options \{.*'block_first_token': True.*\} "
                                          r"needs a block-causal model, but .* attends over the whole canvas"):
        Decoder(llada, rec)
