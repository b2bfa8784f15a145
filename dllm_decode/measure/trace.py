"""``dllm-decode trace``: what a policy did to one prompt, step by step, as a record and a picture.

The record (``--json``) holds, per step, the span, the phase label, the positions committed and
their confidences, and the confidence of every position that could have been committed. The
picture has two panels over the generated positions (across) and the steps (down): the
decoding order (each cell coloured by the step's phase where a token was committed there, the
span's bounds drawn per step, already written positions grey) and the confidence of every
eligible position at every step.
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    steps = record["steps"]
    G, S = len(record["tokens"]), len(steps)
    phases = list(dict.fromkeys(s["phase"] or "step" for s in steps))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]
    # order grid: 0 masked, 1 written earlier, 2 + k committed now in phase k
    order = np.zeros((S, G))
    conf = np.full((S, G), np.nan)
    written = np.zeros(G, dtype=bool)
    for i, s in enumerate(steps):
        order[i, written] = 1
        for pos in s["committed"]:
            order[i, pos] = 2 + phases.index(s["phase"] or "step")
        written[s["committed"]] = True
        conf[i] = [np.nan if c is None else c for c in s["confidence"]]
    height = max(4.5, min(14.0, 2.5 + 0.09 * S))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10.0, min(24.0, 0.12 * G + 4)), height), sharey=True)
    colours = ["#f2f2f2", "#bdbdbd"] + palette[:len(phases)]
    ax1.imshow(order, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours), vmin=-0.5,
               vmax=len(colours) - 0.5,
               extent=(-0.5, G - 0.5, S - 0.5, -0.5))
    for i, s in enumerate(steps):                      # the span of each step: two thin bars
        a, b = s["span"]
        ax1.plot([a - 0.5, a - 0.5], [i - 0.5, i + 0.5], color="black", lw=0.8)
        ax1.plot([b - 0.5, b - 0.5], [i - 0.5, i + 0.5], color="black", lw=0.8)
    ax1.set_xlabel("generated position")
    ax1.set_ylabel("step")
    ax1.set_title("decoding order (black bars: span)")
    handles = [Patch(color=palette[k], label=f"committed ({p})") for k, p in enumerate(phases)]
    handles.append(Patch(color="#bdbdbd", label="written earlier"))
    ax1.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.9)
    im = ax2.imshow(conf, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                    extent=(-0.5, G - 0.5, S - 0.5, -0.5))
    ax2.set_xlabel("generated position")
    ax2.set_title("confidence of eligible positions")
    fig.colorbar(im, ax=ax2, fraction=0.04)
    pieces = record.get("pieces")
    if pieces and G <= 128:
        for ax in (ax1, ax2):
            ax.set_xticks(range(G))
            ax.set_xticklabels([_show(p) for p in pieces], fontsize=5, rotation=90)
    fig.suptitle(title or f"{S} steps, {G} positions")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _show(piece: str | None) -> str:
    if piece is None:
        return "?"
    return {"\n": "\\n", " ": "␣"}.get(piece, piece if len(piece) <= 6 else piece[:5] + "…")
