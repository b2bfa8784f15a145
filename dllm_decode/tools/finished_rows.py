"""What leaving finished rows out of a batch's forwards saves: the engine as it is against the same
engine feeding every row of the batch to the end, on the same model and problems, alternating
batch by batch in one process (the first batch's order swapped each time).

    python -m dllm_decode.tools.finished_rows --model models/dream-workload --recipes threshold \
        --tasks chain,columns --n 16 --gen-length 256

A row is finished once it has no mask left (or, with ``generation.eos.stop``, its stop id is
committed). A forward that keeps nothing in the cache store (no plan, or a plan with no store read
or write) then runs the unfinished rows only, and so does a forward against the store when the
cache plugin declares ``PluginMeta.drops_rows`` (no revocable selection).
Both decoders must give every row the same tokens (checked on every batch); the FLOPs are the
executor's count, the seconds the wall time of each decoder's batches.

With ``--ar-model DIR`` an autoregressive model's greedy decoding is measured the same way: the
AR baseline's loop (``measure.ar_decode``, finished rows leave the batch and its KV cache)
against ``transformers`` ``generate``, which feeds every row until the last has stopped.
"""

from __future__ import annotations

import argparse
import time

import torch

from dllm_decode.engine import Decoder


class FeedingEveryRow(Decoder):
    """The engine with its finished rows fed to the end of the request (and kept in the store)."""

    def end_step(self, state, out):
        finished = super().end_step(state, out)
        state.live_rows = None
        return finished


def in_turn(decoders: dict, args: tuple, i: int, seconds: dict) -> dict:
    """Each decoder's output on the same batch ``args`` (batch ``i``), the order swapped every
    other batch; each one's wall time added to ``seconds``."""
    out = {}
    for name in (list(decoders) if i % 2 == 0 else list(decoders)[::-1]):
        t = time.perf_counter()
        out[name] = decoders[name](*args)
        seconds[name] += time.perf_counter() - t
    return out


@torch.inference_mode()
def measure(model, tokenizer, recipe, problems, batch_size: int) -> dict:
    decoders = {"leaving": Decoder(model, recipe).generate, "feeding": FeedingEveryRow(model, recipe).generate}
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    for dec in decoders.values():                          # warm-up
        dec(prompts[:batch_size])
    seconds = dict.fromkeys(decoders, 0.0)
    flops = dict.fromkeys(decoders, 0.0)
    forwards = dict.fromkeys(decoders, 0)
    row_forwards = 0
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        results = in_turn(decoders, (batch,), i, seconds)
        for name, res in results.items():
            flops[name] += sum(r.flops for r in res.rows) * len(batch)
            forwards[name] += max(r.nfe for r in res.rows) * len(batch)
        row_forwards += sum(r.nfe for r in results["leaving"].rows)
        if results["leaving"].tokens != results["feeding"].tokens:
            raise SystemExit(f"batch {i}: the two decoders gave different tokens")
    return {"live_share": row_forwards / forwards["feeding"], "flops": flops["leaving"] / flops["feeding"],
            "seconds": seconds, "speedup": seconds["feeding"] / seconds["leaving"]}


@torch.inference_mode()
def measure_ar(model, tokenizer, problems, batch_size: int, max_new_tokens: int) -> dict:
    """The AR baseline's greedy loop against ``generate`` on the same batches, tokens checked."""
    from dllm_decode.measure.ar_decode import greedy_decode
    from dllm_decode.measure.evaluate import generated_tokens
    from dllm_decode.models.loader import encode_prompts

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def feeding(ids, att):
        return model.generate(input_ids=ids, attention_mask=att.long(), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]

    decoders = {"leaving": lambda ids, att: greedy_decode(model, ids, att, max_new_tokens, eos, pad),
                "feeding": feeding}
    batches = [encode_prompts(tokenizer, [p.prompt for p in problems[s:s + batch_size]], pad_token_id=pad,
                              device=model.device, add_special_tokens=False)
               for s in range(0, len(problems), batch_size)]
    for dec in decoders.values():                          # warm-up
        dec(*batches[0])
    seconds = dict.fromkeys(decoders, 0.0)
    row_forwards = batch_forwards = 0
    for i, batch in enumerate(batches):
        tokens = {name: [row[:generated_tokens(row, {eos})] for row in out.tolist()]
                  for name, out in in_turn(decoders, batch, i, seconds).items()}
        if tokens["leaving"] != tokens["feeding"]:
            raise SystemExit(f"AR batch {i}: the two loops gave different tokens")
        lengths = [len(row) for row in tokens["leaving"]]
        row_forwards += sum(lengths)
        batch_forwards += max(lengths) * len(lengths)
    return {"live_share": row_forwards / batch_forwards, "seconds": seconds,
            "speedup": seconds["feeding"] / seconds["leaving"]}


def main(argv: list[str] | None = None) -> None:
    from dllm_decode.config import load_recipe
    from dllm_decode.models import load_model
    from dllm_decode.tools.reporting import held_out, machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/dream-workload")
    ap.add_argument("--recipes", nargs="*", default=["threshold"], help="none: the AR model alone")
    ap.add_argument("--tasks", default="chain,columns")
    ap.add_argument("--n", type=int, default=16, help="problems per task")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ar-model", help="also an autoregressive model's greedy decoding: the AR baseline's "
                    "loop against transformers generate")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    problems = held_out(a.tasks.split(","), a.n, 0)
    print(f"model {a.model} | tasks {a.tasks} x {a.n} | gen {a.gen_length} | batch {a.batch_size} | "
          f"{machine()}")
    print("| recipe | row forwards / batch forwards | FLOPs (leaving / feeding) | seconds leaving | "
          "seconds feeding | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in a.recipes:
        recipe = load_recipe(name, [f"generation.gen_length={a.gen_length}", f"generation.batch_size={a.batch_size}",
                                    *a.set])
        r = measure(model, tok, recipe, problems, a.batch_size)
        label = " ".join([f"`{name}`", *(f"`{s}`" for s in a.set)])
        print(f"| {label} | {r['live_share']:.2f} | {r['flops']:.3f} | {r['seconds']['leaving']:.1f} | "
              f"{r['seconds']['feeding']:.1f} | {r['speedup']:.2f}x |", flush=True)
    if a.ar_model:
        from dllm_decode.measure.evaluate import load_ar

        ar, ar_tok = load_ar(a.ar_model)
        r = measure_ar(ar, ar_tok, problems, a.batch_size, a.gen_length)
        print(f"| AR `{a.ar_model}`, greedy (ours / `generate`) | {r['live_share']:.2f} | | "
              f"{r['seconds']['leaving']:.1f} | {r['seconds']['feeding']:.1f} | {r['speedup']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
