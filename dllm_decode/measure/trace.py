"""``dllm-decode trace``: what a policy did to one prompt, step by step, as a record and a picture.

The record (``--json``) holds, per step, the span, the phase label, the positions committed and
their confidences, and the confidence of every position that could have been committed. The
picture has two panels over the generated positions (across) and the steps (down): the
decoding order (each cell coloured by the step's phase where a token was committed there, each
step's span outlined in red, already written positions grey) and the confidence of every
eligible position at every step; the legend and the decoded text sit below the panels.
"""

from __future__ import annotations

from typing import Any

import torch


def trace_record(state, tokenizer=None, row: int = 0) -> dict[str, Any]:
    """The step history of ``row`` of a finished ``DecodeState`` (decoded with keep_states)."""
    P = state.gen_start
    gen = state.x[row, P:].tolist()
    steps = []
    for rec in state.history:
        if not bool(rec.active[row]):
            continue
        committed = torch.nonzero(rec.committed[row, P:]).flatten().tolist()
        conf = rec.confidence[row, P:]
        eligible = torch.isfinite(conf)
        steps.append({
            "step": rec.step, "phase": rec.phase,
            "span": [int(rec.span[row, 0]) - P, int(rec.span[row, 1]) - P],
            "committed": committed,
            "committed_confidence": [float(conf[i]) for i in committed],
            "confidence": [float(c) if e else None for c, e in zip(conf.tolist(), eligible.tolist())],
        })
    pieces = None
    if tokenizer is not None:
        pieces = [tokenizer.convert_ids_to_tokens(int(t)) for t in gen]
    return {"gen_start": P, "tokens": gen, "pieces": pieces,
            "commit_step": state.commit_step[row, P:].tolist(), "nfe": int(state.row_nfe[row]),
            "steps": steps}


def draw(record: dict[str, Any], path: str, title: str = "") -> None:
    """Write :func:`figure` of ``record`` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(record, title)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def figure(record: dict[str, Any], title: str = ""):
    """The two panels (decoding order with each step's span, confidence), steps down and
    positions across, with the legend and the decoded text below them, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = record["steps"]
    G, S = len(record["tokens"]), len(steps)
    phases = list(dict.fromkeys(s["phase"] or "step" for s in steps))
    order, conf = _grids(steps, G, phases)
    fig = plt.figure(figsize=(max(10.0, min(24.0, 0.1 * G + 5)), max(4.5, min(14.0, 3.4 + 0.09 * S))))
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw=dict(left=0.06, right=0.95, top=0.86, bottom=0.3,
                                                                   wspace=0.08))
    handles = _draw_order(ax1, order, steps, phases)
    im = ax2.imshow(conf, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                    extent=(-0.5, G - 0.5, S - 0.5, -0.5))
    ax2.set_title("confidence of eligible positions")
    fig.colorbar(im, ax=ax2, fraction=0.04, pad=0.02)
    for ax in (ax1, ax2):
        _integer_axes(ax, steps, G)
    ax1.set_ylabel("step")
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.06, 0.01), ncol=min(4, len(handles)),
               fontsize=8, frameon=False)
    text = _decoded(record)
    if text:
        fig.text(0.06, 0.1, "decoded: " + text, fontsize=8, family="monospace", va="bottom")
    fig.suptitle(title or f"{S} steps, {G} positions")
    return fig


def _grids(steps: list[dict[str, Any]], G: int, phases: list[str]):
    """order: 0 masked, 1 written earlier, 2 + k committed now in phase k; conf: NaN where not eligible."""
    import numpy as np

    order, conf = np.zeros((len(steps), G)), np.full((len(steps), G), np.nan)
    written = np.zeros(G, dtype=bool)
    for i, s in enumerate(steps):
        order[i, written] = 1
        for pos in s["committed"]:
            order[i, pos] = 2 + phases.index(s["phase"] or "step")
        written[s["committed"]] = True
        conf[i] = [np.nan if c is None else c for c in s["confidence"]]
    return order, conf


def _draw_order(ax, order, steps: list[dict[str, Any]], phases: list[str]) -> list:
    """The decoding-order panel; -> the legend handles."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]
    colours = ["#f2f2f2", "#bdbdbd"] + palette[:len(phases)]
    S, G = order.shape
    ax.imshow(order, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours), vmin=-0.5,
              vmax=len(colours) - 0.5, extent=(-0.5, G - 0.5, S - 0.5, -0.5))
    for i, s in enumerate(steps):       # each step's span: a red outline inside its row
        a, b = s["span"]
        ax.add_patch(Rectangle((a - 0.45, i - 0.42), b - a - 0.1, 0.84, fill=False, edgecolor="red", lw=1.4,
                               gid="span"))
    ax.set_title("decoding order")
    handles = [Patch(facecolor=palette[k], edgecolor="grey", label=f"committed ({p})") for k, p in enumerate(phases)]
    return handles + [Patch(facecolor=c, edgecolor="grey", label=label)
                      for c, label in (("#bdbdbd", "written earlier"), ("#f2f2f2", "masked"))] + \
        [Line2D([], [], color="red", lw=1.4, label="span of the step (red outline)")]


def _integer_axes(ax, steps: list[dict[str, Any]], G: int) -> None:
    """Whole steps down (the engine's step numbers), whole positions across, few enough to read."""
    from matplotlib.ticker import MaxNLocator

    every = max(1, -(-len(steps) // 20))
    rows = list(range(0, len(steps), every))
    ax.set_yticks(rows)
    ax.set_yticklabels([str(steps[i]["step"]) for i in rows])
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.set_xlim(-0.5, G - 0.5)
    ax.set_xlabel("generated position")


def _decoded(record: dict[str, Any], width: int = 110) -> str:
    """The decoded canvas as one readable line: newlines shown as ⏎, a trailing run of one
    repeated special token (the EOS padding) collapsed into a count."""
    pieces = record.get("pieces")
    if not pieces:
        return ""
    tail = 0
    while tail < len(pieces) and pieces[-1 - tail] == pieces[-1] and len(pieces[-1]) > 1:
        tail += 1
    text = "".join("⏎" if p == "\n" else (p or "?") for p in pieces[:len(pieces) - tail])
    if tail:
        text += f"  + {tail} x {pieces[-1]}"
    return text if len(text) <= width else text[:width - 1] + "…"
