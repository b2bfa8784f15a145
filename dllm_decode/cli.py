"""Command line: ``dllm-decode generate``, ``dllm-decode bench``, ``dllm-decode plugins`` and
``dllm-decode eval`` (lm-evaluation-harness, see :mod:`dllm_decode.harness.command`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from dllm_decode.config import DTYPES, resolve_recipe
from dllm_decode.errors import DllmDecodeError, InputError, RecipeError
from dllm_decode.plugins import BrokenPluginWarning
from dllm_decode.recipes import find_recipe


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids {text!r}: expected comma-separated integers") from None


def _recipe_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """The flags every decoding subcommand shares: model, device, dtype, generation length, --set."""
    p.add_argument("--model", help=model_help + "; default: the recipe's model.path, else (in a checkout) "
                   "the shipped models/llada-reference")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (sets model.device)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (sets generation.dtype)")
    p.add_argument("--gen-length", type=int, metavar="L", help="generation length (a one-block recipe stays "
                   "one block, a one-token-per-forward schedule stays so)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. generation.steps=32 or select_tokens.threshold=0.8")
    p.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="block a plugin by name")


def _generate_parser(sub: Any) -> None:
    gen = sub.add_parser("generate", help="decode prompts with a model and a recipe")
    gen.add_argument("prompts", nargs="*", help="text prompts (tokenized with the model's tokenizer); rows "
                     "are decoded, printed and numbered (from 1) --input-ids first, then text prompts")
    gen.add_argument("--input-ids", action="append", type=_parse_ids, default=[], metavar="1,2,3",
                     help="a prompt as token ids; repeat for several")
    gen.add_argument("--recipe", help="recipe file, or the name of a shipped recipe (default: the model "
                     "family's, sdar or llada2 for those block-diffusion checkpoints, else llada)")
    _recipe_flags(gen, "checkpoint directory (overrides the recipe's model.path)")
    gen.add_argument("--task", metavar="NAME[,NAME]", help="decode held-out problems of these tasks "
                     "(names, comma-separated, or a named mix: reference, workload) and score them")
    # --n and --task-seed default to None, so that one given without --task is refused, not ignored
    gen.add_argument("--n", type=int, help="with --task: problems per task (default 1)")
    gen.add_argument("--task-seed", type=int, help="with --task: seed of the held-out stream (default 0)")
    gen.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with every row")
    gen.add_argument("--stream", action="store_true", help="show every step: the canvas filling in on a "
                     "terminal (masked positions as _), the settled text as it grows otherwise")
    gen.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure several recipes side by side on held-out problems")
    bench.add_argument("--recipes", nargs="+", required=True, metavar="RECIPE",
                       help="recipe files or shipped recipe names; the first is the speedup baseline; "
                       "RECIPE[KEY=VALUE,...] gives that row its own overrides (one recipe at several settings); "
                       "RECIPE@DIR decodes that row with the checkpoint in DIR (rows of several models)")
    _recipe_flags(bench, "checkpoint directory")
    bench.add_argument("--task", default="copy,repeat,case", metavar="NAME[,NAME]",
                       help="tasks of the held-out problems: names, comma-separated, or a named mix "
                       "(reference, workload; default copy,repeat,case)")
    bench.add_argument("--n", type=int, default=8, help="problems per task (default 8)")
    bench.add_argument("--task-seed", type=int, default=0, help="seed of the held-out stream")
    bench.add_argument("--batch-size", type=int, help="rows decoded together, for every recipe")
    bench.add_argument("--max-length", type=int, metavar="N", help="let the model take canvases of up "
                       "to N positions for this run, past its declared max_sequence_length (to measure "
                       "the cost of long generations on a model trained shorter: its answers there "
                       "are not meaningful)")
    bench.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                       help="expand each recipe into one per value, e.g. select_tokens.threshold=0.5,0.9")
    bench.add_argument("--ar-model", metavar="DIR", help="add greedy decoding of this AutoModelForCausalLM")
    bench.add_argument("--json", metavar="PATH", help="write the table and per-problem records as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write accuracy vs throughput / NFE as a picture (its "
                       "suffix names the image format: .png, .svg, .pdf, ...)")
    bench.add_argument("--no-warmup", action="store_true", help="skip the warm-up decode")
    bench.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _trace_parser(sub: Any) -> None:
    tr = sub.add_parser("trace", help="picture (and record) of the order in which a policy decoded one prompt")
    tr.add_argument("prompt", nargs="?", help="text prompt (default: a held-out problem, see --task)")
    tr.add_argument("--recipe", help="recipe file or shipped recipe name (default: the model family's, "
                    "as generate)")
    _recipe_flags(tr, "checkpoint directory")
    tr.add_argument("--input-ids", type=_parse_ids, metavar="1,2,3", help="the prompt as token ids")
    # --task and --index default to None, so that one given beside a prompt is refused, not ignored
    tr.add_argument("--task", help="without a prompt: the task of the held-out problem (default copy)")
    tr.add_argument("--index", type=int, help="without a prompt: which held-out problem (from 0; default 0)")
    tr.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    tr.add_argument("--out", required=True, metavar="PNG", help="where to draw the picture (its suffix names "
                    "the image format: .png, .svg, .pdf, ...)")
    tr.add_argument("--json", metavar="PATH", help="also write the per-step record")


def _serve_parser(sub: Any) -> None:
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching "
                         "(needs the serve extra: pip install 'dllm-decode[serve]')")
    srv.add_argument("--recipe", help="the default recipe: file or shipped name (default: the model family's, "
                     "as generate); a request may name another shipped recipe")
    _recipe_flags(srv, "checkpoint directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoding together (default 8)")
    srv.add_argument("--max-waiting", type=int, default=64, metavar="N", help="requests queued for a row; "
                     "more are answered 429 (default 64)")
    srv.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds a request may take, "
                     "queued and decoding, before it is cancelled (default 600)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-decode", description="Decode masked-diffusion language "
                                     "models under decoding policies composed from plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    _trace_parser(sub)
    _serve_parser(sub)
    # listed for --help only: main() hands `eval ...` to lm-eval's own parser untouched
    sub.add_parser("eval", add_help=False, help="lm-evaluation-harness with the dllm_decode model registered "
                   "(lm-eval's arguments: --model dllm_decode --model_args model=DIR,recipe=NAME --tasks ...)")
    plug = sub.add_parser("plugins", help="list registered plugins, their slots and parameters")
    plug.add_argument("--json", action="store_true", help="one JSON object per plugin")
    plug.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="leave this plugin out")
    rec = sub.add_parser("recipes", help="list the shipped recipes: what each runs, and its generation settings")
    rec.add_argument("--json", action="store_true", help="one JSON object per recipe")
    rec.add_argument("--block", action="append", default=[], metavar="PLUGIN", help="leave this plugin out")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        from dllm_decode.harness.command import main as eval_main
        try:
            return eval_main(argv[1:])
        except DllmDecodeError as exc:
            print(f"dllm-decode eval: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    command = {"generate": cmd_generate, "bench": cmd_bench, "trace": cmd_trace, "plugins": cmd_plugins,
               "recipes": cmd_recipes, "serve": cmd_serve}
    with warnings.catch_warnings():
        # a broken installed plugin is reported in one line, not with warnings' source echo
        warnings.filterwarnings("always", category=BrokenPluginWarning)
        warnings.showwarning = _show_warning
        try:
            return command[args.command](args)
        except DllmDecodeError as exc:
            print(f"dllm-decode: error: {_as_typed(str(exc), args)}", file=sys.stderr)
            return 2


def _as_typed(message: str, args: argparse.Namespace) -> str:
    """Name the flag the user typed where an error blames the ``--set`` it was turned into."""
    flags = {}
    if getattr(args, "gen_length", None) is not None:
        for key in ("gen_length", "block_length", "steps"):
            flags[f"--set generation.{key}={args.gen_length}"] = f"--gen-length {args.gen_length}"
    if getattr(args, "dtype", None):
        flags[f"--set generation.dtype={args.dtype}"] = f"--dtype {args.dtype}"
    if getattr(args, "device", None):
        flags[f"--set model.device={json.dumps(args.device)}"] = f"--device {args.device}"
    if getattr(args, "batch_size", None):
        flags[f"--set generation.batch_size={args.batch_size}"] = f"--batch-size {args.batch_size}"
    for made, typed in flags.items():
        if made.removeprefix("--set ") not in getattr(args, "overrides", []):
            message = message.replace(made, typed)
    return re.sub(r"(--gen-length \d+)(, \1)+", r"\1", message)


def _show_warning(message: Any, category: type, *rest: Any, **kw: Any) -> None:
    if issubclass(category, BrokenPluginWarning):
        print(f"dllm-decode: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, *rest[:2]), end="", file=sys.stderr)


def cmd_recipes(args: argparse.Namespace) -> int:
    """The shipped recipes (``--recipe NAME``), each resolved against the installed plugins: one
    that names a missing or broken plugin is listed with the reason, the others still are."""
    from dllm_decode.config import load_recipe, resolve_recipe
    from dllm_decode.hookspecs import SLOTS
    from dllm_decode.recipes import shipped_recipes

    pm = _plugin_manager(args)
    rows = []
    for name, path in shipped_recipes().items():
        row: dict[str, Any] = {"name": name, "file": f"recipes/{path.name}"}
        try:
            recipe = load_recipe(path)
            row["description"] = recipe.description
            policy = resolve_recipe(recipe, pm)
        except DllmDecodeError as exc:
            rows.append({**row, "error": str(exc).splitlines()[0]})
            continue
        gen = recipe.generation
        row.update(slots={slot: policy.plugin_for(slot) for slot in SLOTS if slot in policy.slots},
                   generation={k: getattr(gen, k) for k in ("gen_length", "block_length", "steps", "temperature")},
                   requires=sorted({r for m in policy.metas.values() for r in m.requires}),
                   families=sorted({f for m in policy.metas.values() for f in m.families}))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['file']})")
        if row.get("description"):
            print(f"    {row['description']}")
        if "error" in row:
            print(f"    (UNUSABLE) {row['error']}")
            continue
        print("    " + ", ".join(f"{slot}: {plugin}" for slot, plugin in row["slots"].items()))
        print("    " + ", ".join(f"{k} {v}" for k, v in row["generation"].items() if v is not None) +
              (f"; needs: {', '.join(row['requires'])}" if row["requires"] else "") +
              (f"; models: {', '.join(row['families'])}" if row["families"] else ""))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from dllm_decode.plugins import broken_plugins, list_plugins

    pm = _plugin_manager(args)
    infos = sorted(list_plugins(pm) + broken_plugins(pm), key=lambda i: i.name)
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2, default=str))
        return 0
    for info in infos:
        origin = f"{info.distribution} {info.version}" if info.distribution else "(registered directly)"
        if info.broken:
            print(f"{info.name}  [{origin}]  (BROKEN)\n    {info.broken}")
            continue
        flags = [f for f, on in (("revocable", info.meta.revocable),
                                 ("exact cache", info.meta.exact is True),
                                 ("approximate cache", info.meta.exact is False),
                                 ("resizable", info.meta.resizable),
                                 ("drops finished rows", info.meta.drops_rows)) if on]
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
    from dllm_decode.engine import Decoder
    from dllm_decode.request import check_prompts

    _check_counts(args)
    _check_generate_flags(args)
    recipe = _load_recipe(args, args.recipe)
    pm = _plugin_manager(args)
    policy = resolve_recipe(recipe, pm)     # every recipe error surfaces before the model loads
    problems = _task_problems(args) if args.task else []
    model_path = args.model = _model_path(args, recipe)
    model, tokenizer = _load_model(model_path, recipe, args)
    if problems:
        if tokenizer is None:
            raise DllmDecodeError(f"{model_path}: no tokenizer files; --task needs one")
        return _decode_problems(model, tokenizer, recipe, pm, policy, problems, args)
    prompts = list(args.input_ids)
    names = _prompt_names(args)
    if args.prompts:
        if tokenizer is None:
            raise DllmDecodeError(f"{model_path}: no tokenizer files; pass --input-ids instead of text")
        prompts += [_encode(tokenizer, text, args.chat, name)
                    for text, name in zip(args.prompts, names[len(prompts):])]
    decoder = Decoder(model, recipe, pm=pm, tokenizer=tokenizer, policy=policy)
    # the engine names rows by their 0-based index in the list it is given: check here first, so
    # the error names the prompt as the user numbers it
    check_prompts(prompts, decoder.spec, decoder.gen.gen_length, decoder.mask_id, names=names)
    if args.stream:
        return _stream(decoder, prompts, tokenizer, args)
    result = decoder.generate(prompts, progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        out: dict[str, Any] = {"model": str(model_path), "recipe": recipe.source,
                               "rows": [r.as_dict() for r in result.rows]}
        print(json.dumps(out, indent=2))
        return 0
    for r in result.rows:
        print(r.text if r.text is not None else " ".join(map(str, r.tokens)))
        print(f"  [nfe {r.nfe}, steps {r.steps}, {r.seconds:.3f} s]", file=sys.stderr)
    return 0


def _stream(decoder: Any, prompts: list[list[int]], tokenizer: Any, args: argparse.Namespace) -> int:
    from dllm_decode.serve.terminal import stream_to

    if tokenizer is None:
        raise DllmDecodeError("--stream shows text: it needs the model's tokenizer")
    stream_to(sys.stdout, decoder, prompts, tokenizer, tty=sys.stdout.isatty())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dllm_decode.measure import bench
    from dllm_decode.measure.evaluate import answers_longer_than, truncation_note

    _check_counts(args)
    _check_outputs(args, {"json": False, "plot": True})      # before any decoding: a bad path loses no run
    common = [*args.overrides, *_device_dtype_overrides(args)]
    if args.batch_size:
        common.append(f"generation.batch_size={args.batch_size}")
    named = [_bench_row(r) for r in args.recipes]
    pm = _plugin_manager(args)
    # every recipe error surfaces here, before any model loads
    try:
        recipes = bench.expand_sweeps(named, common, args.sweep, pm, gen_length=args.gen_length)
    except RecipeError as err:
        raise RecipeError(_blame_rows(str(err), args.recipes, named, common)) from None
    if len({r.generation.dtype for _, r in recipes}) > 1:
        raise DllmDecodeError("bench: the recipes ask for different generation.dtype; set one with --dtype")
    problems = _task_problems(argparse.Namespace(task=args.task, n=args.n, task_seed=args.task_seed))
    first = recipes[0][1]
    args.model = _model_path(args, first)
    # a row's own checkpoint (RECIPE@DIR), block size and device (RECIPE[model.block_size=8], --sweep)
    keys = [(str(r.model.path or args.model), r.model.block_size, r.model.device) for _, r in recipes]
    loaded: dict[tuple, tuple[Any, Any]] = {}
    for key, (_, recipe) in zip(keys, recipes):
        path = key[0]
        if key not in loaded:
            # RECIPE@DIR gave the row's model.path as an override (_bench_row)
            at = any(o.startswith("model.path=") for o in recipe.overrides)
            what = ("--recipes" if at else f"{recipe.source or '<recipe>'}: model.path"
                    if recipe.model.path else args.model_from)
            loaded[key] = _load_model(path, recipe, args, what)
            if loaded[key][1] is None:
                raise DllmDecodeError(f"{path}: no tokenizer files; bench needs one")
            if args.max_length:
                m = loaded[key][0]
                m.spec = dataclasses.replace(m.spec, max_length=max(args.max_length, m.spec.max_length))
    models = [loaded[key] for key in keys]
    model, tokenizer = models[0]
    too_long = answers_longer_than(problems, tokenizer, first.generation.gen_length)
    note = truncation_note(too_long, first.generation.gen_length)
    if note:
        print(f"bench: {note}", file=sys.stderr)
    ar = None
    if args.ar_model:
        from dllm_decode.measure.evaluate import load_ar
        ar = load_ar(args.ar_model, device=first.model.device, what="--ar-model")
    runs = _run_bench(bench, model, tokenizer, recipes, problems, ar, pm, args, models)
    info = {**bench.machine_info(bench.model_device(model), first.generation.dtype), "model": str(args.model)}
    print(f"model {args.model} | tasks {args.task} x {args.n} (seed {args.task_seed}) | "
          f"gen {first.generation.gen_length}")
    print(bench.render(runs, info))
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "no_progress")}
    settings["answers_longer_than_gen_length"] = {t: k for t, (k, _) in too_long.items()}
    title = f"{Path(args.model).name}, {args.task}, gen {first.generation.gen_length}"
    _write_outputs({"--json": args.json and (lambda: Path(args.json).write_text(
                        json.dumps(bench.to_json(runs, info, settings), indent=1) + "\n")),
                    "--plot": args.plot and (lambda: bench.plot(runs, args.plot, title=title))})
    return 0


def _run_bench(bench: Any, model: Any, tokenizer: Any, recipes: list, problems: list, ar: Any, pm: Any,
               args: argparse.Namespace, models: list | None = None) -> list:
    """bench.run_bench with a progress bar on a terminal."""
    chunk = max(r.generation.batch_size for _, r in recipes)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(problems) * (len(recipes) + (ar is not None)), unit="problem", file=sys.stderr)

    def progress(label: str, n: int) -> None:
        if bar is not None:
            bar.set_description(label[:40])
            bar.update(n)

    try:
        return bench.run_bench(model, tokenizer, recipes, problems, chunk=chunk, ar=ar, pm=pm,
                               ar_tokens=max(r.generation.gen_length for _, r in recipes),
                               warmup=not args.no_warmup, progress=progress, models=models)
    finally:
        if bar is not None:
            bar.close()


def cmd_trace(args: argparse.Namespace) -> int:
    from dllm_decode.engine import Decoder
    from dllm_decode.measure import trace
    from dllm_decode.request import check_prompts

    _check_counts(args)
    _check_trace_flags(args)
    _check_outputs(args, {"json": False, "out": True})       # before any decoding: a bad path loses no run
    recipe = _load_recipe(args, args.recipe, ["generation.batch_size=1"])
    pm = _plugin_manager(args)
    policy = resolve_recipe(recipe, pm)
    task, index = args.task or "copy", args.index or 0
    problem = None if args.prompt is not None or args.input_ids else _task_problems(
        argparse.Namespace(task=task, n=index + 1, task_seed=0))[index]
    args.model = _model_path(args, recipe)
    model, tokenizer = _load_model(args.model, recipe, args)
    where = "--input-ids" if args.input_ids else "prompt" if problem is None else f"--task {task} --index {index}"
    if args.input_ids:
        prompt = args.input_ids
    elif tokenizer is None:
        raise DllmDecodeError(f"{args.model}: no tokenizer files; pass --input-ids")
    else:
        prompt = _encode(tokenizer, problem.prompt if problem else args.prompt, args.chat, where)
    decoder = Decoder(model, recipe, pm=pm, tokenizer=tokenizer, policy=policy)
    # named as the user gave it (the engine would say "prompt 0")
    check_prompts([prompt], decoder.spec, decoder.gen.gen_length, decoder.mask_id, names=[where])
    state = decoder.generate([prompt], keep_states=True).states[0]
    record = trace.trace_record(state, tokenizer)
    name = recipe.name or (Path(recipe.source).stem if recipe.source else "recipe")
    title = f"{Path(args.model).name}, {name}: {len(record['steps'])} steps"
    _write_outputs({"--json": args.json and (lambda: Path(args.json).write_text(
                        json.dumps(record, indent=1) + "\n")),
                    "--out": lambda: trace.draw(record, args.out, title=title)})
    print(f"{len(record['steps'])} steps, NFE {record['nfe']}; picture in {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dllm_decode.serve import server

    server.require()                        # before a model loads: says how to install what is missing
    _check_counts(args)
    if args.timeout <= 0:
        raise DllmDecodeError(f"--timeout {args.timeout:g}: must be positive")
    recipe = _load_recipe(args, args.recipe)
    pm = _plugin_manager(args)
    resolve_recipe(recipe, pm)
    args.model = _model_path(args, recipe)
    model, tokenizer = _load_model(args.model, recipe, args)
    if tokenizer is None:
        raise DllmDecodeError(f"{args.model}: no tokenizer files; serve needs one")
    name = Path(args.model).name
    app = server.create_app(model, tokenizer, recipe=args.recipe, overrides=recipe.overrides, model_name=name,
                            max_batch=args.max_batch, max_waiting=args.max_waiting, timeout_s=args.timeout, pm=pm)
    print(f"dllm-decode: serving model {name!r} (recipe {args.recipe}) at http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    server.run(app, args.host, args.port)
    return 0


# ----------------------------------------------------------------------------- shared steps


def _check_counts(args: argparse.Namespace) -> None:
    """Counts the parser accepts as integers but nothing can use, refused by flag."""
    for flag, least in (("n", 1), ("index", 0), ("gen_length", 1), ("batch_size", 1), ("max_length", 1),
                        ("max_batch", 1), ("max_waiting", 1), ("port", 0)):
        value = getattr(args, flag, None)
        if value is not None and value < least:
            raise DllmDecodeError(f"--{flag.replace('_', '-')} {value}: must be at least {least}")
    ids = getattr(args, "input_ids", None)
    rows = ids if args.command == "generate" else [] if ids is None else [ids]    # generate takes several
    if any(not row for row in rows):
        raise DllmDecodeError("--input-ids: empty prompt; give at least one token id")
    if args.command == "generate":
        texts, names = args.prompts, _prompt_names(args)[len(args.input_ids):]
    else:
        texts, names = [] if getattr(args, "prompt", None) is None else [args.prompt], ["prompt"]
    for text, name in zip(texts, names):
        if not text:
            raise InputError(f"{name}: empty prompt; give some text (or --input-ids)")


def _prompt_names(args: argparse.Namespace) -> list[str]:
    """How generate's errors name each row: ``prompt K``, K from 1 in the order the rows are
    decoded and printed (--input-ids, then text prompts), with where it came from when both kinds
    are given."""
    ids, texts = len(args.input_ids), len(args.prompts)
    if not ids or not texts:
        return [f"prompt {k + 1}" for k in range(ids + texts)]
    return [f"prompt {k + 1} (--input-ids)" for k in range(ids)] + \
        [f"prompt {ids + k + 1} (text prompt {k + 1})" for k in range(texts)]


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be silently ignored with the others given (before the model loads)."""
    given = bool(args.prompts or args.input_ids)
    if not given and not args.task:
        raise DllmDecodeError("nothing to decode: give text prompts, --input-ids or --task")
    if args.task:
        if given:
            raise DllmDecodeError("--task decodes held-out problems instead of prompts: give prompts "
                                  "(text or --input-ids) or --task, not both")
        for flag, on in (("--stream", args.stream), ("--chat", args.chat)):
            if on:
                raise DllmDecodeError(f"{flag} applies to text prompts, not to --task problems: drop one")
        args.n = 1 if args.n is None else args.n
        args.task_seed = 0 if args.task_seed is None else args.task_seed
    for flag in ("n", "task_seed"):
        if getattr(args, flag) is not None and not args.task:
            raise DllmDecodeError(f"--{flag.replace('_', '-')} applies to --task problems: give --task too, "
                                  "or drop it")
    if args.chat and not args.prompts and not args.task:
        raise DllmDecodeError("--chat wraps text prompts in the chat template; --input-ids are decoded as "
                              "given: give a text prompt or drop --chat")
    if args.stream and args.json:
        raise DllmDecodeError("--stream shows text as it is decoded and cannot be combined with --json")


def _check_trace_flags(args: argparse.Namespace) -> None:
    """One prompt: text, --input-ids or a held-out problem (--task, --index); refuse a mix, which
    would silently use one of them."""
    given = [flag for flag, on in (("a text prompt", args.prompt is not None), ("--input-ids", args.input_ids),
                                   ("--task/--index", args.task is not None or args.index is not None)) if on]
    if len(given) > 1:
        raise DllmDecodeError(f"trace decodes one prompt: give {' or '.join(given)}, not both")
    if args.chat and args.input_ids:
        raise DllmDecodeError("--chat wraps text in the chat template; --input-ids are decoded as given: "
                              "drop one")


def _plugin_manager(args: argparse.Namespace) -> Any:
    """The plugin manager with --block applied, refusing a name no plugin has (a typo would
    otherwise block nothing, silently)."""
    import difflib
    from importlib import metadata

    from dllm_decode.plugins import BLOCK_ENV, ENTRY_POINT_GROUP, _env_list, get_plugin_manager

    pm = get_plugin_manager(block=args.block)
    # a blocked plugin is never loaded: the entry points name it
    known = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)} | set(pm.broken) | \
        {name for name, plugin in pm.list_name_plugin() if plugin is not None}
    for name in args.block:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DllmDecodeError(f"--block {name!r}: no plugin of that name; {hint}known: "
                                  f"{', '.join(sorted(known))}")
    # the environment may be shared with installs that have other plugins: said, not refused
    unknown = [name for name in _env_list(BLOCK_ENV) if name not in known]
    if unknown:
        print(f"dllm-decode: {BLOCK_ENV} names {', '.join(map(repr, unknown))}, which no installed plugin "
              "has: nothing is blocked for them", file=sys.stderr)
    return pm


def _check_outputs(args: argparse.Namespace, dests: dict[str, bool]) -> None:
    """Refuse an output path that could not be written, before any decoding: its folder exists,
    and it can be created there; a picture's suffix (``dests``: dest -> is a picture) names a
    format matplotlib writes."""
    for dest, image in dests.items():
        path = getattr(args, dest)
        if path is None:
            continue
        flag = f"--{dest}"
        if image:
            from matplotlib.backend_bases import FigureCanvasBase

            formats = sorted(FigureCanvasBase.get_supported_filetypes())
            suffix = Path(path).suffix.lower().lstrip(".")
            if suffix not in formats:
                what = f"suffix .{suffix} is not an image format" if suffix else "no suffix to name the image format"
                raise DllmDecodeError(f"{flag} {path}: {what}; end it in one of "
                                      f"{', '.join('.' + f for f in formats)}")
        _check_writable(flag, Path(path))


def _check_writable(flag: str, path: Path) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise DllmDecodeError(f"{flag} {path}: {'no folder' if not parent.exists() else 'not a folder'} {parent}")
    if path.is_dir():
        raise DllmDecodeError(f"{flag} {path}: a folder; give a file path")
    existed = path.exists()
    try:
        # opening it is the one check that sees what permissions bits do not (read-only mounts, name length)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise DllmDecodeError(f"{flag} {path}: cannot write: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()                 # nothing left behind if the run fails before writing it


def _write_outputs(writers: dict[str, Any]) -> None:
    """Run each output's writer (flag -> callable, or a false value for an output not asked for).
    The paths were checked before decoding, but a disk can fill or a folder go away since: one
    that fails does not stop the others, and the error names each flag that failed."""
    failed, written, unexpected = [], [], None
    for flag, write in writers.items():
        if not write:
            continue
        try:
            write()
            written.append(flag)
        except OSError as exc:
            failed.append(f"{flag} {exc.filename or ''}: {exc.strerror or exc}".replace(" :", ":"))
        except Exception as exc:  # noqa: BLE001 -- re-raised below, once the other outputs are written
            unexpected = unexpected or exc
    if unexpected is not None:
        raise unexpected
    if failed:
        raise DllmDecodeError("could not write " + "; ".join(failed) +
                              (f" ({', '.join(written)} written)" if written else ""))


def _device_dtype_overrides(args: argparse.Namespace) -> list[str]:
    from dllm_decode.measure.bench import device_overrides

    return device_overrides(args.device, args.dtype)


def _load_recipe(args: argparse.Namespace, name: str | None, extra: list[str] = ()) -> Any:
    """The recipe ``name`` with the --set overrides, then what --gen-length, --device and --dtype
    set (as bench does: a one-block recipe stays one block). No name: the --model's family
    recipe (``dllm_decode.recipes.default_recipe``), said on stderr when it is not llada."""
    from dllm_decode.config import load_recipe
    from dllm_decode.measure.bench import gen_length_overrides
    from dllm_decode.recipes import default_recipe, fit_blocks

    fit = []
    if name is None:
        name = args.recipe = default_recipe(args.model) if args.model else "llada"
        if not any(o.startswith("generation.block_length=") for o in args.overrides):
            fit = fit_blocks(args.model, name)
        if name != "llada":
            print(f"dllm-decode: no --recipe given: using {name}, the official decoding loop of this model's family"
                  + (f", with {fit[0]} (the model's blocks)" if fit else ""), file=sys.stderr)

    over = [*fit, *args.overrides, *extra, *_device_dtype_overrides(args)]
    if args.gen_length is not None:
        over += gen_length_overrides(name, args.gen_length, over)
    return load_recipe(find_recipe(name), overrides=over)


def _bench_row(arg: str) -> tuple[str, str, list[str]]:
    """A --recipes entry: ``RECIPE``, ``RECIPE[KEY=VALUE,...]`` (that row's own overrides, e.g.
    ``llada[generation.steps=128]`` beside ``llada``: one recipe at several settings in one run)
    and/or ``...@DIR`` (that row decodes with the checkpoint in DIR, to compare models, e.g. a
    block-diffusion one beside a full-attention one) -> (label, recipe, its own overrides)."""
    name, at, model = arg.rpartition("@") if "@" in arg else (arg, "", "")
    if at and not model:
        raise DllmDecodeError(f"--recipes {arg!r}: expected RECIPE@DIR, a checkpoint directory after @")
    from dllm_decode.measure.bench import bench_label

    name, own = _row_overrides(arg, name)
    label = bench_label(_label(name), own)
    if not at:
        return label, name, own
    return f"{label} @ {Path(model).name}", name, [*own, f"model.path={json.dumps(model)}"]


def _blame_rows(message: str, args: list[str], named: list[tuple], common: list[str]) -> str:
    """A recipe error that blames a ``--set`` which a row's ``RECIPE[KEY=VALUE]`` gave names that
    row instead (the recipe loader calls every override a --set)."""
    for arg, (_, _, own) in zip(args, named):
        for o in own:
            if o not in common and not o.startswith("model.path="):
                # the whole override, not the head of a longer --set (steps=1 in steps=12)
                message = re.sub(rf"--set {re.escape(o)}(?=[:,]|$)", lambda _: f"--recipes {arg!r}: {o}",
                                 message, flags=re.M)
    return message


def _row_overrides(arg: str, name: str) -> tuple[str, list[str]]:
    """``RECIPE[KEY=VALUE,...]`` -> (RECIPE, ["KEY=VALUE", ...]); a comma starts a new override only
    before ``KEY=``, so a value may hold commas (a list)."""
    if not name.endswith("]"):
        return name, []
    recipe, bracket, inner = name[:-1].partition("[")
    own = [o.strip() for o in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", inner)] if bracket else []
    if not recipe or not own or any(not re.match(r"[A-Za-z_][\w.]*\s*=", o) for o in own):
        raise DllmDecodeError(f"--recipes {arg!r}: expected RECIPE[KEY=VALUE,...], e.g. "
                              "llada[generation.steps=128] or threshold[select_tokens.threshold=0.7]")
    return recipe, [re.sub(r"\s*=\s*", "=", o, count=1) for o in own]


def _label(name: str) -> str:
    """A bench row's label: the recipe's own ``name``, else its file name."""
    from dllm_decode.config import load_recipe

    stem = Path(name).stem if name.endswith((".yaml", ".yml")) else name
    try:
        return load_recipe(find_recipe(name)).name or stem
    except DllmDecodeError:
        return stem                 # expand_sweeps reports the error with the overrides applied


def shipped_model() -> Path:
    """models/llada-reference next to the package source: present in a checkout only."""
    return Path(__file__).resolve().parents[1] / "models" / "llada-reference"


def _model_path(args: argparse.Namespace, recipe: Any) -> str:
    """The checkpoint to decode with; ``args.model_from`` records where it came from, for errors."""
    args.model_from = _model_origin(args, recipe)
    path = args.model or recipe.model.path
    if path:
        return str(path)
    shipped = shipped_model()
    if (shipped / "config.json").exists():
        shown = os.path.relpath(shipped) if shipped.is_relative_to(Path.cwd()) else str(shipped)
        print(f"dllm-decode: no --model given: using the shipped reference model {shown} "
              "(it knows only the reference tasks' prompt formats)", file=sys.stderr)
        return shown
    raise DllmDecodeError("no model: pass --model DIR (a LLaDA or Dream checkpoint) or set model.path in the "
                          "recipe (the shipped reference models come with a checkout of the repository)")


def _origin(args: argparse.Namespace, recipe: Any, flag: str, key: str) -> str:
    """Where the recipe's ``model.KEY`` came from, for errors: ``flag``, a ``--set``, or the recipe."""
    if getattr(args, flag.removeprefix("--"), None):
        return flag
    if any(o.split("=", 1)[0].strip() == f"model.{key}" for o in getattr(args, "overrides", [])):
        return f"--set model.{key}"
    return f"{recipe.source or '<recipe>'}: model.{key}"


def _model_origin(args: argparse.Namespace, recipe: Any) -> str | None:
    """The flag or recipe key that named the model (None: the shipped one)."""
    return _origin(args, recipe, "--model", "path") if args.model or recipe.model.path else None


def _load_model(path: str, recipe: Any, args: argparse.Namespace, what: str | None = None) -> tuple[Any, Any]:
    from dllm_decode.models import load_model
    from dllm_decode.models.loader import check_device

    device_from = _origin(args, recipe, "--device", "device")
    check_device(recipe.model.device, device_from)
    return load_model(path, dtype=recipe.generation.dtype, device=recipe.model.device,
                      block_size=recipe.model.block_size, what=what or getattr(args, "model_from", None))


def _task_problems(args: argparse.Namespace) -> list:
    from dllm_decode.measure.tasks import get_task, task_names

    problems = []
    for name in task_names(args.task):
        try:
            task = get_task(name.strip())
        except KeyError as err:
            raise DllmDecodeError(f"--task: {err.args[0]}") from None
        problems += task.problems("test", args.n, args.task_seed)
    return problems


def _decode_problems(model, tokenizer, recipe, pm, policy, problems, args) -> int:
    from dllm_decode.measure.evaluate import answers_longer_than, evaluate, truncation_note

    # as bench says it: otherwise a too short --gen-length reads as a wrong policy
    note = truncation_note(answers_longer_than(problems, tokenizer, recipe.generation.gen_length),
                           recipe.generation.gen_length)
    if note:
        print(f"generate: {note}", file=sys.stderr)
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
    print(f"exact match {res.accuracy:.3f} on {len(res.records)} held-out problem(s)")
    return 0


def _encode(tokenizer: Any, text: str, chat: bool, where: str = "prompt") -> list[int]:
    if not text:
        raise InputError(f"{where}: empty prompt; give some text (or --input-ids)")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DllmDecodeError("--chat: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _check_vocabulary(tokenizer, text, ids, where)
    return ids


def _check_vocabulary(tokenizer: Any, text: str, ids: list[int], where: str) -> None:
    """Refuse text the tokenizer can only encode as its unknown token (the reference models'
    is the pad token), naming the first such character and its position."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or unk not in ids:
        return
    spans = [None] * len(ids)
    if getattr(tokenizer, "is_fast", False):
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for tid, span in zip(ids, spans):
        if tid != unk or (span is not None and text[span[0]:span[1]] == tokenizer.unk_token):
            continue
        what = f"character {text[span[0]:span[1]]!r} at position {span[0]}" if span else "a character"
        raise InputError(f"{where}: {what} is not in the tokenizer's vocabulary (it would be encoded as "
                         f"{tokenizer.unk_token!r}, id {unk})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
