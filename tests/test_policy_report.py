"""The policy report: measured rows, ratios against each model's first row, and the doc update."""

from pathlib import Path

import pytest

from dllm_decode.tools.policy_report import END, START, Entry, measure, render
from dllm_decode.tools.reporting import write_between_markers

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_measure_two_policies_on_the_reference_model():
    rows = measure(MODELS, ["copy"], 2, 0, entries=(Entry("llada-reference", "baseline", "llada"),
                                                    Entry("llada-reference", "fast", "threshold",
                                                          ("generation.block_length=96",))), progress=False)
    assert [r["label"] for r in rows] == ["baseline", "fast"]
    assert rows[0]["nfe"] == 96 and rows[1]["nfe"] < 96
    assert rows[0]["tasks"]["copy"]["n"] == 2


def _row(model, nfe, sec, acc=0.5):
    return {"model": model, "label": f"{model}-{nfe}", "recipe": "r", "overrides": [], "tasks": {"t": {"accuracy": acc}},
            "accuracy": acc, "nfe": nfe, "seconds_per_problem": sec}


def test_ratios_are_against_the_first_row_of_each_model():
    table = render([_row("a", 100, 1.0), _row("a", 25, 0.5), _row("b", 10, 2.0), _row("b", 5, 0.5)], ["t"])
    lines = table.splitlines()[2:]
    assert lines[1].endswith("| 4.0x | 2.0x |")
    assert lines[2].endswith("| 1.0x | 1.0x |")
    assert lines[3].endswith("| 2.0x | 4.0x |")


def test_write_keeps_the_rest_of_the_doc(tmp_path):
    doc = tmp_path / "p.md"
    doc.write_text(f"intro\n{START}\nold\n{END}\noutro\n")
    write_between_markers(doc, "NEW", START, END)
    assert doc.read_text() == f"intro\n{START}\nNEW\n{END}\noutro\n"
    (tmp_path / "q.md").write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        write_between_markers(tmp_path / "q.md", "NEW", START, END)


def test_every_shipped_recipe_is_documented_and_measured():
    """Recipes without a cache belong to the policy report, recipes with one to the cache report."""
    from dllm_decode.tools import cache_report
    from dllm_decode.config import load_recipe
    from dllm_decode.tools.policy_report import ENTRIES
    from dllm_decode.recipes import find_recipe, shipped_recipes

    docs = Path(__file__).resolve().parents[1] / "docs"
    policies, caches = (docs / "policies.md").read_text(), (docs / "caches.md").read_text()
    measured_policies = {e.recipe for e in ENTRIES}
    measured_caches = {e.recipe for e in cache_report.entries(256)}
    for name in shipped_recipes():
        cache = load_recipe(find_recipe(name)).cache_policy
        if cache is None or cache.plugin == "none":
            assert f"`{name}`" in policies and name in measured_policies, name
        else:
            assert f"`{name}`" in caches and name in measured_caches, name
    assert START in policies and "| llada-reference | baseline" in policies
    assert cache_report.START in caches and "| llada-reference | llada, 1 token" in caches


def test_cache_report_agreement_names_real_rows_and_compares_completions():
    """Every approximate row's no-cache partner is a row of the report, and `agreement` is the
    share of equal completions (problems matched by task and index)."""
    from dllm_decode.tools import cache_report

    labels = {e.label for e in cache_report.entries(256)}
    assert set(cache_report.NO_CACHE) <= labels and set(cache_report.NO_CACHE.values()) <= labels

    def row(label, completions):
        return {"model": "m", "label": label,
                "problems": [{"task": "copy", "index": i, "completion": c} for i, c in enumerate(completions)]}

    base, cached = "threshold 0.9, blocks of 32", "threshold + kv_block dual (Fast-dLLM)"
    rows = [row(base, ["ab", "cd", "ef", "gh"]), row(cached, ["ab", "cx", "ef", "gh"]),
            row("threshold + elastic_cache (window 16, gamma 0.9)", ["ab"] * 4)]
    assert cache_report.agreement(rows) == [None, 0.75, None]
