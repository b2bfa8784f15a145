"""What the steps of a batched decode fed, for the tests that check a finished row does not widen
the batch's feed."""

from dllm_decode.engine import Decoder


def narrow_after_a_stop(model, recipe, prompts) -> int:
    """Decode `prompts` step by step -> how many steps, taken after a row had finished, returned
    logits for fewer positions than the canvas holds."""
    dec = Decoder(model, recipe)
    state, narrow = dec.start(prompts), 0
    dec.open(state)
    while True:
        stopped = not bool(state.masked.any(1).all())
        out = dec.forward(state, dec.begin_step(state))
        narrow += stopped and out.logits.shape[1] < state.length
        if dec.end_step(state, out):
            break
    dec.close(state)
    return narrow


def decodes_as_alone(model, recipe, prompts) -> bool:
    """Whether every row of the batch gets the tokens it gets decoded alone."""
    alone = [Decoder(model, recipe).generate([p]).tokens[0] for p in prompts]
    return Decoder(model, recipe).generate(prompts).tokens == alone
