"""The autoregressive baseline's greedy loop against ``transformers`` ``generate``: the same tokens
for a left-padded batch whose rows stop at different lengths, while its finished rows leave the
batch and the KV cache."""

from pathlib import Path

import torch

from dllm_decode.measure.ar_decode import greedy_decode
from dllm_decode.measure.evaluate import generated_tokens
from dllm_decode.measure.tasks import get_task
from dllm_decode.models.loader import encode_prompts, load_causal_lm

MODELS = Path(__file__).resolve().parents[1] / "models"


class _Rows:
    """The model, recording how many rows each forward ran."""

    def __init__(self, model):
        self.model, self.rows, self.forward = model, [], model.forward

    def __call__(self, input_ids, **kwargs):
        self.rows.append(input_ids.shape[0])
        return self.model(input_ids=input_ids, **kwargs)


def _batch(tok, tasks=("copy", "repeat", "case", "repeat", "copy")):
    prompts = [p.prompt for t in tasks for p in get_task(t).problems("test", 2, seed=4)]
    return encode_prompts(tok, prompts, pad_token_id=tok.pad_token_id, device="cpu", add_special_tokens=False)


def test_the_greedy_loop_writes_what_generate_writes():
    from transformers import AutoTokenizer

    model = load_causal_lm(MODELS / "ar-reference", dtype="float64")
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ar-reference"), trust_remote_code=False)
    ids, att = _batch(tok)
    assert not bool(att.all()), "the prompts must differ in length for this test to bite"
    eos, pad, n = tok.eos_token_id, tok.pad_token_id, 96
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=att.long(), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]
    recording = _Rows(model)
    ours = greedy_decode(recording, ids, att, n, eos, pad)
    lengths = [generated_tokens(row, {eos}) for row in ref.tolist()]
    assert len(set(lengths)) > 1 and max(lengths) < n, "rows must stop at different lengths, before the limit"
    for row, (r, o, k) in enumerate(zip(ref.tolist(), ours.tolist(), lengths)):
        assert o[:k] == r[:k], row
        assert all(t == pad for t in o[k:]), row
    # a forward a token until the longest row's EOS, each over the rows that had not written theirs
    assert len(recording.rows) == max(lengths)
    assert recording.rows == [sum(k > t for k in lengths) for t in range(max(lengths))]


def test_a_token_limit_cuts_every_row():
    from transformers import AutoTokenizer

    model = load_causal_lm(MODELS / "ar-reference", dtype="float64")
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ar-reference"), trust_remote_code=False)
    ids, att = _batch(tok, ("copy", "repeat"))
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=att.long(), max_new_tokens=5, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(greedy_decode(model, ids, att, 5, tok.eos_token_id, tok.pad_token_id), ref)
    assert greedy_decode(model, ids, att, 0, tok.eos_token_id, tok.pad_token_id).shape == (ids.shape[0], 0)


def test_the_finished_rows_tool_compares_the_greedy_loop_with_generate():
    """`tools.finished_rows --ar-model`: the same tokens both ways (it stops otherwise), and the
    loop's batches ran fewer row-forwards than generate's."""
    from dllm_decode.measure.evaluate import load_ar
    from dllm_decode.tools.finished_rows import measure_ar

    model, tok = load_ar(str(MODELS / "ar-reference"))
    problems = [p for t in ("copy", "repeat", "case") for p in get_task(t).problems("test", 2, seed=4)]
    r = measure_ar(model, tok, problems, 3, 96)
    assert 0 < r["live_share"] < 1
