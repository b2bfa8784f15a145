"""``--model_args`` of the ``dllm_decode`` lm-eval model, validated.

lm-eval parses ``key=value,key2=value2`` and casts each value (``true`` -> bool, ``32`` -> int,
``0.5`` -> float, ``none`` -> None) before calling the constructor; these options take those
values. A key with a dot is a recipe override, as ``--set`` on the command line:
``generation.gen_length=32`` or ``select_tokens.threshold=0.8``. Any other unknown key is an
error that names it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dllm_decode.errors import InputError


class HarnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="Checkpoint directory (default: the recipe's model.path).")
    recipe: str = Field("llada", description="Recipe file or shipped recipe name.")
    batch_size: int | Literal["auto"] | None = Field(
        None, description="Rows decoded together in generate_until; overrides generation.batch_size. "
        "'auto' keeps the recipe's, capped by max_batch_size.")
    max_batch_size: int | None = Field(None, ge=1, description="Upper bound on the batch size.")
    device: str | None = Field(None, description="Device (default: the recipe's model.device; under a "
                               "multi-process launch, cuda:LOCAL_RANK when CUDA is available, else cpu).")
    mc_num: int = Field(128, ge=1, description="Monte-Carlo samples per loglikelihood request.")
    mc_batch: int = Field(32, ge=1, description="Samples per forward in loglikelihood (at most mc_num, "
                          "which it must divide).")
    seed: int = Field(0, ge=0, description="Seed of the loglikelihood masks (mixed with a hash of "
                      "each request, so results do not depend on order, batching or rank).")
    greedy_check: Literal["parallel", "iterative", "off"] = Field(
        "parallel", description="How loglikelihood's is_greedy is computed: 'parallel' = argmax of one "
        "forward with the whole continuation masked; 'iterative' = unmask the most confident position "
        "one forward at a time (LLaDA's check); 'off' = always False.")
    add_bos_token: bool = Field(False, description="Let the tokenizer add its special tokens to prompts.")
    log_dir: str | None = Field(None, description="Directory of the per-rank JSONL request logs; "
                                "requests already logged there are not recomputed.")
    dist_timeout_hours: float = Field(168.0, gt=0, description="Timeout of the multi-process group: "
                                      "ranks wait at barriers while others are still generating.")
    trust_remote_code: bool | None = Field(None, description="Accepted for lm-eval compatibility; "
                                           "checkpoint code is never run.")
    overrides: list[str] = Field(default_factory=list, description="Recipe overrides (dotted keys).")


def _as_override(key: str, value: Any) -> str:
    # JSON scalars are YAML scalars: true/false/null/numbers stay typed, strings stay strings
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def parse_options(kwargs: dict[str, Any]) -> HarnessOptions:
    """Options from the constructor's keyword arguments; ``pretrained`` is taken as ``model``
    (the name lm-eval's own HF model uses)."""
    data = dict(kwargs)
    if "pretrained" in data:
        if data.get("model") is not None:
            raise InputError("model_args: give either model= or pretrained=, not both")
        data["model"] = data.pop("pretrained")
    overrides = [_as_override(k, data.pop(k)) for k in [k for k in data if "." in k]]
    size = data.get("batch_size")
    if isinstance(size, str):
        # lm-eval's "auto" / "auto:N" (re-probe N times) both mean: the recipe's batch size here
        data["batch_size"] = "auto" if size.startswith("auto") else size
    known = set(HarnessOptions.model_fields) - {"overrides"}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise InputError(f"model_args: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}, "
                         "or a dotted recipe key such as generation.gen_length")
    try:
        opts = HarnessOptions(**data, overrides=overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise InputError(f"model_args {key}={err.get('input')!r}: {err['msg']}") from None
    if opts.mc_num % min(opts.mc_batch, opts.mc_num):
        raise InputError(f"model_args mc_batch={opts.mc_batch} must divide mc_num={opts.mc_num}")
    return opts


def name_model_args(message: str, opts: HarnessOptions) -> str:
    """An error of the recipe, with each ``--set KEY=VALUE`` it blames (config.blame_overrides)
    named as the model_args key it came from: eval has no --set flag."""
    typed = {text: text for text in opts.overrides}
    if isinstance(opts.batch_size, int):       # model_args batch_size=N is applied as this --set
        typed.setdefault(f"generation.batch_size={opts.batch_size}", f"batch_size={opts.batch_size}")
    # longest first: `--set a=1` must not rewrite the start of `--set a=10`
    for text in sorted(typed, key=len, reverse=True):
        message = message.replace(f"--set {text}", f"model_args {typed[text]}")
    return message
