"""Finished rows leave the batch's forwards: once a row has finished, a step whose forward neither
reads nor writes the cache store runs only the rows still decoding, and so does a forward against
the store when the cache plugin declares ``drops_rows`` (the row's part of the store is dropped);
every row still decodes the tokens it decodes alone."""

import pytest
import torch

from dllm_decode import PluginMeta, Selection, hookimpl
from dllm_decode.config import load_recipe, recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.models.plan import ComputePlan, Drift
from dllm_decode.plugins import get_plugin_manager

from batch_feeds import decodes_as_alone, steps
from shipped import shipped_model_and_prompts


class _Rows:
    """The model, recording how many canvas rows each of its forwards ran."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def execute(self, x, **kwargs):
        self.rows.append(x.shape[0])
        return self.model.execute(x, **kwargs)


@pytest.fixture(scope="module")
def shipped():
    return {family: shipped_model_and_prompts(family, ("copy", "repeat", "case", "repeat"), seed=3)
            for family in ("llada", "dream", "sdar")}


LLADA = {"choose_span": "llada", "score": "llada", "select_tokens": "llada"}   # one token a step
THRESHOLD = {**LLADA, "select_tokens": {"plugin": "threshold", "threshold": 0.99999}}   # rows finish mid-block
STOP = {"gen_length": 64, "block_length": 8, "steps": 64, "eos": {"stop": True}}   # rows stop at EOS
KV = {"plugin": "kv_block", "mode": "dual"}
# case -> (model, slots, generation settings, whether its forwards against the store leave finished rows)
CASES = {
    "plain": ("llada", LLADA, {}, False),
    "guided": ("llada", LLADA, {"cfg_scale": 0.5}, False),
    "dream": ("dream", {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": 0.9,
                                   "first_token": True}}, {}, False),
    "cut window (key_limit)": ("llada", {"policy": {"plugin": "slowfast", "tau_high": 0.999}, "score": "llada",
                                         "cache_policy": {"plugin": "slowfast_tail"}}, {"block_length": 32}, True),
    "shadow queries": ("llada", {"policy": {"plugin": "wino"}}, {"block_length": 32}, False),
    "index feed (dpad)": ("llada", {**LLADA, "cache_policy": {"plugin": "dpad", "window": 16}}, {}, True),
    # forwards against the store: the cache plugin declares drops_rows
    "kv_block dual": ("llada", {**LLADA, "cache_policy": KV}, {}, True),
    "kv_block on dream": ("dream", {"policy": {"plugin": "dream", "alg": "confidence_threshold", "threshold": 0.9,
                                               "first_token": True}, "cache_policy": KV}, {}, True),
    "dpad with its prefix cache": ("llada", {**LLADA, "cache_policy": {"plugin": "dpad", "window": 16,
                                                                       "kv_cache": "prefix"}}, {}, True),
    "dllm_cache (feature reuse)": ("llada", {**LLADA, "cache_policy": {"plugin": "dllm_cache", "prompt_interval": 5,
                                                                       "response_interval": 3, "rho": 0.25}}, {}, True),
    "dkv_cache (index feed)": ("llada", {**LLADA, "cache_policy": {"plugin": "dkv_cache", "refresh_interval": 4}},
                               {}, True),
    "block_kv (block-causal)": ("sdar", {**LLADA, "cache_policy": "block_kv"}, {"block_length": 4}, True),
    # caches that read per-row data back from the store, through CacheStore.batch_rows
    "elastic_cache (attention mass)": ("llada", {"choose_span": "elastic_cache", "score": "llada",
                                                 "select_tokens": "llada",
                                                 "cache_policy": {"plugin": "elastic_cache", "window_length": 16}},
                                       {}, True),
    "elastic_cache on dream, drifting": ("dream", {"choose_span": "elastic_cache", "score": "dream",
                                                   "select_tokens": "llada",
                                                   "cache_policy": {"plugin": "elastic_cache", "window_length": 8,
                                                                    "gamma": 0.999}}, {}, True),
    "d2cache (attention rollout)": ("llada", {"score": {"plugin": "d2cache"}, "choose_span": "llada",
                                              "select_tokens": {"plugin": "d2cache", "num_transfer_tokens": 1},
                                              "cache_policy": {"plugin": "d2cache", "current_k": 8}}, {}, True),
    # under guidance the store holds both halves: row B + r leaves with r (rows finish between
    # refreshes here, so the store's unconditional rows are read before anything rewrites them)
    "kv_block, guided": ("llada", {**THRESHOLD, "cache_policy": KV}, {"cfg_scale": 0.5, "block_length": 32}, True),
    "dkv_cache, guided": ("llada", {**THRESHOLD, "cache_policy": {"plugin": "dkv_cache", "refresh_interval": 5}},
                          {"cfg_scale": 0.5, "block_length": 32}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_finished_rows_leave_the_forwards(shipped, case):
    """A step runs the unfinished rows only where it can: a forward that keeps nothing always, one
    against the store when the cache plugin declares ``drops_rows`` (no guidance); every row still
    decodes the tokens it decodes alone."""
    family, slots, gen, drops = CASES[case]
    model, prompts = shipped[family]
    recipe = recipe_from_dict({**slots, "generation": {**STOP, **gen, "batch_size": len(prompts),
                                                       "dtype": "float64"}})
    recording = _Rows(model)
    pairs = 2 if recipe.generation.cfg_scale > 0 else 1
    expected, short = [], 0
    for state, done, plan, _ in steps(recording, recipe, prompts):
        live = int((~done).sum())
        leaves = plan is None or plan.keeps_nothing or drops
        expected.append(pairs * (live if leaves else state.batch_size))
        short += live < state.batch_size
    assert short >= 3, "the rows must finish at different steps for this test to bite"
    assert recording.rows == expected
    assert min(recording.rows) < pairs * len(prompts)
    assert decodes_as_alone(model, recipe, prompts)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3]])
def test_the_rows_left_get_the_logits_they_get_beside_the_finished_ones(shipped, case):
    """Step by step, the engine and the same engine feeding its finished rows to the end (and
    keeping them in the store) give the unfinished rows the same logits, to float rounding: a
    cache reading per-row data back from the store reads the rows it holds, and under guidance
    each row keeps its own unconditional half."""
    from dllm_decode.tools.finished_rows import FeedingEveryRow

    family, slots, gen, _ = CASES[case]
    model, prompts = shipped[family]
    recipe = recipe_from_dict({**slots, "generation": {**STOP, **gen, "batch_size": len(prompts),
                                                       "dtype": "float64"}})
    leaving, feeding = Decoder(model, recipe), FeedingEveryRow(model, recipe)
    a, b = leaving.start(prompts), feeding.start(prompts)
    leaving.open(a)
    feeding.open(b)
    compared = 0
    while True:
        live = ~a.done
        out_a, out_b = leaving.forward(a, leaving.begin_step(a)), feeding.forward(b, feeding.begin_step(b))
        torch.testing.assert_close(out_a.logits[live], out_b.logits[live], rtol=1e-9, atol=1e-9)
        compared += int((~live).any())
        end_a, end_b = leaving.end_step(a, out_a), feeding.end_step(b, out_b)
        assert torch.equal(a.x, b.x) and end_a == end_b
        if end_a:
            break
    assert compared >= 3, "the rows must finish at different steps for this test to bite"


class Switching:
    """A cache that declares drops_rows and, under guidance, turns from one kind of plan to the
    other once a row has finished (plain plans run both halves against one store, a Guided pair
    the conditional half alone)."""

    dllm_meta = PluginMeta(summary="test cache: switches between plain plans and a Guided pair", drops_rows=True)

    def __init__(self, guided_first: bool):
        self.guided_first = guided_first

    @hookimpl
    def cache_policy(self, state, scratch):
        from dllm_decode.guidance import Guided

        if bool(state.done.any()) != self.guided_first:
            return Guided(cond=ComputePlan.refresh(), uncond=ComputePlan.refresh())
        return ComputePlan.refresh()


@pytest.mark.parametrize("guided_first", [False, True])
def test_switching_plan_kinds_under_guidance_is_refused(shipped, guided_first):
    """Under guidance the store of plain plans holds both halves (and drops finished rows in
    pairs), a Guided pair's the conditional half: a request turning from one to the other is
    refused, naming the plugin."""
    from dllm_decode.errors import PluginError

    pm = get_plugin_manager()
    pm.register(Switching(guided_first), name="switching")
    try:
        model, prompts = shipped["llada"]
        recipe = recipe_from_dict({**THRESHOLD, "cache_policy": "switching",
                                   "generation": {**STOP, "block_length": 32, "cfg_scale": 0.5,
                                                  "batch_size": len(prompts), "dtype": "float64"}})
        with pytest.raises(PluginError, match="switching.*one kind of plan"):
            Decoder(model, recipe, pm=pm).generate(prompts)
    finally:
        pm.unregister(name="switching")


class Reopen:
    """A revocable rule: each row's most confident mask a step; once, it masks again the first
    generated token of a row that has finished while others decode."""

    dllm_meta = PluginMeta(summary="test rule: re-opens a finished row", revocable=True)

    @hookimpl
    def select_tokens(self, state, candidates, scratch):
        conf = candidates.confidence
        commit = candidates.eligible & (conf == conf.amax(dim=1, keepdim=True))
        if "row" in scratch or not state.done.any() or state.done.all():
            return commit
        scratch["row"] = row = int(state.done.nonzero()[0])
        remask = torch.zeros_like(commit)
        remask[row, state.gen_start] = True
        return Selection(commit=commit, remask=remask)


def test_a_finished_row_masked_again_is_fed_again(shipped):
    """A revocable rule may re-mask a finished row: the step after, that row is in the forward
    again, and the request ends with every row finished and no mask left."""
    pm = get_plugin_manager()
    pm.register(Reopen(), name="reopen")
    try:
        model, prompts = shipped["llada"]
        recipe = recipe_from_dict({"choose_span": "llada", "score": "llada", "select_tokens": "reopen",
                                   "generation": {**STOP, "batch_size": len(prompts), "dtype": "float64"}})
        recording, expected, reopened = _Rows(model), [], []
        for state, done, _, _ in steps(recording, recipe, prompts, pm=pm):
            expected.append(int((~done).sum()))
            if "row" in state.scratch.get("reopen", {}) and not reopened:
                reopened.append(state.step)
    finally:
        pm.unregister(name="reopen")
    assert reopened, "no row was re-opened"
    assert recording.rows == expected
    assert state.done.all() and not (state.x == state.mask_id).any()


def test_a_request_counts_the_flops_of_the_rows_it_ran(shipped):
    """Plain forwards of a (B, L) canvas: the request's FLOPs are one row's forward times the
    forwards each row took while unfinished (feeding the finished rows too counted B a step)."""
    model, prompts = shipped["llada"]
    recipe = load_recipe("threshold", ["generation.gen_length=64", f"generation.batch_size={len(prompts)}",
                                       "generation.dtype=float64"])
    dec = Decoder(model, recipe)
    state = dec.decode(prompts)
    one = model.new_store()
    model.execute(state.x[:1], attention_mask=state.attention_mask[:1], store=one)
    assert len(set(state.row_nfe.tolist())) > 1
    assert state.counters["flops"] == one.flops * int(state.row_nfe.sum())


def test_take_rows_indexes_every_per_row_tensor():
    B, L = 3, 6
    rows = torch.tensor([0, 2])
    plan = ComputePlan(index=torch.arange(B * 2).view(B, 2), keys="fed", key_limit=torch.tensor([4, 5, 6]),
                       shift_from=torch.tensor([1, 2, 3]), keep=torch.rand(B, L) > 0.5,
                       index_pad=torch.tensor([[False, True], [False, False], [True, False]]),
                       position_ids=torch.arange(B * L).view(B, L))
    taken = plan.take_rows(rows)
    for name in ("index", "key_limit", "shift_from", "keep", "index_pad", "position_ids"):
        assert torch.equal(getattr(taken, name), getattr(plan, name)[rows]), name
    assert taken.keeps_nothing
    drift = Drift(gamma=0.9, watch=torch.arange(B * 2).view(B, 2))
    assert not ComputePlan(write_kv=True, write_hidden=True, drift=drift).keeps_nothing
    assert torch.equal(drift.map_rows(lambda t: t[rows]).watch, drift.watch[rows])
    for writes in (dict(keys="store"), dict(write_kv=True), dict(attention=True), dict(hidden=True)):
        assert not ComputePlan(**writes).keeps_nothing, writes


def test_the_finished_rows_tool_compares_both_engines():
    """`tools.finished_rows` decodes each batch both ways, the same tokens, and the engine that
    leaves finished rows out computes fewer FLOPs than the one feeding them."""
    from dllm_decode.measure.tasks import get_task
    from dllm_decode.models import load_model
    from dllm_decode.tools.finished_rows import measure
    from shipped import MODELS

    model, tok = load_model(MODELS / "llada-reference", dtype="float64")
    problems = [p for t in ("copy", "repeat", "case", "repeat") for p in get_task(t).problems("test", 1, 3)]
    recipe = load_recipe("threshold", ["generation.gen_length=64", "generation.batch_size=4",
                                       "generation.dtype=float64"])
    r = measure(model, tok, recipe, problems, 4)
    assert r["live_share"] < 1 and r["flops"] < 1


def test_a_store_keeps_the_rows_it_is_told_by_their_batch_index():
    """`CacheStore.keep_rows` takes the request's batch rows, whatever rows it already dropped."""
    from dllm_decode.models.store import CacheStore

    store = CacheStore()
    store.ensure_kv(1, 4, 1, 3, 2, torch.float64, torch.device("cpu"))
    store.k[0] += torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1)
    rows = torch.tensor([0, 2, 3])
    store.keep_rows(rows)
    store.keep_rows(rows)                          # the same rows: nothing changes
    store.keep_rows(torch.tensor([2, 3]))
    assert store.shape == (2, 3) and store.k[0][:, 0, 0, 0].tolist() == [2.0, 3.0]
    # per-row data laid out as the batch of 4 (a guided batch of 2: rows 2 and 3 its unconditional half)
    held = torch.tensor([[2.0], [3.0]])
    assert store.batch_rows(held, 4).flatten().tolist() == [0.0, 0.0, 2.0, 3.0]
    assert store.batch_rows(held, 2).flatten().tolist() == [0.0, 0.0]
    store = CacheStore()                         # a guided batch of 2: row 1 and its unconditional half
    store.ensure_kv(1, 4, 1, 3, 2, torch.float64, torch.device("cpu"))
    store.keep_rows(torch.tensor([1, 3]))
    assert store.batch_rows(torch.tensor([[5.0], [7.0]]), 2).flatten().tolist() == [0.0, 5.0]
