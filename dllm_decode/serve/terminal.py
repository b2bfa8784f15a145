"""``dllm-decode generate --stream``: the canvas filling in, in a terminal or as plain text.

On a terminal every row is one line, redrawn after each step: committed tokens as text (line
breaks shown as ``⏎``), masked positions as ``_``, the tail after a row's stop id dropped. When
stdout is not a terminal nothing is redrawn: with one prompt the settled text is written as it
grows (the committed prefix), with several each row's text is written once it is finished.
"""

from __future__ import annotations

import shutil
from typing import Any, Sequence, TextIO

from dllm_decode.engine import Decoder
from dllm_decode.serve.stream import RowUpdate, stream

MASK = "_"
NEWLINE = "⏎"


def render_canvas(update: RowUpdate, tokenizer: Any, mask_id: int, stop_ids: Sequence[int]) -> str:
    """One line picturing a row's generated region: text, ``_`` per masked position."""
    cells = []
    for token in update.canvas:
        if token == mask_id:
            cells.append(MASK)
        elif token in stop_ids:
            break
        else:
            cells.append(tokenizer.decode([token], skip_special_tokens=True).replace("\n", NEWLINE))
    return "".join(cells)


def stream_to(out: TextIO, decoder: Decoder, prompts: Sequence[Sequence[int]], tokenizer: Any,
              tty: bool) -> list[str]:
    """Decode ``prompts`` in batches of the recipe's batch size, showing each step on ``out``;
    returns every row's final text."""
    texts: list[str] = []
    size = decoder.gen.batch_size
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        texts += _one_batch(out, decoder, batch, tokenizer, tty, single=len(prompts) == 1)
    return texts


def _one_batch(out: TextIO, decoder: Decoder, batch: Sequence[Sequence[int]], tokenizer: Any,
               tty: bool, single: bool) -> list[str]:
    shown = [""] * len(batch)
    drawn = False
    updates: list[RowUpdate] = []
    for updates in stream(decoder, batch, tokenizer=tokenizer):
        if tty:
            if drawn:
                out.write(f"\x1b[{len(batch)}F")          # back to the first row's line
            width = shutil.get_terminal_size().columns - 1     # a wrapped line would break the redraw
            for u in updates:
                line = render_canvas(u, tokenizer, decoder.mask_id, decoder.eos_ids)
                out.write("\x1b[2K" + line[:width] + "\n")
            drawn = True
        elif single:
            text = updates[0].text or ""
            if text.startswith(shown[0]):
                out.write(text[len(shown[0]):])
                shown[0] = text
        out.flush()
    finals = [u.text or "" for u in updates]
    if not tty and single:
        # the rest of the text; a tokenizer that re-segmented the end gets the whole text again
        rest = finals[0][len(shown[0]):] if finals[0].startswith(shown[0]) else "\n" + finals[0]
        out.write(rest + "\n")
    elif not tty:
        out.write("".join(t + "\n" for t in finals))
    out.flush()
    return finals
