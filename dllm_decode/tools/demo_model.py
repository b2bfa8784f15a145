"""A tiny random-weight checkpoint in the real on-disk formats, with a character tokenizer.

Used by tests and by the demo until the trained reference models ship: it goes through the
same loader path as a downloaded LLaDA or Dream checkpoint (config.json, safetensors,
tokenizer.json). ``python -m dllm_decode.tools.demo_model DIR [--family dream]`` writes one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dllm_decode.tools.char_tokenizer import save_char_tokenizer


def make_demo_model(directory: str | Path, family: str = "llada", d_model: int = 64, n_layers: int = 2,
                    seed: int = 0, shards: int = 1) -> Path:
    from dllm_decode.models import build_random_model, save_pretrained

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(directory)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model = build_random_model(family, vocab_size=len(tok), d_model=d_model, n_layers=n_layers, n_heads=4,
                               n_kv_heads=4 if family == "llada" else 2, mask_token_id=tok.mask_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, eot_token_id=eot,
                               seed=seed, max_length=1024)
    save_pretrained(model, directory, shards=shards)
    (directory / "README.md").write_text(
        f"# tiny-random-{family}\n\nRandom weights (seed {seed}), {family} on-disk format, character tokenizer.\n"
        "It exercises the loading and decoding machinery; its text is meaningless.\n\n"
        f"Made by `python -m dllm_decode.tools.demo_model {directory.name} --family {family} --seed {seed}`.\n")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--family", choices=("llada", "dream"), default="llada")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_demo_model(args.directory, family=args.family, seed=args.seed))


if __name__ == "__main__":
    main()
