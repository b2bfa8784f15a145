"""Per-row random draws: a row samples the same tokens alone and in any padded batch.

The hash is checked against splitmix64 written with Python integers (Steele, Lea and Flood,
"Fast splittable pseudorandom number generators", OOPSLA 2014), not against the code under
test; the engine-level checks decode real shipped recipes at T > 0 and with random orders.
"""

from __future__ import annotations

import pytest
import torch

from dllm_decode.config import load_recipe
from dllm_decode.engine import Decoder
from dllm_decode.errors import InputError
from dllm_decode.models import build_random_model
from dllm_decode.noise import RowNoise, mix
from dllm_decode.testing import RandomLogitsModel

U64 = (1 << 64) - 1


def splitmix64_finaliser(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


def test_mix_is_splitmix64_in_wrapping_int64():
    values = [0, 1, 2, 41, 12345, 2 ** 40 + 7, -1, -(2 ** 63), 2 ** 63 - 1, -987654321]
    got = mix(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & U64 for g in got] == [splitmix64_finaliser(v & U64) for v in values]


def test_uniforms_are_open_and_evenly_spread():
    noise = RowNoise.for_rows([[3, 4, 5], [9]], [0, 7])
    u = noise.uniform(2, torch.arange(500).expand(2, -1), "test", vocab=100)   # (2, 500, 100)
    assert u.dtype == torch.float64 and u.shape == (2, 500, 100)
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected).abs() / expected).max() < 0.03      # 5,000 draws a bin
    # neighbouring counters are not correlated
    flat = u.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01


def test_a_rows_draws_ignore_its_neighbours():
    index = torch.arange(16)
    alone = RowNoise.for_rows([[4, 5, 6]], [3]).uniform(5, index[None], "s", vocab=8)
    batch = RowNoise.for_rows([[1], [4, 5, 6], [7, 7, 7, 7, 7]], [0, 3, 1]).uniform(5, index.expand(3, -1), "s", vocab=8)
    assert torch.equal(alone[0], batch[1])


@pytest.mark.parametrize("change", ["seed", "prompt", "step", "index", "stream", "first_step"])
def test_every_counter_changes_the_draws(change):
    prompt, seed, step, stream = [4, 5, 6], 3, 5, "s"
    first = torch.zeros(1, dtype=torch.long)
    index = torch.arange(8)[None]

    def draw(prompt=prompt, seed=seed, step=step, index=index, stream=stream, first=first):
        base = RowNoise.for_rows([prompt], [seed])
        return RowNoise(base.keys, first).uniform(step, index, stream)

    other = {"seed": dict(seed=4), "prompt": dict(prompt=[4, 5, 7]), "step": dict(step=6),
             "index": dict(index=index + 1), "stream": dict(stream="t"), "first_step": dict(first=first + 1)}
    assert torch.equal(draw(), draw())
    assert not torch.isclose(draw(), draw(**other[change])).any()


def _tiny(family: str):
    return build_random_model(family, vocab_size=48, d_model=32, n_layers=2, n_heads=4, mask_token_id=47,
                              eos_token_id=1, pad_token_id=0, seed=3, dtype=torch.float64).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
SMALL = ["generation.gen_length=16", "generation.block_length=8", "generation.steps=16"]

#: shipped recipes that draw at random: random remasking, sampling, Dream's random orders
RANDOM_CASES = {
    "llada-random": ("llada", []),
    "llada-sampled": ("llada", ["generation.temperature=0.8"]),
    "threshold-sampled": ("llada", ["generation.temperature=0.8"]),
    "prophet-random": ("llada", ["policy.remasking=random"]),
    "wino-sampled": ("llada", ["generation.temperature=0.8"]),
    "dream-origin": ("dream", ["policy.alg=origin", "generation.temperature=0.5"]),
    "dream-alg-temp": ("dream", ["policy.alg_temp=0.5"]),
}


def _recipe_for(case: str, overrides: list[str]):
    name = {"llada-sampled": "llada", "threshold-sampled": "threshold", "prophet-random": "prophet",
            "wino-sampled": "wino", "dream-origin": "dream", "dream-alg-temp": "dream"}.get(case, case)
    return load_recipe(name, overrides=[*SMALL, *overrides])


@pytest.mark.parametrize("case", sorted(RANDOM_CASES))
def test_a_row_samples_alike_alone_and_in_a_padded_batch(case):
    family, overrides = RANDOM_CASES[case]
    model = _tiny(family)
    batched = Decoder(model, _recipe_for(case, [*overrides, "generation.batch_size=4"])).generate(PROMPTS)
    alone = Decoder(model, _recipe_for(case, [*overrides, "generation.batch_size=1"])).generate(PROMPTS)
    assert batched.tokens == alone.tokens
    # and the draws matter: another seed gives another output somewhere
    reseeded = Decoder(model, _recipe_for(case, [*overrides, "generation.seed=9"])).generate(PROMPTS)
    assert reseeded.tokens != batched.tokens


def test_per_row_seeds_give_a_prompt_several_samples():
    model = RandomLogitsModel(vocab_size=48, seed=5)
    dec = Decoder(model, load_recipe("llada", overrides=[*SMALL, "generation.temperature=1.0",
                                                         "generation.batch_size=4"]))
    prompt = [5, 6, 7]
    out = dec.generate([prompt] * 4, seeds=[1, 2, 1, 3]).tokens
    assert out[0] == out[2] and len({str(out[0]), str(out[1]), str(out[3])}) == 3
    assert dec.generate([prompt], seeds=[2]).tokens[0] == out[1]
    assert dec.generate([prompt] * 4).tokens == [dec.generate([prompt], seeds=[0]).tokens[0]] * 4


@pytest.mark.parametrize("seeds,message", [([1], "seeds has 1 entries for 2 prompts"),
                                           ([1, -2], r"seeds\[1\] is -2"), ([1, "a"], r"seeds\[1\] is 'a'")])
def test_bad_seeds_are_refused_naming_them(seeds, message):
    dec = Decoder(RandomLogitsModel(vocab_size=48, seed=5), load_recipe("llada", overrides=SMALL))
    with pytest.raises(InputError, match=message):
        dec.generate([[5, 6], [7]], seeds=seeds)
