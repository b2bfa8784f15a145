"""Measure a reference model on the held-out problems and write its model card.

    python -m dllm_decode.tools.model_card models/llada-reference            # print the table
    python -m dllm_decode.tools.model_card models/llada-reference --write    # and rewrite README.md
    python -m dllm_decode.tools.model_card models/dream-workload --tasks chain --gen-length 256 \
        --device cuda --dtype bfloat16 --write                                  # on a GPU, named in the card

A diffusion checkpoint is decoded with the LLaDA baseline recipe at 1, 2, 4 and 8 tokens per
step (steps = gen_length / k) and block lengths 8, 32 and the full canvas; a block-diffusion one
(SDAR, Fast-dLLM v2) block by block with its family's recipe (``sdar``, ``fast-dllm-v2``) at
block sizes 4, 8, 32 and thresholds 0.7, 0.9, 1.0; an autoregressive checkpoint
(``AutoModelForCausalLM``) greedily. Every cell is exact match on the same held-out problems, with
the forward passes (NFE) and the wall seconds per problem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dllm_decode.measure.tasks import REFERENCE_MIX, get_task, task_names
from dllm_decode.measure.bench import device_overrides
from dllm_decode.tools.reporting import held_out, machine

TOKENS_PER_STEP = (1, 2, 4, 8)
BLOCKS = (8, 32, None)          # None: one block over the whole canvas
HEADLINE = ((1, None), (4, None))   # the baseline recipe (one block), one and four tokens per forward
GRID = tuple((k, b) for k in TOKENS_PER_STEP for b in BLOCKS)


GEN_LENGTH = 96                 # the default generation length of a card
KEEP = "## Limitations"     # a card section kept as written when the card is re-measured


#: block-diffusion checkpoints: the shipped recipe of their family (its official loop) at these
#: block sizes and thresholds (threshold 1.0: one token per forward)
BLOCK_SIZES = (4, 8, 32)
THRESHOLDS = (0.7, 0.9, 1.0)


def family_of(path: Path) -> str:
    """The checkpoint's family as the loader reads it, or 'ar' for an AutoModelForCausalLM."""
    from dllm_decode.errors import CheckpointError
    from dllm_decode.models.loader import detect_family

    try:
        return detect_family(json.loads((path / "config.json").read_text()))
    except CheckpointError:
        return "ar"


def is_ar_checkpoint(path: Path) -> bool:
    return family_of(path) == "ar"


def block_recipe(name: str, gen_length: int, size: int, threshold: float, batch_size: int,
                 device: str = "cpu", dtype: str = "float32"):
    """The recipe of one block-table cell: the family's recipe `name` at block `size`, `threshold`."""
    from dllm_decode.config import load_recipe
    from dllm_decode.recipes import find_recipe

    return load_recipe(find_recipe(name), overrides=[
        f"generation.gen_length={gen_length}", f"generation.block_length={size}",
        f"generation.steps={gen_length}", f"generation.batch_size={batch_size}",
        f"select_tokens.threshold={threshold}", *device_overrides(device, dtype)])


def diffusion_recipe(gen_length: int, k: int, block: int | None, batch_size: int,
                     device: str = "cpu", dtype: str = "float32"):
    """The recipe of one diffusion-table cell: LLaDA's baseline at `k` tokens per step, block
    length `block` (None: the whole canvas)."""
    from dllm_decode.config import load_recipe
    from dllm_decode.recipes import find_recipe

    return load_recipe(find_recipe("llada"), overrides=[
        f"generation.gen_length={gen_length}", f"generation.block_length={block or gen_length}",
        f"generation.steps={gen_length // k}", f"generation.batch_size={batch_size}",
        *device_overrides(device, dtype)])


def block_table(path: Path, tasks, n: int, gen_length: int, batch_size: int, seed: int, grid,
                progress: bool = True, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    """A block-diffusion checkpoint decoded block by block with its family's recipe (exact block
    cache) at each (block size, threshold) of ``grid``; the model loaded at that block size."""
    from dllm_decode.measure.evaluate import evaluate
    from dllm_decode.models import load_model
    from dllm_decode.recipes import default_recipe

    name = default_recipe(path)
    problems = held_out(tasks, n, seed)
    rows = []
    for size, threshold in grid:
        model, tok = load_model(path, block_size=size, dtype=dtype, device=device)
        recipe = block_recipe(name, gen_length, size, threshold, batch_size, device, dtype)
        res = evaluate(model, tok, recipe, problems)
        rows.append({"tokens_per_step": f"threshold {threshold}", "block_length": size, "tasks": res.per_task,
                     "accuracy": res.accuracy, "nfe": res.nfe, "seconds_per_problem": res.seconds_per_problem})
        if progress:
            cells = "  ".join(f"{t} {v['accuracy']:.3f}" for t, v in res.per_task.items())
            print(f"block {size} threshold {threshold}: {cells}  nfe {res.nfe:.1f}", flush=True)
    return rows


def diffusion_table(path: Path, tasks, n: int, gen_length: int, batch_size: int, seed: int,
                    grid=GRID, progress: bool = True, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    from dllm_decode.measure.evaluate import evaluate
    from dllm_decode.models import load_model

    model, tok = load_model(path, dtype=dtype, device=device)
    problems = held_out(tasks, n, seed)
    rows = []
    for k, block in grid:
        recipe = diffusion_recipe(gen_length, k, block, batch_size, device, dtype)
        res = evaluate(model, tok, recipe, problems)
        rows.append({"tokens_per_step": k, "block_length": "full" if block is None else block,
                     "tasks": res.per_task, "accuracy": res.accuracy, "nfe": res.nfe,
                     "seconds_per_problem": res.seconds_per_problem})
        if progress:
            cells = "  ".join(f"{t} {v['accuracy']:.3f}" for t, v in res.per_task.items())
            print(f"k={k} block={rows[-1]['block_length']}: {cells}  nfe {res.nfe:.1f}", flush=True)
    return rows


def ar_table(path: Path, tasks, n: int, gen_length: int, batch_size: int, seed: int,
             device: str = "cpu", dtype: str = "float32") -> list[dict]:
    from dllm_decode.measure.evaluate import evaluate_ar, load_ar

    model, tok = load_ar(str(path), device=device)
    model.to(getattr(torch, dtype))
    res = evaluate_ar(model, tok, held_out(tasks, n, seed), max_new_tokens=gen_length, batch_size=batch_size)
    return [{"tokens_per_step": 1, "block_length": "greedy (KV cache)", "tasks": res.per_task,
             "accuracy": res.accuracy, "nfe": res.nfe, "seconds_per_problem": res.seconds_per_problem}]


def render(rows: list[dict], tasks) -> str:
    rule = "commit rule" if rows and str(rows[0]["tokens_per_step"]).startswith("threshold") else "tokens / step"
    head = f"| {rule} | block | " + " | ".join(f"{t} acc | {t} NFE | {t} s/prob" for t in tasks) + " |"
    sep = "|---|---|" + "---:|---:|---:|" * len(tasks)
    lines = [head, sep]
    for r in rows:
        cells = []
        for t in tasks:
            v = r["tasks"][t]
            cells += [f"{v['accuracy']:.3f}", f"{v['nfe']:.1f}", f"{v['seconds_per_problem']:.4f}"]
        lines.append(f"| {r['tokens_per_step']} | {r['block_length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CARD = """# {name}

A {kind} trained by this repository on its task suite, so that decoding policies have a real
accuracy / speed trade-off to measure without any download. {format_line}

| | |
|---|---|
| format | {format} |
| parameters | {params:,} |
| size | d_model {d_model}, {n_layers} layers, {n_heads} heads, MLP {mlp_hidden} |
| tokenizer | `tokenizer.json`: one token per character, specials `<|pad|>` `<|startoftext|>` `<|endoftext|>` (EOS) `<|eot_id|>` `<|mdm_mask|>` (mask) |
| tasks | {tasks} |
| training | {steps} steps, {batch}, seed {seed}, {seconds} |

{loading}

## Tasks

{task_lines}

Prompts end in a newline; answers end in a final `#### ANSWER` line (after a worked line for
`copy`), scored by exact match of the final answer (validity for the free-choice tasks). Train
and test prompts are disjoint: a prompt is held out when `crc32(prompt) % 5 == 0`.

## Training

```bash
{train_cmd}
```

{objective}

Training is deterministic for a seed, a CPU and a thread count.{device_note} To check that a machine
reproduces this checkpoint without the whole run, rerun {check_what} and compare
the loss log with the one shipped here{check_where}:

```bash
{check_cmd}
```

## Held-out accuracy

Generation length {gen_length}, held-out problems of the test split (seed {eval_seed}).
{decode_line} Machine: {machine}.

{tables}

Reproduce these tables:

```bash
python -m dllm_decode.tools.model_card {rel} {args}--write
```
"""


def train_flags(cfg: dict, device: bool = True) -> str:
    """The command-line flags that reproduce `cfg`: steps, seed and threads always (the thread
    count decides the order floats add in, so the weights), the rest when not the defaults;
    `--device` when it was not the CPU, unless `device` is False (a CPU rerun of its first steps)."""
    from dataclasses import asdict

    from dllm_decode.tools.train import TrainConfig

    default = asdict(TrainConfig())
    flags = []
    for key, value in cfg.items():
        # checkpoint cadence and readings change neither the weights nor the loss log (log_every is
        # kept: the card's --check compares its rerun's log with the shipped one, line by line)
        if key in ("family", "out", "init", "device", "canvas_weights", "stop_after",
                   "checkpoint_every", "checkpoint_minutes", "probe_every", "probe_n", "probe_tasks"):
            continue
        # equal task weights draw exactly as none do (train's Batcher), and train refuses all zeros
        if key == "task_weights" and task_odds(cfg) is None:
            continue
        if key in ("steps", "seed", "threads") or (key in default and _norm(default[key]) != _norm(value)):
            if isinstance(value, bool):         # a switch: named when on
                flags += [f"--{key.replace('_', '-')}"] if value else []
                continue
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            flags.append(f"--{key.replace('_', '-')} {shown}")
    if device and cfg.get("device", "cpu") != "cpu":
        flags.append(f"--device {cfg['device']}")
    # the odds train's _config derives when --canvas-weights is not given: the default odds for the
    # default canvases, else equal; any other odds must be named or the command trains otherwise
    derived = default["canvas_weights"] if _norm(cfg.get("canvas", [])) == _norm(default["canvas"]) \
        else [1.0] * len(cfg.get("canvas", []))
    if "canvas_weights" in cfg and _norm(cfg["canvas_weights"]) != _norm(derived):
        flags.append("--canvas-weights " + ",".join(map(str, cfg["canvas_weights"])))
    return " ".join(flags)


def training_stages(meta: dict, out: str) -> list[tuple[str, dict]]:
    """The stages of a checkpoint's training, first first: (directory it was written to, its
    training.json). A stage trained with --init records the one it started from (train.py)."""
    earlier = training_stages(meta["init"], meta["config"]["init"]) if meta.get("init") else []
    return earlier + [(out, meta)]


def trained_on(meta: dict) -> str:
    """Where one stage (its training.json) trained: its GPU, which train records, or its CPU threads."""
    if meta.get("device_name"):
        return f"one {meta['device_name']} GPU (`--device {meta['config']['device']}`)"
    return f'{meta["threads"]} CPU thread{"" if meta["threads"] == 1 else "s"}'


def batch_text(cfg: dict) -> str:
    """A stage's batch: padded tokens when batched by task under a token budget, else rows."""
    if cfg.get("batch_tokens") and cfg.get("batch_by_task"):
        return f"{cfg['batch_tokens']:,} padded tokens a batch"
    return f"batch {cfg['batch_size']}"


def train_command(out: str, cfg: dict) -> str:
    init = f" --init {cfg['init']}" if cfg.get("init") else ""
    stop = f" --stop-after {cfg['stop_after']}" if cfg.get("stop_after") else ""
    return f"python -m dllm_decode.tools.train --family {cfg['family']} --out {out}{init} {train_flags(cfg)}{stop}"


def steps_text(cfg: dict) -> str:
    """A stage's steps: its schedule, or the part of it a run stopped at (--stop-after)."""
    stop = cfg.get("stop_after")
    return f"{stop} (of its {cfg['steps']}-step schedule)" if stop and stop < cfg["steps"] else str(cfg["steps"])


def task_odds(cfg: dict) -> list[float] | None:
    """The odds a stage drew its tasks with, as train's Batcher reads `task_weights`: None (equal
    odds) when there are none or all are equal, all zeros included."""
    w = [float(x) for x in cfg.get("task_weights") or []]
    return w if w and any(x != w[0] for x in w) else None


def task_odds_sentence(cfg: dict) -> str:
    weights = task_odds(cfg) or [1.0] * len(cfg["tasks"])
    total = sum(weights)
    if total <= 0:      # random.choices refuses these: no run trained with them
        raise ValueError(f"task_weights {cfg['task_weights']} do not add up to a positive number")
    return ("Each row's task is drawn with odds " +
            ", ".join(f"`{t}` {w / total:.2f}" for t, w in zip(cfg["tasks"], weights)) + ".")


def full_mask_sentence(cfg: dict) -> str:
    """The rows that replace a stage's mask schemes, when it had any (train --full-mask, --end-rows,
    --frontier-rows)."""
    full = (f" A share {cfg['full_mask']:.2f} of the rows instead mask the whole answer and part of the "
            "EOS padding, weighted the same way." if cfg.get("full_mask", 0) else "")
    end = (f" A share {float(cfg['end_rows']):.2f} of the rows instead place a semi-autoregressive block of 32 "
           "at the answer's end (starting 0 to 40 positions before it, the rest of the canvas masked), "
           "where decoding writes the final line and stops." if cfg.get("end_rows", 0) else "")
    frontier = (f" A share {float(cfg['frontier_rows']):.2f} of the rows instead reveal the answer up to a "
                "frontier drawn uniformly over it and mask everything from there on, the state of a "
                "left-to-right decode." if cfg.get("frontier_rows", 0) else "")
    return full + end + frontier


def weight_sentence(cfg: dict) -> str:
    """How a diffusion stage weighs its masked tokens, when not LLaDA's 1/t."""
    if cfg.get("loss_weight", "mdlm") != "cart":
        return ""
    return (" Each masked token's cross-entropy is weighted by its revealed context instead of 1/t "
            f"(Dream's CART, arXiv 2508.15487: half the sum of p(1-p)^(d-1) over the revealed tokens at "
            f"distance d, p = {float(cfg.get('cart_p', 0.3)):g}; `dllm_decode/tools/train.py: cart_weight`).")


def adaptation_sentence(cfg: dict) -> str:
    """What a diffusion stage adapting an AR model added, when it did: attention annealing
    (train --attention-anneal) and the layer alignment to the AR model (train --repr-align)."""
    n, w = cfg.get("attention_anneal", 0), cfg.get("repr_align", 0)
    anneal = (f" Its attention opens from causal to full over its first {n} steps (DiffuLLaMA's annealing, "
              "arXiv 2410.17891: at step s, causal plus a random share (s + 1) / "
              f"{n} of the other query-key pairs; `dllm_decode/tools/train.py: anneal_attend`).") if n else ""
    align = (f" The loss adds {float(w):g} times one minus the cosine similarity between every layer's hidden "
             "states and those of the frozen AR model reading the clean canvas causally, at the positions "
             "whose output predicts a masked token (REPR-ALIGN, arXiv 2605.06885; "
             "`dllm_decode/tools/train.py: repr_align_loss`).") if w else ""
    return anneal + align


def later_stage_sentence(n: int, cfg: dict, before: dict) -> str:
    """What the stage at index n (n >= 1) changes from the stage before it, in words."""
    words = ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")
    lead = f"The {words[n - 1]} stage" if n <= len(words) else f"Stage {n + 1}"
    mix = "" if _norm(cfg.get("mask_mix")) == _norm(before.get("mask_mix")) else " " + mix_sentence(cfg["mask_mix"])
    if task_odds(cfg) != task_odds(before):
        mix += " " + task_odds_sentence(cfg)
    if cfg["family"] != "ar" and canvas_sentence(cfg) != canvas_sentence(before):
        mix += " " + canvas_sentence(cfg)
    if weight_sentence(cfg) != weight_sentence(before):
        mix += weight_sentence(cfg) or " Masked tokens are weighted 1/t again."
    return (f" {lead} starts from the weights of the one before and trains {steps_text(cfg)} "
            f"more steps on a new problem stream (seed {cfg['seed']}), the learning rate warming up to "
            f"{cfg['lr']:g} over {cfg['warmup']} steps and decaying to a tenth of that on a cosine."
            f"{mix}{full_mask_sentence(cfg)}{adaptation_sentence(cfg)}")


# train --fit-canvas (train.fitted_canvas), in words
FITTED = "to the end of the block holding the EOS of the batch's longest answer"


def canvas_sentence(cfg: dict) -> str:
    """How a diffusion stage pads its answers: the canvases and their odds (train.py's Batcher)."""
    if cfg.get("fit_canvas"):
        return f"Answers are padded with EOS {FITTED}, EOS included in the loss."
    canvas, odds = cfg["canvas"], cfg.get("canvas_weights") or [1.0] * len(cfg["canvas"])
    sizes = "/".join(map(str, canvas))
    if len(canvas) == 1:
        return f"Answers are padded with EOS to a canvas of {sizes} tokens, EOS included in the loss."
    among = " among those the batch's answers fit" if cfg.get("batch_by_task") else ""
    return (f"Answers are padded with EOS to a canvas of {sizes} tokens, drawn per batch with odds "
            f"{':'.join(f'{float(w):g}' for w in odds)}{among}; EOS included in the loss.")


def _norm(value):
    return [float(v) if isinstance(v, (int, float)) else v for v in value] if isinstance(value, (list, tuple)) else value


def mix_sentence(mix) -> str:
    iid, block, eos = (float(m) / sum(map(float, mix)) for m in mix)
    if block == 0 and eos == 0:
        return "Every row uses LLaDA's independent masks (`dllm_decode/tools/train.py: mask_canvas`)."
    return (f"A fraction {iid:.2f} of the rows use LLaDA's independent masks, {block:.2f} mask like "
            "semi-autoregressive decoding (revealed blocks, a partly masked block, a fully masked rest) "
            f"and {eos:.2f} reveal EOS padding early as low-confidence decoding does; the last two are "
            "weighted by canvas length over masked count (`dllm_decode/tools/train.py: mask_canvas`).")


def block_objective(cfg: dict) -> str:
    """The objective sentence of a block-diffusion card: SDAR's (train.block_diffusion_loss) or
    Fast-dLLM v2's (train.shifted_block_diffusion_loss); they share the two-copy forward."""
    size = cfg.get("block_size", 4)
    if cfg["family"] == "fast_dllm_v2":
        start = ("Fast-dLLM v2 adapts an autoregressive model (arXiv 2509.26328): started from the first "
                 "stage's weights, the autoregressive model's (q/k/v biases at zero), logits shifted as the AR "
                 "model's are; per block of each row a mask ratio t ~ U(0.001, 1), answer tokens masked with "
                 "probability t, each row seen twice with complementary masks, and ")
        loss, weighting = "shifted_block_diffusion_loss", ", unweighted"
    else:
        start = ("SDAR adapts an autoregressive model (arXiv 2510.06303): started from the first stage's "
                 "weights, the autoregressive model's (the q/k norms SDAR's Qwen3 layout adds at one), per row "
                 "a mask ratio t ~ U(0.001, 1), answer tokens masked with probability t, and ")
        loss, weighting = "block_diffusion_loss", " weighted 1/t"
    # SDAR's cards have always named the draw, even of one size
    drawn = cfg.get("block_sizes") or ([size] if cfg["family"] == "sdar" else [])
    sizes = f"Block size drawn per batch from {', '.join(map(str, drawn))}" if drawn else f"Blocks of {size}"
    return (f"Block diffusion, as {start}every block of the noisy copy denoised given the clean blocks before "
            f"it (the noisy and the clean canvas side by side in one forward, `dllm_decode/tools/train.py: "
            f"{loss}`); cross-entropy on masked positions{weighting}. {sizes}; answers padded with EOS "
            f"{FITTED if cfg.get('fit_canvas') else 'to ' + '/'.join(map(str, cfg['canvas'])) + ' tokens'}. ")


def block_decode_line(family: str) -> str:
    """How a block-diffusion card's tables were decoded: with the family's recipe, block by block."""
    fd = family == "fast_dllm_v2"
    recipe = "fast-dllm-v2" if fd else "sdar"
    first = "each block's first token from the previous block's last output, then " if fd else ""
    sub = ", sub-blocks as long as the block" if fd else ""
    stop = "once its text ends in EOS" if fd else "after the block holding its EOS"
    return (f"Decoded block by block with the `{recipe}` recipe (`recipes/{recipe}.yaml`: greedy tokens, {first}"
            "every mask at or above the threshold and at least one per forward, the exact block KV cache), "
            f"the checkpoint loaded at each block size (`load_model(..., block_size=)`){sub}; a row stops {stop}.")


def write_card(path: Path, tables: list[tuple[str, list[dict]]], tasks, gen_length: int, seed: int,
               args: str, measured_on: str | None = None, device: str = "cpu", dtype: str = "float32",
               dry: bool = False) -> str:
    """Write README.md and eval.json of `path`. `measured_on`: the machine line of tables
    measured earlier (re-rendering); by default this machine's (`device`, `dtype`). `dry`: only
    build the card (writing nothing), to find what would stop it before minutes of decoding."""
    from dllm_decode.tools.train import BLOCK_FAMILIES

    measured_on = measured_on or machine(device, dtype)
    meta = json.loads((path / "training.json").read_text())
    cfg = meta["config"]
    ar = cfg["family"] == "ar"
    rel = path.as_posix()
    stages = training_stages(meta, rel)          # [(out, training.json)], first stage first
    first = stages[0][1]["config"]
    train_cmd = "\n".join(train_command(out, m["config"]) for out, m in stages)
    device_name = stages[0][1].get("device_name")
    # a last stage trained on a CPU from a checkpoint shipped beside this one is checked by itself:
    # its first steps are cheap here, where the first stage's may have been sized for a GPU
    init = Path(cfg.get("init") or "")
    own = (len(stages) > 1 and not meta.get("device_name") and init.parent == Path(rel).parent
           and init != Path(rel) and init.is_dir())
    checked = cfg if own else first
    # a device-sized batch takes tens of seconds a step on a CPU: check fewer steps there
    check_steps = cfg["log_every"] + 1 if own else 11 if device_name else 100
    check_cmd = (f"python -m dllm_decode.tools.train --family {checked['family']} --out runs/{path.name}-check"
                 f"{' --init ' + cfg['init'] if own else ''} {train_flags(checked, device=False)} "
                 f"--stop-after {check_steps} --check {rel}")
    places = [trained_on(m) for _, m in stages]
    batches = list(dict.fromkeys(batch_text(m["config"]) for _, m in stages))
    seconds = (" + ".join(f'{m["seconds"]:.0f}' for _, m in stages) + f" s on {places[0]}"
               if len(set(places)) == 1 else
               " + ".join(f'{m["seconds"]:.0f} s on {where}' for (_, m), where in zip(stages, places)))
    fmt = {"llada": "LLaDA (`config.json` model_type `llada`, `model.safetensors`), aligned logits",
           "dream": "Dream (`config.json` model_type `Dream`, Qwen2 parameter names, shifted logits: "
                    "logit i predicts token i+1)",
           "sdar": f"SDAR (`config.json` model_type `sdar`, Qwen3 parameter names with per-head q/k RMSNorm, "
                   f"block-causal attention in blocks of {cfg.get('block_size', 4)}, aligned logits)",
           "fast_dllm_v2": f"Fast-dLLM v2 (`config.json` model_type `Fast_dLLM_Qwen`, Qwen2 parameter names, "
                           f"block-causal attention in blocks of {cfg.get('block_size', 4)} (`bd_size`), shifted "
                           "logits: logit i predicts token i+1)",
           "ar": "`LlamaForCausalLM` (standard transformers; `AutoModelForCausalLM.from_pretrained`)"}[cfg["family"]]
    block = cfg["family"] in BLOCK_FAMILIES
    # a diffusion model adapted from an AR first stage: its objective is its first diffusion stage's
    adapted = not ar and not block and first["family"] == "ar"
    dfirst = next(m["config"] for _, m in stages if m["config"]["family"] != "ar") if adapted else first
    objective = ("Next-token prediction on the answer and one EOS; prompt tokens are not targets."
                 if ar else
                 block_objective(cfg) if block else
                 ("The first stage trains an autoregressive model by next-token prediction; the "
                  "diffusion stages start from its weights (`dllm_decode/tools/adapt.py`: the same "
                  "parameters, Dream's q/k/v biases at zero; Dream's logits shifted as the AR model's "
                  "are, LLaDA's read unshifted). " if adapted else "") +
                 "LLaDA's supervised masked-diffusion objective: per row a mask ratio t ~ U(0.001, 1), "
                 "answer tokens masked with probability t, the prompt never; cross-entropy on masked "
                 "positions weighted 1/t. " + canvas_sentence(dfirst) + " "
                 + mix_sentence(dfirst.get("mask_mix", (1.0, 0.0, 0.0))) + full_mask_sentence(dfirst)
                 + weight_sentence(dfirst) + adaptation_sentence(dfirst))

    def before(n: int) -> dict:
        """The stage a later stage's sentence is compared with: for the first diffusion stage of
        an adapted model, its own masks (already in the objective) and the AR stage's task odds."""
        prev = stages[n - 1][1]["config"]
        if adapted and prev["family"] == "ar":
            return {**stages[n][1]["config"], "task_weights": prev.get("task_weights")}
        return prev

    objective += " " + task_odds_sentence(first) + "".join(
        later_stage_sentence(n, m["config"], before(n)) for n, (_, m) in enumerate(stages) if n)
    decode_line = ("Greedy decoding with the KV cache; NFE = generated tokens including EOS." if ar else
                   block_decode_line(cfg["family"]) if block else
                   "LLaDA baseline recipe (`recipes/llada.yaml`: low-confidence remasking, temperature 0) "
                   "with steps = generation length / tokens-per-step.")
    task_lines = "\n".join(f"- `{t}` ({get_task(t).kind}): {get_task(t).description}." for t in tasks)
    loading = (f"Load it with `AutoModelForCausalLM.from_pretrained(\"{rel}\")` and "
               f"`AutoTokenizer.from_pretrained(\"{rel}\")`." if ar else
               f"Load it with `dllm_decode.models.load_model(\"{rel}\")`, which returns the model "
               "and its tokenizer. `config.json` keeps the family's real `auto_map` (the Hub's "
               "remote-code classes, not shipped here), so transformers asks whether to run remote "
               "code unless told: load the tokenizer alone with "
               f"`AutoTokenizer.from_pretrained(\"{rel}\", trust_remote_code=False)`.")
    card = CARD.format(
        name=path.name, kind="small autoregressive model" if ar else
        f"small block-diffusion model ({'Fast-dLLM v2' if cfg['family'] == 'fast_dllm_v2' else 'SDAR'} layout)"
        if block else f"small masked-diffusion model ({cfg['family']})",
        format_line=("It serves as APD's verifier and as the autoregressive baseline; it shares the "
                     "diffusion models' tokenizer." if ar else ""),
        format=fmt, params=meta["parameters"], d_model=cfg["d_model"], n_layers=cfg["n_layers"],
        n_heads=cfg["n_heads"], mlp_hidden=cfg["mlp_hidden"], tasks=", ".join(f"`{t}`" for t in cfg["tasks"]),
        steps=" + ".join(steps_text(m["config"]) for _, m in stages),
        seed=" then ".join(str(m["config"]["seed"]) for _, m in stages),
        seconds=seconds, batch=" then ".join(batches),
        device_note=(f" The last stage was trained on the CPU, from the shipped `{cfg['init']}`; its first "
                     f"stage on one {device_name}." if own and device_name else
                     f" This checkpoint was trained on one {device_name}, whose kernels round "
                     "differently from a CPU's: the check below reruns the first steps on the CPU, "
                     "where the losses agree with the shipped log to the tolerance `--check` allows "
                     "between machines." if device_name else ""),
        loading=loading, task_lines=task_lines, train_cmd=train_cmd, objective=objective,
        check_cmd=check_cmd,
        check_what="the command's first steps" if len(stages) == 1 else
        f"the last stage's first steps from `{cfg['init']}`" if own else "the first stage's first steps",
        check_where="" if len(stages) == 1 or own else (" (`loss_log.stage1.jsonl` is the first stage's; a "
                                                 "later stage checks the same way once the stage "
                                                 "before it has run)"),
        eval_seed=seed, gen_length=gen_length, decode_line=decode_line, machine=measured_on,
        tables="\n\n".join(f"{title}\n\n{render(rows, tasks)}" for title, rows in tables),
        rel=rel, args=args)
    if dry:
        return card
    readme = path / "README.md"
    old = readme.read_text() if readme.exists() else ""
    if KEEP in old:
        card += "\n" + old[old.index(KEEP):]    # hand-written notes survive a re-measure
    readme.write_text(card)
    decoded_on = {} if (device, dtype) == ("cpu", "float32") else {"device": device, "dtype": dtype}
    (path / "eval.json").write_text(json.dumps({"seed": seed, "gen_length": gen_length, "machine": measured_on,
                                                **decoded_on, "tables": [{"title": t, "rows": r} for t, r in tables]},
                                               indent=2) + "\n")
    return card


def card_args(n: int, grid_n: int | None, tasks, gen_length: int, device: str = "cpu",
              dtype: str = "float32") -> str:
    """The model_card flags that re-measure a card: problem counts, and the tasks, generation
    length, device and dtype when they are not the defaults."""
    args = f"--n {n} " + ("" if grid_n is None else f"--grid-n {grid_n} ")
    if tuple(tasks) != REFERENCE_MIX:
        args += f"--tasks {','.join(tasks)} "
    args += "" if gen_length == GEN_LENGTH else f"--gen-length {gen_length} "
    args += "" if device == "cpu" else f"--device {device} "
    return args + ("" if dtype == "float32" else f"--dtype {dtype} ")


def rerender(path: Path, ar: bool, dry: bool = False) -> str:
    """Rewrite the card from its eval.json: same tables, same measuring machine, current text
    (`dry`: only return it, up to the hand-written section a rewrite keeps)."""
    stored = json.loads((path / "eval.json").read_text())
    tables = [(t["title"], t["rows"]) for t in stored["tables"]]
    tasks = tuple(tables[0][1][0]["tasks"])     # the tasks measured
    n = [next(iter(rows[0]["tasks"].values()))["n"] for _, rows in tables]
    device, dtype = stored.get("device", "cpu"), stored.get("dtype", "float32")
    args = card_args(n[0], None if ar else (n[1] if len(n) > 1 else 0), tasks, stored["gen_length"], device, dtype)
    return write_card(path, tables, tasks, stored["gen_length"], stored["seed"], args, stored["machine"], device,
                      dtype, dry=dry)


def warn_truncated(path: Path, tasks, n: int, gen_length: int, seed: int) -> None:
    """Say which tasks have reference answers longer than the generation length (capped accuracy)."""
    import sys

    from dllm_decode.measure.evaluate import answers_longer_than, truncation_note
    from dllm_decode.models.loader import load_tokenizer

    tok = load_tokenizer(path)
    note = tok and truncation_note(answers_longer_than(held_out(tasks, n, seed), tok, gen_length), gen_length)
    if note:
        print(f"model_card: {note}", file=sys.stderr)


def refuse(message: str) -> None:
    """Stop on bad input with one line on stderr (argparse's exit status, without its usage block)."""
    import sys

    print(f"model_card: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_inputs(a: argparse.Namespace, path: Path, tasks) -> None:
    """Refuse in one line what would otherwise fail after the decoding (or as a traceback): unknown
    tasks, counts out of range, a folder that is not a checkpoint, and the files --write and
    --render read (training.json, eval.json) missing or not JSON, or a folder --write cannot write."""
    import os

    for t in tasks:
        try:
            get_task(t)
        except KeyError as e:
            refuse(f"--tasks {a.tasks!r}: {e.args[0]}")
    for flag, value, least in (("--n", a.n, 1), ("--grid-n", a.grid_n, 0), ("--gen-length", a.gen_length, 1),
                               ("--batch-size", a.batch_size, 1)):
        if value < least:
            refuse(f"{flag} {value}: must be at least {least}")
    if not path.is_dir():
        refuse(f"{path}: no such checkpoint folder")
    needed = ["config.json"] + (["eval.json"] if a.render else []) + (["training.json"] if a.write or a.render else [])
    for name in needed:
        f = path / name
        if not f.is_file():
            why = {"training.json": "the card's training section is built from it (written by "
                   "dllm_decode.tools.train)", "eval.json": "--render re-renders its tables (written by --write)",
                   "config.json": "not a checkpoint folder"}[name]
            refuse(f"{f}: missing; {why}")
        try:
            json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            refuse(f"{f}: not readable JSON ({e})")
    if (a.write or a.render) and not all(os.access(p, os.W_OK) for p in (path, *path.glob("README.md"),
                                                                          *path.glob("eval.json"))):
        refuse(f"{path}: cannot write README.md / eval.json there")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint directory (llada, dream or an AutoModelForCausalLM)")
    ap.add_argument("--tasks", default=",".join(REFERENCE_MIX), help="task names, comma-separated, or a named mix")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per task, headline table")
    ap.add_argument("--grid-n", type=int, default=50, help="held-out problems per task, full grid "
                    "(1/2/4/8 tokens per step x block 8/32/full); 0 skips the grid")
    ap.add_argument("--gen-length", type=int, default=GEN_LENGTH)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="torch device to decode on, e.g. cuda (the card names it)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the decode (the card names it)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out stream")
    ap.add_argument("--write", action="store_true", help="rewrite the directory's README.md and eval.json")
    ap.add_argument("--render", action="store_true", help="rewrite README.md from the tables already "
                    "in eval.json, without decoding (after a change to the card's text)")
    a = ap.parse_args(argv)
    path, tasks = Path(a.model), task_names(a.tasks)
    from dllm_decode.errors import CheckpointError, RecipeError
    from dllm_decode.models.loader import BLOCK_FIELDS, check_device
    from dllm_decode.recipes import default_recipe

    try:
        check_device(a.device, "--device")
    except CheckpointError as e:
        refuse(str(e))
    check_inputs(a, path, tasks)
    on = dict(device=a.device, dtype=a.dtype)
    ar = is_ar_checkpoint(path)
    if a.render:
        try:
            rerender(path, ar)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            refuse(f"{path / 'eval.json'} or {path / 'training.json'}: cannot render the card from them "
                     f"({type(e).__name__}: {e})")
        return
    if a.write:     # the card must build from training.json before the tables are spent on it
        try:
            write_card(path, [], tasks, a.gen_length, a.seed, "", device=a.device, dtype=a.dtype, dry=True)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            refuse(f"{path / 'training.json'}: cannot write the card from it ({type(e).__name__}: {e})")
    family = family_of(path)
    if family in BLOCK_FIELDS:
        trained = json.loads((path / "config.json").read_text())[BLOCK_FIELDS[family]]
        headline = ((trained, 0.85), (trained, 1.0))
        grid = tuple((b, t) for b in BLOCK_SIZES for t in THRESHOLDS) if a.grid_n else ()
    # every cell's recipe is built before the first decode: a generation length that a block
    # length of the grid does not divide is refused now, not after the headline table
    try:
        if family in BLOCK_FIELDS:
            for size, threshold in headline + grid:
                block_recipe(default_recipe(path), a.gen_length, size, threshold, a.batch_size, **on)
        elif not ar:
            for k, block in HEADLINE + (GRID if a.grid_n else ()):
                diffusion_recipe(a.gen_length, k, block, a.batch_size, **on)
    except (RecipeError, ValueError) as e:
        refuse(f"--gen-length {a.gen_length}: {e}")
    warn_truncated(path, tasks, a.n, a.gen_length, a.seed)
    tables = []
    if ar:
        tables.append((f"Greedy decoding, {a.n} problems per task:",
                       ar_table(path, tasks, a.n, a.gen_length, a.batch_size, a.seed, **on)))
    elif family in BLOCK_FIELDS:
        tables.append((f"The `{default_recipe(path)}` recipe at the checkpoint's block size, "
                       f"{a.n} problems per task:",
                       block_table(path, tasks, a.n, a.gen_length, a.batch_size, a.seed, headline, **on)))
        if a.grid_n:
            tables.append((f"Block size x threshold, {a.grid_n} problems per task:",
                           block_table(path, tasks, a.grid_n, a.gen_length, a.batch_size, a.seed, grid, **on)))
    else:
        tables.append((f"Baseline recipe (one block over the canvas), {a.n} problems per task:",
                       diffusion_table(path, tasks, a.n, a.gen_length, a.batch_size, a.seed, HEADLINE, **on)))
        if a.grid_n:
            tables.append((f"Tokens per step x block length, {a.grid_n} problems per task:",
                           diffusion_table(path, tasks, a.grid_n, a.gen_length, a.batch_size, a.seed, GRID, **on)))
    for title, rows in tables:
        print(title)
        print(render(rows, tasks))
    if a.write:
        write_card(path, tables, tasks, a.gen_length, a.seed,
                   card_args(a.n, None if ar else a.grid_n, tasks, a.gen_length, a.device, a.dtype), **on)


if __name__ == "__main__":
    main()
