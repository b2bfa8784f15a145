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
    """The step history of ``row`` of a finished ``DecodeState`` (decoded with keep_states), in
    the columns of the final canvas (a canvas rule may have grown the row: earlier steps' positions
    are followed through each step's ``resize``)."""
    P, end = state.gen_start, int(state.ends[row])
    gen = state.x[row, P:end].tolist()
    steps = []
    for rec, cols in zip(state.history, _final_columns(state, row)):
        if not bool(rec.active[row]):
            continue
        at = lambda c: int(cols[c]) - P                                    # noqa: E731
        # a span boundary: the final column of the record's column there, the row's end past it
        bound = lambda c: at(c) if c < len(cols) and cols[c] >= 0 else end - P   # noqa: E731
        hit = torch.nonzero(rec.committed[row]).flatten().tolist()
        conf = rec.confidence[row].tolist()
        confidence: list[float | None] = [None] * (end - P)
        for c, value in enumerate(conf):
            if value != float("-inf") and value == value and cols[c] >= P:
                confidence[at(c)] = float(value)
        span = [bound(int(rec.span[row, 0])), bound(int(rec.span[row, 1]))]
        steps.append({"step": rec.step, "phase": rec.phase, "span": span, "committed": [at(c) for c in hit],
                      "committed_confidence": [float(conf[c]) for c in hit], "confidence": confidence})
    pieces = None
    if tokenizer is not None:
        pieces = [tokenizer.convert_ids_to_tokens(int(t)) for t in gen]
    return {"gen_start": P, "tokens": gen, "pieces": pieces,
            "commit_step": state.commit_step[row, P:end].tolist(), "nfe": int(state.row_nfe[row]),
            "steps": steps}


def _final_columns(state, row: int) -> list[torch.Tensor]:
    """Per step record, the final canvas column of each of the record's columns (its step's own
    canvas), composing the later steps' resizes backwards; the identity without canvas rules."""
    from dllm_decode.canvas import moved_columns

    cols = torch.arange(state.length)
    ends = state.ends.cpu().clone()
    out = []
    for rec in reversed(state.history):
        out.append(cols)
        r = rec.resize
        if r is not None:
            inserted = r.insert.sum(dim=1).cpu() if r.insert is not None else 0
            appended = torch.as_tensor(0 if r.append is None else r.append).cpu()
            ends = ends - inserted - appended
            moved = moved_columns(r, ends.to(state.device), int(ends.max())).cpu()[row]
            cols = torch.where(moved >= 0, cols[moved.clamp(min=0)], -1)
    return out[::-1]


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
