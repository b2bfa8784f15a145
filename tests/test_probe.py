"""tools.probe: the teacher-forced reading lines each answer character up with the logit that
predicts it (the shipped AR model copies without a wrong character and knows nothing of the
workload tasks), and bad flags are one error line."""

from pathlib import Path

import pytest

from dllm_decode.measure.evaluate import load_ar
from dllm_decode.tools.probe import main, probe_task, table

AR = Path(__file__).resolve().parents[1] / "models" / "ar-reference"


def test_a_learned_task_reads_clean_and_an_unlearned_one_does_not():
    model, tok = load_ar(str(AR))
    copy = probe_task(model, tok, "copy", 4)
    chain = probe_task(model, tok, "chain", 4)
    assert (copy.wrong_share, copy.whole, copy.first_wrong) == (0.0, 4, "") and copy.nats_per_char < 0.01
    assert chain.wrong_share > 0.5 and chain.whole == 0 and chain.nats_per_char > 2
    assert chain.first_wrong.endswith("]") and "->" in chain.first_wrong
    rows = table([copy, chain]).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| `copy` | 4 | 0.000 | 0.0% | 4 / 4 |")


@pytest.mark.parametrize("argv, message", [(["--n", "0"], "--n must be at least 1"),
                                           (["--tasks", "copy,nope"], "unknown task 'nope'")])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(AR), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
