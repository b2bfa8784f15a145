"""What the steps of a batched decode fed, for the tests that check a finished row does not widen
the batch's feed."""

import torch

from dllm_decode.engine import Decoder


def steps(model, recipe, prompts, pm=None):
    """Decode `prompts` step by step, yielding after each forward (state, the rows finished before
    the step (B,) bool, its plan, its output); the step is then ended."""
    dec = Decoder(model, recipe, pm=pm)
    state = dec.start(prompts)
    dec.open(state)
    while True:
        done = state.done.clone()
        plan = dec.begin_step(state)
        out = dec.forward(state, plan)
        yield state, done, plan, out
        if dec.end_step(state, out):
            break
    dec.close(state)


def narrow_after_a_stop(model, recipe, prompts) -> int:
    """How many steps, taken after a row had finished, returned logits for fewer positions than the
    canvas holds."""
    return sum(bool(done.any()) and out.logits.shape[1] < state.length
               for state, done, _, out in steps(model, recipe, prompts))


def decodes_as_alone(model, recipe, prompts) -> bool:
    """Whether every row of the batch gets the tokens it gets decoded alone."""
    alone = [Decoder(model, recipe).generate([p]).tokens[0] for p in prompts]
    return Decoder(model, recipe).generate(prompts).tokens == alone


def what_finished_rows_fed(model, recipe, prompts) -> tuple[int, int, int]:
    """-> (steps taken while some rows had finished and others not, positions those finished rows
    fed in them (the plan's index less its padding), finished rows that recomputed layers in full
    (a layer-adaptive store's ``refresh_from`` below the layer count, which sends the whole batch
    full width))."""
    n, fed, switched = 0, 0, 0
    for state, done, plan, _ in steps(model, recipe, prompts):
        if not done.any() or done.all():
            continue
        n += 1
        index = getattr(plan, "index", None)
        if index is not None:
            pad = torch.zeros_like(index, dtype=torch.bool) if plan.index_pad is None else plan.index_pad
            fed += int((~pad)[done].sum())
        store = state.store
        if getattr(store, "refresh_from", None) is not None:
            # the rows the store still holds (a finished row that left it recomputes nothing)
            held = store.batch_rows(torch.ones_like(store.refresh_from, dtype=torch.bool), state.batch_size)
            start = store.batch_rows(store.refresh_from, state.batch_size)
            switched += int((start < model.arch.n_layers)[done & held].sum())
    return n, fed, switched
