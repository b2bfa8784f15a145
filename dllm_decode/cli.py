"""Command line: ``dllm-decode generate`` and ``dllm-decode plugins``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dllm_decode.errors import DllmDecodeError
from dllm_decode.recipes import find_recipe


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids {text!r}: expected comma-separated integers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-decode", description="Decode masked-diffusion language "
                                     "models under decoding policies composed from plugins.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="decode prompts with a model and a recipe")
    gen.add_argument("prompts", nargs="*", help="text prompts (tokenized with the model's tokenizer)")
    gen.add_argument("--input-ids", action="append", type=_parse_ids, default=[], metavar="1,2,3",
                     help="a prompt as token ids; repeat for several")
    gen.add_argument("--model", help="checkpoint directory (overrides the recipe's model.path)")
    gen.add_argument("--recipe", default="llada", help="recipe file, or the name of a shipped recipe "
                     "(default: llada)")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value, e.g. generation.steps=32 or select_tokens.threshold=0.8")
    gen.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="block a plugin by name")
    gen.add_argument("--task", metavar="NAME[,NAME]", help="decode held-out problems of these tasks "
                     "(copy, repeat, case, add) and score them")
    gen.add_argument("--n", type=int, default=1, help="with --task: problems per task (default 1)")
    gen.add_argument("--task-seed", type=int, default=0, help="with --task: seed of the held-out stream")
    gen.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with every row")
    gen.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    plug = sub.add_parser("plugins", help="list registered plugins, their slots and parameters")
    plug.add_argument("--json", action="store_true")
    plug.add_argument("--block", action="append", default=[], metavar="PLUGIN")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_plugins(args)
    except DllmDecodeError as exc:
        print(f"dllm-decode: error: {exc}", file=sys.stderr)
        return 2


def cmd_plugins(args: argparse.Namespace) -> int:
    from dllm_decode.plugins import get_plugin_manager, list_plugins

    infos = list_plugins(get_plugin_manager(block=args.block))
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2, default=str))
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "(registered directly)"
        flags = [f for f, on in (("revocable", info.meta.revocable),
                                 ("exact cache", info.meta.exact is True),
                                 ("approximate cache", info.meta.exact is False)) if on]
        print(f"{info.name}  [{origin}]" + (f"  ({', '.join(flags)})" if flags else ""))
        if info.meta.summary:
            print(f"    {info.meta.summary}")
        print(f"    slots: {', '.join(info.slots) or '-'}" +
              (f"; observes: {', '.join(info.observers)}" if info.observers else ""))
        for p in info.parameters:
            bounds = " ".join(f"{k} {v}" for k, v in p["bounds"].items())
            default = " (required)" if p["required"] else f" = {p['default']!r}"
            print(f"    - {p['name']}: {p['type']}{default}" + (f" ({bounds})" if bounds else "") +
                  (f"  {p['description']}" if p["description"] else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dllm_decode.config import load_recipe
    from dllm_decode.engine import Decoder
    from dllm_decode.plugins import get_plugin_manager
    from dllm_decode.policy import resolve

    recipe = load_recipe(find_recipe(args.recipe), overrides=args.overrides)
    pm = get_plugin_manager(block=args.block)
    policy = resolve(recipe, pm)            # every recipe error surfaces before the model loads
    model_path = args.model or recipe.model.path
    if not model_path:
        raise DllmDecodeError("no model: pass --model DIR or set model.path in the recipe")
    if not args.prompts and not args.input_ids and not args.task:
        raise DllmDecodeError("nothing to decode: give text prompts, --input-ids or --task")
    problems = _task_problems(args) if args.task else []
    from dllm_decode.models import load_model

    model, tokenizer = load_model(model_path, dtype=recipe.generation.dtype, device=recipe.model.device)
    if problems:
        if tokenizer is None:
            raise DllmDecodeError(f"{model_path}: no tokenizer files; --task needs one")
        return _decode_problems(model, tokenizer, recipe, pm, policy, problems, args)
    prompts = list(args.input_ids)
    if args.prompts:
        if tokenizer is None:
            raise DllmDecodeError(f"{model_path}: no tokenizer files; pass --input-ids instead of text")
        prompts += [_encode(tokenizer, text, args.chat) for text in args.prompts]
    decoder = Decoder(model, recipe, pm=pm, tokenizer=tokenizer, policy=policy)
    result = decoder.generate(prompts, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        out: dict[str, Any] = {"model": str(model_path), "recipe": recipe.source,
                               "rows": [r.as_dict() for r in result.rows]}
        print(json.dumps(out, indent=2))
    else:
        for r in result.rows:
            body = r.text if r.text is not None else " ".join(map(str, r.tokens))
            print(body)
            print(f"  [nfe {r.nfe}, steps {r.steps}, {r.seconds:.3f} s]", file=sys.stderr)
    return 0


def _task_problems(args: argparse.Namespace) -> list:
    from dllm_decode.tasks import get_task

    problems = []
    for name in args.task.split(","):
        try:
            task = get_task(name.strip())
        except KeyError as err:
            raise DllmDecodeError(f"--task: {err.args[0]}") from None
        problems += task.problems("test", args.n, args.task_seed)
    return problems


def _decode_problems(model, tokenizer, recipe, pm, policy, problems, args) -> int:
    from dllm_decode.evaluate import evaluate

    res = evaluate(model, tokenizer, recipe, problems, pm=pm, policy=policy,
                   progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"model": str(args.model or recipe.model.path), "recipe": recipe.source,
                          "seconds_per_problem": round(res.seconds_per_problem, 6),
                          "rows": [r.as_dict() for r in res.records]}, indent=2))
        return 0
    for r in res.records:
        print(f"[{r.task} #{r.index}] {r.prompt.rstrip()}")
        print("  " + r.completion.replace("\n", "\n  "))
        print(f"  -> {'correct' if r.correct else 'wrong'} (nfe {r.nfe})")
    print(f"exact match {res.accuracy:.3f} on {len(res.records)} held-out problem(s)", file=sys.stderr)
    return 0


def _encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DllmDecodeError("--chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
