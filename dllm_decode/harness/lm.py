"""The ``dllm_decode`` model of lm-evaluation-harness: any recipe over any dllm_decode model.

    lm_eval.simple_evaluate(model="dllm_decode",
                            model_args="model=models/llada-reference,recipe=llada", tasks=[...])

Importing this module registers the class (lm-eval's registry is filled by decorators at
import time; it scans no entry points), which ``dllm-decode eval`` does before handing its
arguments to lm-eval's command line. Options: :mod:`dllm_decode.harness.options`.

- ``generate_until`` decodes the requests through the engine, ``batch_size`` at a time
  (longest prompts first, so a batch pads little), and cuts each answer at EOS,
  ``max_gen_toks`` and the ``until`` strings (:mod:`dllm_decode.harness.stops`).
- ``loglikelihood`` is LLaDA's Monte-Carlo ELBO estimate
  (:mod:`dllm_decode.harness.likelihood`); ``loglikelihood_rolling`` is refused.
- ``rank`` / ``world_size`` / ``all_gather`` / ``gather_object`` / ``barrier`` come from the
  launcher's process group (:mod:`dllm_decode.harness.distributed`); lm-eval shards the
  requests by rank.
- With ``log_dir`` every answer is logged per rank with its NFE, tokens and seconds, and a
  restarted run answers logged requests from the log (:mod:`dllm_decode.harness.request_log`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# lm-eval imports its own models only into an empty registry: registering ours first would hide them
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dllm_decode.errors import InputError, RecipeError
from dllm_decode.measure.evaluate import generated_tokens
from dllm_decode.harness.distributed import ProcessGroup
from dllm_decode.harness.likelihood import is_greedy, mc_loglikelihood
from dllm_decode.harness.options import HarnessOptions, name_model_args, parse_options
from dllm_decode.harness.request_log import RequestLog, request_key, stable_hash
from dllm_decode.harness.stops import answer_tokens, cut_at_stops, stop_strings

log = logging.getLogger(__name__)

# gen_kwargs applied to the answer; sampling keys belong to the recipe, and any that ask for more
# than greedy decoding are reported once as ignored
_HONOURED = {"until", "max_gen_toks"}
_GREEDY_DEFAULTS = {"do_sample": False, "temperature": 0.0}


@dataclass
class _Pending:
    index: int                  # position in the call's request list
    key: str
    ids: list[int]
    gen_kwargs: dict[str, Any]
    request: Any
    repeat: int = 0             # how many identical requests came before it (lm-eval's repeats)


@register_model("dllm_decode")
class DllmDecodeLM(LM):
    """lm-eval model over :class:`dllm_decode.engine.Decoder`. Keyword arguments: see
    :class:`~dllm_decode.harness.options.HarnessOptions` (dotted keys override the recipe)."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        from dllm_decode.config import load_recipe, resolve_recipe
        from dllm_decode.engine import Decoder
        from dllm_decode.plugins import get_plugin_manager
        from dllm_decode.recipes import find_recipe

        self.options: HarnessOptions = parse_options(kwargs)
        opts = self.options
        pm = get_plugin_manager()
        try:
            recipe = load_recipe(find_recipe(opts.recipe), overrides=[*opts.overrides, *self._batch_override(opts)])
            policy = resolve_recipe(recipe, pm)     # recipe errors surface before the model loads
        except RecipeError as err:
            # resolve_recipe blames the --set an override became; here it was a model_args key
            raise RecipeError(name_model_args(str(err), opts)) from None
        model_path = opts.model or recipe.model.path
        if not model_path:
            raise InputError("model_args: no model; give model=DIR (or set model.path in the recipe)")
        self.group = ProcessGroup.from_env(opts.device or recipe.model.device,
                                           timedelta(hours=opts.dist_timeout_hours))
        what = "model_args model" if opts.model else f"{recipe.source or '<recipe>'}: model.path"
        self.model, self.tokenizer = _load(model_path, recipe.generation.dtype, self.group.device, what)
        self.recipe = recipe
        self.model_path = str(model_path)
        self.decoder = Decoder(self.model, recipe, pm=pm, tokenizer=self.tokenizer, policy=policy)
        self.mask_id = int(self.model.spec.mask_token_id)
        self.eos_ids = set(self.decoder.eos_ids)
        self.log = RequestLog(opts.log_dir, self.group.rank)
        if len(self.log) and self.group.rank == 0:
            # every rank reads the same files; one line says it, before any request is answered
            print(f"dllm_decode: log_dir {opts.log_dir} already holds {len(self.log)} answered request(s): "
                  "requests logged there with the same model and recipe are answered from the log, not "
                  "decoded again (give a new log_dir to decode everything)", file=sys.stderr)
        self._rank, self._world_size, self._device = self.group.rank, self.group.world_size, self.group.device
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _batch_override(opts: HarnessOptions) -> list[str]:
        if isinstance(opts.batch_size, int):
            return [f"generation.batch_size={opts.batch_size}"]
        return []                               # None / 'auto': the recipe's batch size, capped below

    @property
    def batch_size(self) -> int:
        size = self.recipe.generation.batch_size
        if not isinstance(self.options.batch_size, int) and self.options.max_batch_size:
            size = min(size, self.options.max_batch_size)
        return size

    def _fingerprint(self, method: str) -> str:
        """Everything besides the request that decides an answer. The batch size is left out
        at temperature 0, where it does not change outputs, so a resumed run may use another."""
        recipe = self.recipe.to_dict()
        if self.recipe.generation.temperature == 0:
            recipe["generation"].pop("batch_size", None)
        parts: dict[str, Any] = {"model": str(Path(self.model_path).resolve()), "recipe": recipe,
                                 "add_bos_token": self.options.add_bos_token}
        if method == "loglikelihood":
            parts = {"model": parts["model"], "dtype": self.recipe.generation.dtype,
                     "add_bos_token": self.options.add_bos_token,
                     **self.options.model_dump(include={"mc_num", "mc_batch", "seed", "greedy_check"})}
        return stable_hash(parts)

    # ------------------------------------------------------------------ lm-eval interface

    @property
    def device(self) -> torch.device:
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return self.group.gather_object(obj, dst=dst)

    def barrier(self) -> None:
        self.group.barrier()

    @property
    def tokenizer_name(self) -> str:
        return Path(self.model_path).name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):          # named templates: pick one, else the default
            key = chat_template if isinstance(chat_template, str) else "default"
            return template.get(key)
        return template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"--apply_chat_template: the tokenizer of {self.model_path} has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"dllm_decode_model": self.model_path, "dllm_decode_recipe": self.recipe.source,
                "dllm_decode_batch_size": self.batch_size}

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "dllm_decode: loglikelihood_rolling (perplexity tasks such as wikitext) is not supported: a "
            "masked-diffusion model gives no left-to-right token probabilities to chain; use "
            "generate_until or loglikelihood (multiple-choice) tasks")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        fingerprint = self._fingerprint("generate_until")
        out: list[str | None] = [None] * len(requests)
        pending: list[_Pending] = []
        seen: dict[str, int] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            key = request_key("generate_until", req.args, fingerprint)
            # a task's repeats (pass@k) are identical requests: each gets its own seed and log key
            repeat = seen[key] = seen.get(key, -1) + 1
            key = key if repeat == 0 else f"{key}#{repeat}"
            hit = self.log.get(key)
            if hit is not None:
                out[i] = hit["output"]
                continue
            self._check_gen_kwargs(gen_kwargs)
            pending.append(_Pending(i, key, self._prompt_ids(context), dict(gen_kwargs), req, repeat))
        self._check_cached_repeats(pending)
        # longest prompts first: a batch's rows then need little left padding
        pending.sort(key=lambda p: -len(p.ids))
        bar = tqdm(total=len(requests), initial=len(requests) - len(pending), desc="dllm_decode generate",
                   disable=disable_tqdm or self.rank != 0)
        totals = {"tokens": 0, "nfe": 0, "seconds": 0.0}
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            t0 = time.perf_counter()
            seeds = [self.decoder.gen.seed + p.repeat for p in chunk]     # a row's draws are its own
            rows = self.decoder.generate([p.ids for p in chunk], seeds=seeds).rows
            seconds = time.perf_counter() - t0
            records = []
            for p, row in zip(chunk, rows):
                text = self._answer(row.tokens, p.gen_kwargs)
                out[p.index] = text
                self.cache_hook.add_partial("generate_until", p.request.args, text)
                n_tok = generated_tokens(row.tokens, self.eos_ids)
                records.append({"key": p.key, "method": "generate_until", "index": p.index,
                                "doc_id": getattr(p.request, "doc_id", None),
                                "task": getattr(p.request, "task_name", None),
                                "prompt_hash": stable_hash(p.request.args[0])[:16], "output": text,
                                "nfe": row.nfe, "tokens": n_tok, "seconds": seconds / len(chunk),
                                "batch_rows": len(chunk)})
                totals["tokens"] += n_tok
                totals["nfe"] += row.nfe
            totals["seconds"] += seconds
            self.log.write(records)
            bar.update(len(chunk))
        bar.close()
        if pending:
            log.info("dllm_decode rank %d: generated %d request(s) (%d from the log): %d tokens, %.1f NFE per "
                     "request, %.2f s, %.1f tokens/s", self.rank, len(pending), len(requests) - len(pending),
                     totals["tokens"], totals["nfe"] / len(pending), totals["seconds"],
                     totals["tokens"] / max(totals["seconds"], 1e-9))
        return [o if o is not None else "" for o in out]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        fingerprint = self._fingerprint("loglikelihood")
        out: list[tuple[float, bool]] = []
        for i, req in enumerate(tqdm(requests, desc="dllm_decode loglikelihood",
                                     disable=disable_tqdm or self.rank != 0)):
            context, continuation = req.args
            key = request_key("loglikelihood", req.args, fingerprint)
            hit = self.log.get(key)
            if hit is not None:
                out.append((float(hit["loglik"]), bool(hit["is_greedy"])))
                continue
            t0 = time.perf_counter()
            answer = self.score_pair(context, continuation)
            out.append(answer)
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            self.log.write([{"key": key, "method": "loglikelihood", "index": i,
                             "doc_id": getattr(req, "doc_id", None), "task": getattr(req, "task_name", None),
                             "prompt_hash": stable_hash(context)[:16], "loglik": answer[0],
                             "is_greedy": answer[1], "nfe": self._loglik_nfe(continuation),
                             "seconds": time.perf_counter() - t0}])
        return out

    # ------------------------------------------------------------------ helpers

    def score_pair(self, context: str, continuation: str) -> tuple[float, bool]:
        """(estimated log p(continuation | context), is_greedy) for one request."""
        ctx, cont = self.encode_pair(context, continuation)
        # seeded by the request itself: the estimate does not depend on order, batching or rank
        seed = int(stable_hash([self.options.seed, context, continuation])[:15], 16)
        gen = torch.Generator().manual_seed(seed)
        ll = mc_loglikelihood(self.model, ctx, cont, mask_id=self.mask_id, mc_num=self.options.mc_num,
                              mc_batch=self.options.mc_batch, generator=gen, device=self.device)
        greedy = is_greedy(self.model, ctx, cont, mask_id=self.mask_id, mode=self.options.greedy_check,
                           device=self.device)
        return ll, greedy

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation. Trailing whitespace of the context moves to the
        continuation and the pair is tokenized whole (lm-eval's convention, so word-initial
        spaces tokenize as they would in running text); an over-long context loses its start."""
        strip = len(context) - len(context.rstrip())
        if strip:
            context, continuation = context[:-strip], context[-strip:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context) if context else []
        cont = whole[len(ctx):]
        limit = int(getattr(self.model.spec, "max_length", 0) or 0)
        if limit and len(cont) > limit:
            raise InputError(f"loglikelihood: continuation of {len(cont)} tokens exceeds the model's {limit}")
        if limit and len(ctx) + len(cont) > limit:
            ctx = ctx[len(ctx) + len(cont) - limit:]
        return ctx, cont

    def _loglik_nfe(self, continuation: str) -> int:
        mode = self.options.greedy_check
        greedy = {"off": 0, "parallel": 1}.get(mode, len(self._encode(continuation)))
        return self.options.mc_num // min(self.options.mc_batch, self.options.mc_num) + greedy

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self.options.add_bos_token)["input_ids"])

    def _prompt_ids(self, context: str) -> list[int]:
        ids = self._encode(context)
        limit = int(getattr(self.model.spec, "max_length", 0) or 0)
        room = limit - self.recipe.generation.gen_length if limit else len(ids)
        if room <= 0:
            raise InputError(f"generation.gen_length {self.recipe.generation.gen_length} leaves no room for a "
                             f"prompt in the model's {limit} positions")
        if len(ids) > room:
            self._warn_once("truncate", "prompts longer than %d tokens (model length %d minus gen_length) "
                            "lose their start", room, limit)
            ids = ids[-room:]
        return ids

    def _answer(self, tokens: list[int], gen_kwargs: dict[str, Any]) -> str:
        kept = answer_tokens(tokens, self.eos_ids, gen_kwargs.get("max_gen_toks"))
        return cut_at_stops(self.tokenizer.decode(kept, skip_special_tokens=True), stop_strings(gen_kwargs))

    def _check_gen_kwargs(self, gen_kwargs: dict[str, Any]) -> None:
        stop_strings(gen_kwargs)                # a malformed `until` fails here, naming it
        limit = gen_kwargs.get("max_gen_toks")
        if limit is not None and int(limit) > self.recipe.generation.gen_length:
            self._warn_once("max_gen_toks", "max_gen_toks=%s exceeds the recipe's canvas (generation.gen_length="
                            "%d); answers are at most gen_length tokens", limit, self.recipe.generation.gen_length)
        sampled = self.recipe.generation.temperature > 0       # do_sample saying so is not ignored
        ignored = {k: v for k, v in gen_kwargs.items() if k not in _HONOURED
                   and _GREEDY_DEFAULTS.get(k, object()) != v and not (k == "do_sample" and v is sampled)}
        if ignored:
            self._warn_once("gen_kwargs", "gen_kwargs %s are ignored: sampling is the recipe's (temperature %s); "
                            "override it with generation.* keys in model_args", sorted(ignored),
                            self.recipe.generation.temperature)

    def _check_cached_repeats(self, pending: list[_Pending]) -> None:
        """lm-eval's ``--use_cache`` answers a request from its cache unless its gen_kwargs say
        ``do_sample: true``; the recipe's temperature is not in them, so a rerun would give every
        repeat of a sampled request (pass@k) one cached sample. Refused before anything runs."""
        if self.recipe.generation.temperature <= 0 or getattr(self.cache_hook, "dbdict", None) is None:
            return
        repeat = next((p for p in pending if p.repeat and not p.gen_kwargs.get("do_sample")), None)
        if repeat is not None:
            raise InputError(
                f"task {getattr(repeat.request, 'task_name', None)!r} repeats a request, the recipe samples "
                f"(generation.temperature={self.recipe.generation.temperature}) and lm-eval's --use_cache is "
                "on: a rerun would answer every repeat with one cached sample. Add do_sample: true to the "
                "task's generation_kwargs (lm-eval's cache then skips them), or leave --use_cache out "
                "(model_args log_dir=... resumes a run without it)")

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("dllm_decode: " + message, *args)


def _load(path: str, dtype: str, device: torch.device, what: str) -> tuple[Any, Any]:
    from dllm_decode.models import load_model

    try:
        model, tokenizer = load_model(path, dtype=dtype, device=device, what=what)
    except (FileNotFoundError, ValueError) as err:      # the loader's message names `what` and the path
        raise InputError(str(err)) from err
    if tokenizer is None:
        raise InputError(f"{what} {path}: no tokenizer files; lm-eval sends text")
    return model, tokenizer
