"""EOS handling is an explicit recipe option: ban, deprioritise, early stop."""

import torch

from dllm_decode.config import recipe_from_dict
from dllm_decode.engine import Decoder
from dllm_decode.testing import RandomLogitsModel


class EosLover(RandomLogitsModel):
    """Prefers EOS (id 1) everywhere after the first two generated positions."""

    def forward(self, input_ids, attention_mask=None, plan=None, store=None):
        logits = super().forward(input_ids, attention_mask)
        logits[:, -6:, 1] += 50.0
        return logits


def _decode(eos, gen=8, steps=8, model=None, prompts=([3, 4, 5],)):
    recipe = recipe_from_dict({"policy": "llada", "generation": {"gen_length": gen, "steps": steps,
                                                                 "batch_size": len(prompts), "eos": eos}})
    return Decoder(model or EosLover(seed=2), recipe).generate([list(p) for p in prompts], keep_states=True)


def test_without_options_eos_is_generated_and_committed_first():
    row = _decode({}).rows[0]
    assert row.tokens[-6:] == [1] * 6
    assert sorted(row.commit_step[-6:]) == list(range(6))     # the most confident go first


def test_ban_removes_eos():
    row = _decode({"ban": True}).rows[0]
    assert 1 not in row.tokens


def test_deprioritize_commits_eos_last():
    row = _decode({"deprioritize": True}).rows[0]
    assert row.tokens[-6:] == [1] * 6
    assert sorted(row.commit_step[:2]) == [0, 1]               # content first, EOS afterwards


def test_stop_finishes_rows_early():
    plain = _decode({"deprioritize": True}, prompts=([3, 4, 5], [6, 7]))
    stopped = _decode({"deprioritize": True, "stop": True}, prompts=([3, 4, 5], [6, 7]))
    assert stopped.tokens == plain.tokens                     # same text...
    assert all(r.nfe == 3 for r in stopped.rows)              # ...after 2 content steps + 1 EOS step
    assert all(r.nfe == 8 for r in plain.rows)


def test_stop_only_counts_eos_with_nothing_masked_before_it():
    # Without deprioritise the EOS tail is committed first, before the content: no early stop.
    assert [r.nfe for r in _decode({"stop": True}).rows] == [8]


def test_custom_eos_ids():
    row = _decode({"ban": True, "ids": [7]}, model=RandomLogitsModel(seed=2)).rows[0]
    assert 7 not in row.tokens
