"""Streaming and continuous batching: every row gets exactly the tokens it gets decoded alone.

The reference is ``Decoder.generate`` on one prompt at a time (batch size 1), which the parity
tests tie to the official code; the scheduler admits requests while others are mid-decode, with
their own prompt lengths and seeds, and batches their plain forwards.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dllm_decode.config import load_recipe
from dllm_decode.engine import Decoder
from dllm_decode.errors import InputError, PluginError
from dllm_decode.hookspecs import hookimpl
from dllm_decode.measure.tasks import get_task
from dllm_decode.models import load_model
from dllm_decode.plugins import get_plugin_manager
from dllm_decode.recipes import shipped_recipes
from dllm_decode.serve.scheduler import QueueFull, Scheduler
from dllm_decode.serve.stream import stream
from shipped import MODELS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def reference(family: str):
    model, tok = load_model(MODELS / f"{family}-reference")
    problems = [p for name in ("copy", "repeat", "case") for p in get_task(name).problems("test", 2)]
    return model, tok, [tok.encode(p.prompt, add_special_tokens=False) for p in problems]


@functools.lru_cache(maxsize=None)
def block_causal(size: int):
    """A small random SDAR model in blocks of `size`, with the reference tokenizer's vocabulary."""
    from dllm_decode.models import build_random_model

    tok = reference("llada")[1]
    return build_random_model("sdar", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, seed=1, block_size=size).eval()


def decoder_for(name: str, **overrides) -> Decoder:
    """The shipped recipe on the reference model of its family (Dream recipes on dream-reference;
    the block-diffusion recipes on a random block-causal model with their block size)."""
    sets = ["generation.batch_size=1", *(f"{k}={v}" for k, v in overrides.items())]
    recipe = load_recipe(name, overrides=sets)
    model, tok, _ = reference("dream" if name.startswith("dream") else "llada")
    if recipe.cache_policy is not None and recipe.cache_policy.plugin == "block_kv":
        model = block_causal(recipe.generation.block)
    return Decoder(model, recipe, tokenizer=tok)


def scheduled(decoders, prompts, seeds, max_batch=3):
    """Submit the requests a few at a time while others decode; return each one's tokens."""
    sched = Scheduler(decoders[0].model, max_batch=max_batch)
    jobs = []
    for i, (dec, p, s) in enumerate(zip(decoders, prompts, seeds)):
        jobs.append(sched.submit(dec, p, seed=s))
        if i % 2:
            sched.step()
    sched.run()
    assert all(j.error is None for j in jobs), [j.error for j in jobs if j.error]
    return jobs, sched


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_decodes_alike_scheduled_and_alone(name):
    dec = decoder_for(name)
    prompts = reference("dream" if dec.spec.family == "dream" else "llada")[2]
    seeds = list(range(len(prompts)))
    alone = [dec.generate([p], seeds=[s]).tokens[0] for p, s in zip(prompts, seeds)]
    jobs, sched = scheduled([dec] * len(prompts), prompts, seeds)
    assert [j.tokens for j in jobs] == alone
    assert sched.idle and all(j.state.store is None or not j.state.scratch for j in jobs)


def test_requests_with_other_recipes_and_temperatures_share_the_batch():
    decs = [decoder_for("llada"), decoder_for("threshold"), decoder_for("llada", **{"generation.temperature": 1.0}),
            decoder_for("llada-random"), decoder_for("fast-dllm")]
    prompts = reference("llada")[2][:5]
    alone = [d.generate([p], seeds=[7]).tokens[0] for d, p in zip(decs, prompts)]
    jobs, sched = scheduled(decs, prompts, [7] * 5, max_batch=4)
    assert [j.tokens for j in jobs] == alone
    # the plain forwards really were merged: fewer model calls than the requests' steps
    assert sched.forwards < sum(j.state.step for j in jobs)


def test_a_cancelled_request_leaves_and_frees_its_row():
    dec = decoder_for("fast-dllm")
    prompts = reference("llada")[2]
    sched = Scheduler(dec.model, max_batch=2)
    a, b, c = (sched.submit(dec, p) for p in prompts[:3])
    sched.step()
    assert sched.running == [a, b] and list(sched.waiting) == [c]
    sched.cancel(a)
    sched.step()
    assert a not in sched.running and c in sched.running      # c took a's row
    assert a.state.store is None or a.state.store.nbytes() == 0
    sched.run()
    assert b.tokens == dec.generate([prompts[1]]).tokens[0] and c.tokens == dec.generate([prompts[2]]).tokens[0]


def test_bad_requests_are_refused_before_queueing():
    dec = decoder_for("llada")
    sched = Scheduler(dec.model, max_batch=2, max_waiting=1)
    with pytest.raises(InputError, match="mask token"):
        sched.submit(dec, [dec.mask_id])
    with pytest.raises(InputError, match="seeds"):
        sched.submit(dec, [5, 6], seed=-1)
    with pytest.raises(InputError, match=r"Scheduler.submit: prompts\[0\] is text"):
        sched.submit(dec, "copy: ab")               # the call the caller made is named
    other, _, _ = reference("dream")
    with pytest.raises(InputError, match="another model"):
        sched.submit(Decoder(other, load_recipe("dream")), [5, 6])
    for prompt in ([5, 6], [5, 7], [5, 8]):        # two for the free rows, one waiting for a row
        sched.submit(dec, prompt)
    with pytest.raises(QueueFull, match="max_waiting 1"):
        sched.submit(dec, [5, 9])
    assert len(sched.waiting) == 3
    sched.step()                                   # two admitted: one waits, the queue is full still
    with pytest.raises(QueueFull, match="1 requests are waiting"):
        sched.submit(dec, [5, 9])


class Exploding:
    """A third-party select rule that fails at its third step."""

    @hookimpl
    def select_tokens(self, state, candidates):
        if state.step == 2:
            raise RuntimeError("boom")
        return candidates.eligible & (candidates.confidence == candidates.confidence.amax(1, keepdim=True))


def test_a_broken_plugin_fails_its_own_request_only():
    pm = get_plugin_manager()
    pm.register(Exploding(), name="exploding")
    try:
        model, tok, prompts = reference("llada")
        bad = Decoder(model, load_recipe("llada", overrides=["select_tokens=exploding"]), pm=pm)
        good = decoder_for("threshold")
        sched = Scheduler(model, max_batch=4)
        jobs = [sched.submit(bad, prompts[0]), sched.submit(good, prompts[1])]
        sched.run()
    finally:
        pm.unregister(name="exploding")
    assert isinstance(jobs[0].error, PluginError) and "exploding" in str(jobs[0].error)
    assert jobs[0].error.step == 2
    assert jobs[1].error is None and jobs[1].tokens == good.generate([prompts[1]]).tokens[0]


@pytest.mark.parametrize("name", ["llada", "threshold", "wino"])
def test_streamed_steps_add_up_to_the_decoded_answer(name):
    dec = decoder_for(name, **{"generation.batch_size": 3})
    _, tok, prompts = reference("llada")
    updates = list(stream(dec, prompts[:3], tokenizer=tok))
    final = dec.generate(prompts[:3]).tokens
    assert [u.canvas for u in updates[-1]] == final and all(u.finished for u in updates[-1])
    for row in range(3):
        prefixes = [step[row].prefix for step in updates]
        # the committed prefix only grows (a WINO re-mask may take back a not yet settled tail)
        if name != "wino":
            assert all(b[:len(a)] == a for a, b in zip(prefixes, prefixes[1:]))
        written = {}
        for step in updates:
            for i in step[row].remasked:
                written.pop(i, None)
            written.update(zip(step[row].positions, step[row].tokens))
        assert [written.get(i, dec.mask_id) for i in range(len(final[row]))] == final[row]
        assert updates[-1][row].text == tok.decode(prefixes[-1], skip_special_tokens=True)


def test_the_throughput_benchmark_runs_and_checks_its_modes_agree(capsys):
    from dllm_decode.tools import serve_bench

    assert serve_bench.main(["--n", "1", "--rounds", "1", "--max-batch", "2", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {mode} |" in table for mode in ("sequential", "static", "continuous"))


def test_a_cancelled_waiting_request_gives_its_queue_place_back():
    dec = decoder_for("llada", **{"generation.gen_length": 32, "generation.block_length": 32, "generation.steps": 32})
    prompts = reference("llada")[2]
    sched = Scheduler(dec.model, max_batch=1, max_waiting=1)
    sched.submit(dec, prompts[0])
    sched.step()                                    # the first runs; the queue is empty again
    waiting = sched.submit(dec, prompts[1])
    with pytest.raises(QueueFull):
        sched.submit(dec, prompts[2])
    sched.cancel(waiting)
    last = sched.submit(dec, prompts[2])
    sched.run()
    assert waiting.state is None and last.tokens == dec.generate([prompts[2]]).tokens[0]


def test_a_failing_forward_fails_the_requests_in_it_and_the_scheduler_goes_on():
    from dllm_decode.testing import RandomLogitsModel

    class Fragile(RandomLogitsModel):
        """Fails (as a kernel or out of memory would) on any canvas holding token 42."""

        def forward(self, input_ids, attention_mask=None, **kw):
            if (input_ids == 42).any():
                raise RuntimeError("kernel failed")
            return super().forward(input_ids, attention_mask=attention_mask, **kw)

    model = Fragile(vocab_size=48, seed=3)
    dec = Decoder(model, load_recipe("llada", overrides=["generation.gen_length=8", "generation.block_length=8",
                                                         "generation.steps=8", "generation.batch_size=1"]))
    sched = Scheduler(model, max_batch=2)
    bad, good = sched.submit(dec, [42, 5]), sched.submit(dec, [6, 7])
    sched.step()
    assert isinstance(bad.error, RuntimeError) and isinstance(good.error, RuntimeError)   # one merged forward
    assert sched.running == []
    later = sched.submit(dec, [6, 7])
    sched.run()
    assert later.error is None and later.tokens == dec.generate([[6, 7]]).tokens[0]
