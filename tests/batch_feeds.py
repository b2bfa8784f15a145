"""What each step of a batched decode fed, for the tests that check a finished row does not widen
the batch's feed."""


def fed_widths(dec, prompts) -> list[tuple[int, int, int]]:
    """Decode `prompts` with the Decoder `dec` step by step -> per step (rows still decoding before
    it, positions its forward returned logits for, canvas length)."""
    state, steps = dec.start(prompts), []
    dec.open(state)
    while True:
        live = int(state.masked.any(1).sum())
        out = dec.forward(state, dec.begin_step(state))
        steps.append((live, out.logits.shape[1], state.length))
        if dec.end_step(state, out):
            break
    dec.close(state)
    return steps
