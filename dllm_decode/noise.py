"""Per-row random numbers: every draw a pure function of (row key, step, position, stream, id).

A request-wide ``torch.Generator`` hands out one stream in batch order, so a row's draws depend
on how many rows sit beside it and how long their prompts are: decoded in a batch, a row gets
other samples than decoded alone. Here each uniform is instead computed from counters with a
64-bit integer hash (splitmix64's finaliser, Steele et al., OOPSLA 2014), batched and on any
device, and bit-identical on CPU and GPU (integer arithmetic, exact conversion to float64).

The row key comes from the request's seed and the row's own prompt, or from an explicit
per-row seed. Two rows with the same prompt and seed therefore draw the same numbers (as they
would alone); give them different seeds for different samples. ``first_step`` lets a row that
joins a running batch count its steps from its own start.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from dllm_decode.state import DecodeState

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors; products wrap modulo 2**64 as unsigned ones do."""
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def combine(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A new key from ``key`` and an integer ``value`` (broadcasting)."""
    return mix(key ^ mix(value))


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """The top 53 bits as a float64 in the open interval (0, 1): never 0, so ``log`` is finite."""
    return (_shr(bits, 11).to(torch.float64) + 0.5) * 2.0 ** -53


def stream_id(name: str) -> int:
    """A stable integer for a stream name (Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode())


def row_key(seed: int, prompt: Sequence[int]) -> int:
    """The key of a row: its seed folded with every token of its prompt (host side, once)."""
    key = torch.tensor([_signed(seed & _MASK64)], dtype=torch.long)
    key = combine(key, torch.tensor([len(prompt)], dtype=torch.long))
    for token in prompt:                  # building the request, not the hot loop
        key = combine(key, torch.tensor([token], dtype=torch.long))
    return int(key)


@dataclass(frozen=True)
class RowNoise:
    """The random source of a batch: one key and one first step per row."""

    keys: torch.Tensor         # (B,) int64
    first_step: torch.Tensor   # (B,) long: the request step at which each row started

    @classmethod
    def for_rows(cls, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                 device: torch.device | str | None = None) -> "RowNoise":
        keys = torch.tensor([row_key(s, p) for s, p in zip(seeds, prompts)], dtype=torch.long, device=device)
        return cls(keys=keys, first_step=torch.zeros_like(keys))

    def uniform(self, step: int, index: torch.Tensor, stream: str, vocab: int | None = None) -> torch.Tensor:
        """Uniforms in (0, 1), float64: ``(B, q)`` for the ``(B, q)`` long ``index`` (a row's own
        position, e.g. its generated-token index), or ``(B, q, vocab)`` with one per token id."""
        key = combine(self.keys ^ stream_id(stream), step - self.first_step)       # (B,)
        key = combine(key[:, None], index)                                          # (B, q)
        if vocab is not None:
            ids = mix(torch.arange(vocab, device=key.device, dtype=torch.long))     # (V,)
            key = mix(key[..., None] ^ ids)                                         # (B, q, V)
        return to_unit(key)


def draws(state: "DecodeState", positions: torch.Tensor | None, stream: str,
          vocab: int | None = None) -> torch.Tensor:
    """This step's uniforms for the queried canvas ``positions`` ((B, q) long, or None for every
    column), keyed by each row's generated-token index so that left padding changes nothing.
    ``(B, q)`` float64, or ``(B, q, vocab)`` with ``vocab``."""
    if positions is None:
        positions = torch.arange(state.length, device=state.device).expand(state.batch_size, -1)
    return state.noise.uniform(state.step, positions - state.gen_start, stream, vocab)


def gumbel_draws(state: "DecodeState", positions: torch.Tensor | None, stream: str,
                 vocab: int | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log u)`` over the uniforms of :func:`draws`."""
    return -torch.log(-torch.log(draws(state, positions, stream, vocab)))
