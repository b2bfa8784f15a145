"""The canvas-rule mechanism on its own (``resize_canvas``, dllm_decode/canvas.py), with a small
test rule rather than DAEDAL: rows grown by insertion and appending decode as a plain loop that
grows a list says, alone and in a padded batch where rows end at different columns; the state,
the step record, streaming, the scheduler and traces follow the moved columns; a cache rebuilds
after a resize; plugins that cannot follow are refused at load time; broken resizes are refused
naming the plugin; the step budget follows the grown canvas."""

import pytest
import torch
from pydantic import Field

from dllm_decode import PluginMeta, PluginOptions, Resize, hookimpl
from dllm_decode.canvas import moved_columns
from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.errors import PluginError, RecipeError
from dllm_decode.plugins import get_plugin_manager
from dllm_decode.sampling import topk_mask
from dllm_decode.state import UNCOMMITTED
from dllm_decode.testing import RandomLogitsModel, ReferenceOutput, check_invariants, check_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS4 = [[5, 9, 11, 3], [7, 2, 4], [13, 14, 15, 16, 17], [20]]
STUB = RandomLogitsModel(vocab_size=24, seed=11, sharpness=4.0)


class GrowOptions(PluginOptions):
    count: int = Field(2, ge=0, description="Masks inserted before the least confident mask left in the span.")
    times: int = Field(3, ge=0, description="Insertions per row.")
    append: int = Field(0, ge=0, description="Positions appended to a row at the request's first step.")
    fill: int | None = Field(None, description="Token of the appended positions (null: masks).")
    odd_only: bool = Field(True, description="Only rows whose prompt length is odd grow.")


class Grow:
    """A test canvas rule: after each commit, ``count`` masks go right before the least confident
    mask the span still holds (at most ``times`` per row), and at the first step ``append``
    positions go at the row's end."""

    dllm_meta = PluginMeta(summary="test canvas rule", options=GrowOptions, resizable=True)

    @hookimpl
    def on_request_start(self, state, scratch):
        scratch["n"] = torch.zeros(state.batch_size, dtype=torch.long, device=state.device)

    @hookimpl
    def resize_canvas(self, state, candidates, options, scratch):
        grows = state.last.active & ((state.prompt_lengths % 2 == 1) | (not options.odd_only))
        left = state.masked & candidates.eligible                          # masks the step left in the span
        key = torch.where(left, -candidates.confidence.to(torch.float64), float("-inf"))
        point = topk_mask(key, (grows & (scratch["n"] < options.times)).long())
        scratch["n"] = scratch["n"] + point.any(dim=1).long()
        append = torch.where(grows & (state.step == 0), options.append, 0)
        return Resize(insert=point.long() * options.count, append=append, fill=options.fill)


def _pm(**extra):
    return get_plugin_manager(extra_plugins={"grow": Grow(), **extra})


def _recipe(gen=8, block=4, threshold=0.9, **grow):
    return {"choose_span": "llada", "score": "llada", "select_tokens": {"plugin": "threshold", "threshold": threshold},
            "resize_canvas": {"plugin": "grow", **grow}, "cache_policy": "none",
            "generation": {"gen_length": gen, "block_length": block, "dtype": "float64"}}


def grow_reference(model, prompt, *, mask_id, gen_length, block_length, threshold, count=2, times=3, append=0,
                   fill=None, odd_only=True):
    """The test rule as a plain loop over one prompt: LLaDA's blocks and float64 probabilities,
    Fast-dLLM's threshold rule, then the insertion and the appending on a Python list."""
    P = len(prompt)
    x, n, step, nfe = list(prompt) + [mask_id] * gen_length, 0, 0, 0
    grows = len(prompt) % 2 == 1 or not odd_only
    while mask_id in x[P:]:
        logits = model(torch.tensor([x]))[0].clone()
        nfe += 1
        logits[:, mask_id] = float("-inf")
        pred = logits.argmax(dim=-1)
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        conf = [float(probs[i, pred[i]]) for i in range(len(x))]
        first = x.index(mask_id, P)
        lo = P + (first - P) // block_length * block_length
        masked = [i for i in range(lo, min(lo + block_length, len(x))) if x[i] == mask_id]
        best = min(masked, key=lambda i: (-conf[i], i))
        for i in masked:
            if i == best or conf[i] >= threshold:
                x[i] = int(pred[i])
        left = [i for i in masked if x[i] == mask_id]
        if grows and left and n < times:
            point = min(left, key=lambda i: (conf[i], i))
            x[point:point] = [mask_id] * count
            n += 1
        if grows and step == 0:
            x += [mask_id if fill is None else fill] * append
        step += 1
    return x[P:], nfe


def _ref(**grow):
    def ref(model, prompt, recipe):
        g, sel = recipe.generation, recipe.select_tokens.params
        tokens, nfe = grow_reference(model, prompt, mask_id=model.spec.mask_token_id, gen_length=g.gen_length,
                                     block_length=g.block, threshold=sel["threshold"], **grow)
        return ReferenceOutput(tokens, nfe)
    return ref


GROWS = [{}, dict(count=1, times=10), dict(count=5, times=1, append=3), dict(append=4, fill=7),
         dict(count=0, append=2, odd_only=False), dict(count=3, times=2, append=2, fill=1, odd_only=False)]


@pytest.mark.parametrize("grow", GROWS, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()) or "defaults")
@pytest.mark.parametrize("which", ["stub", "tiny-llada"])
def test_grown_rows_decode_as_a_plain_loop_says(grow, which, tiny_llada):
    model = STUB if which == "stub" else tiny_llada
    threshold = 0.9 if which == "stub" else 0.12
    for batched in (False, True):
        result = check_parity(model, _recipe(threshold=threshold, **grow), _ref(**grow), PROMPTS4, pm=_pm(),
                              batched=batched)
    if grow.get("odd_only", True) and (grow.get("count", 2) or grow.get("append")):
        assert len({len(r.tokens) for r in result.rows}) > 1          # rows grew apart in the batch


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("policy", ["llada", "dream"])
def test_uneven_rows_keep_every_invariant(temperature, policy, tiny_llada):
    recipe = {"policy": policy, "resize_canvas": {"plugin": "grow", "append": 3, "fill": 5},
              "generation": {"gen_length": 8, "block_length": 4, "steps": 8, "temperature": temperature}}
    check_invariants(tiny_llada, recipe, PROMPTS4, pm=_pm())
    check_invariants(STUB, recipe, PROMPTS4, pm=_pm())


def test_the_state_follows_the_moved_columns():
    """After each step: the canvas is as wide as its longest row, past a row's end nothing is
    attended or written, the record is in the new columns with its Resize, committed tokens sit
    where moved_columns says, appended tokens count as written at that step."""
    recipe = recipe_from_dict({**_recipe(append=2, fill=7), "generation": {**_recipe()["generation"], "batch_size": 4}})
    decoder = Decoder(STUB, recipe, pm=_pm())
    before = None
    for state in decoder.steps(PROMPTS4):
        rec, L = state.last, state.length
        assert rec.committed.shape == rec.confidence.shape == state.x.shape
        assert int(state.ends.max()) == L and state.gen_length == L - state.gen_start
        past = state.columns[None, :] >= state.ends[:, None]
        assert not state.attention_mask[past].any() and state.prompt_mask[past].all()
        assert (state.commit_step[past] == UNCOMMITTED).all() and not state.masked[past].any()
        if before is not None and rec.resize is not None:
            x0, ends0 = before
            moved = moved_columns(rec.resize, ends0, x0.shape[1])
            keep = (moved >= 0) & (x0 != STUB.spec.mask_token_id)
            rows = torch.arange(4)[:, None].expand_as(moved)
            assert torch.equal(state.x[rows[keep], moved[keep]], x0[keep])      # committed tokens moved, unchanged
            if rec.step == 0:
                grown = state.prompt_lengths % 2 == 1
                tail = (state.columns[None, :] >= (state.ends - 2)[:, None]) & ~past & grown[:, None]
                assert (state.x[tail] == 7).all() and (state.commit_step[tail] == 0).all()
        before = (state.x.clone(), state.ends.clone())
    assert any(r.resize is not None for r in state.history)
    assert len({r.committed.shape[1] for r in state.history}) > 1           # records keep their step's width


def test_streaming_the_scheduler_and_traces_follow_grown_rows():
    from dllm_decode.measure.trace import trace_record
    from dllm_decode.serve.scheduler import Scheduler
    from dllm_decode.serve.stream import stream

    recipe = recipe_from_dict({**_recipe(count=2, times=2), "generation": {**_recipe()["generation"], "batch_size": 4}})
    decoder = Decoder(STUB, recipe, pm=_pm())
    expected = decoder.generate(PROMPTS4, keep_states=True)
    *_, last = stream(decoder, PROMPTS4)
    assert [u.canvas for u in last] == expected.tokens and all(u.finished for u in last)
    assert [len(u.prefix) for u in last] == [len(t) for t in expected.tokens]
    scheduler = Scheduler(STUB, max_batch=2)
    jobs = [scheduler.submit(decoder, p) for p in PROMPTS4]
    scheduler.run()
    assert [j.tokens for j in jobs] == expected.tokens
    for row, tokens in enumerate(expected.tokens):
        record = trace_record(expected.states[0], row=row)
        written = sorted(c for s in record["steps"] for c in s["committed"])
        assert record["tokens"] == tokens and written == list(range(len(tokens)))


def test_a_cache_rebuilds_after_a_resize(tiny_llada):
    """The engine clears the store at every resize and kv_block refreshes: refreshed every forward
    it gives the no-cache tokens exactly; with its own schedule it keeps every invariant."""
    base = {**_recipe(threshold=0.12, count=2, times=2, append=2), "generation": {**_recipe()["generation"], "batch_size": 4}}
    plain = Decoder(tiny_llada, recipe_from_dict(base), pm=_pm()).generate(PROMPTS4).tokens
    cached = Decoder(tiny_llada, recipe_from_dict({**base, "cache_policy": {"plugin": "kv_block", "refresh_interval": 1}}),
                     pm=_pm()).generate(PROMPTS4).tokens
    assert cached == plain
    check_invariants(tiny_llada, {**base, "cache_policy": {"plugin": "kv_block", "mode": "dual"}}, PROMPTS4, pm=_pm())


@pytest.mark.parametrize("slot,plugin", [("cache_policy", "dllm_cache"), ("select_tokens", "credit"),
                                         ("choose_span", "slowfast")])
def test_plugins_that_cannot_follow_a_resize_are_refused(slot, plugin):
    recipe = {**_recipe(), slot: plugin}
    if plugin == "credit":
        recipe["score"] = "credit"
    with pytest.raises(RecipeError, match=rf"{slot}: plugin '{plugin}' .*resizable.*'grow'"):
        Decoder(STUB, recipe_from_dict(recipe), pm=_pm())


class Broken:
    """Canvas rules that break one rule each."""

    dllm_meta = PluginMeta(resizable=True)

    def __init__(self, how):
        self.how = how

    @hookimpl
    def resize_canvas(self, state):
        B, L = state.x.shape
        ins = torch.zeros((B, L), dtype=torch.long)
        if self.how == "prompt":
            ins[0, 0] = 1
        elif self.how == "negative":
            return Resize(append=torch.tensor([-1] + [0] * (B - 1)))
        elif self.how == "finished":
            return Resize(append=(~state.last.active).long())
        elif self.how == "fill":
            return Resize(append=torch.ones(B, dtype=torch.long), fill=10 ** 6)
        elif self.how == "too-long":
            return Resize(append=torch.full((B,), 2000))
        elif self.how == "shape":
            return Resize(insert=torch.zeros((B, L + 1), dtype=torch.long))
        elif self.how == "type":
            return {"append": 1}
        return Resize(insert=ins)


@pytest.mark.parametrize("how,match", [("prompt", "outside the row's generated region"), ("negative", "negative"),
                                       ("finished", "finished before this step"), ("fill", "outside the vocabulary"),
                                       ("too-long", "max_length"), ("shape", "expected a long tensor"),
                                       ("type", "expected a Resize")])
def test_broken_resizes_are_refused_naming_the_plugin(how, match):
    recipe = {**_recipe(), "resize_canvas": "broken",
              "generation": {**_recipe()["generation"], "batch_size": 4}}
    decoder = Decoder(STUB, recipe_from_dict(recipe), pm=get_plugin_manager(extra_plugins={"broken": Broken(how)}))
    prompts = PROMPTS4 if how != "finished" else [[5], [6] * 30]     # the short row finishes first
    with pytest.raises(PluginError, match=rf"resize_canvas plugin 'broken' at step \d+: .*{match}"):
        decoder.generate(prompts)


def test_the_step_budget_follows_the_grown_canvas():
    """Two masks, grown by one at each of the first steps: more steps than 4 x gen_length, which
    the budget allows because it counts the canvas as it is now."""

    class Drip:
        dllm_meta = PluginMeta(resizable=True)

        @hookimpl
        def resize_canvas(self, state):
            return Resize(append=torch.full((state.batch_size,), int(state.step < 12)))

    recipe = {"policy": "llada", "resize_canvas": "drip", "generation": {"gen_length": 2, "steps": 2}}
    out = Decoder(STUB, recipe_from_dict(recipe), pm=get_plugin_manager(extra_plugins={"drip": Drip()})).generate([[5, 6]])
    assert len(out.rows[0].tokens) == 14 and out.rows[0].nfe == 14 > 4 * 2
