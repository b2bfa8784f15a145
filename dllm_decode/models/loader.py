"""Loading and saving checkpoints in the real on-disk formats of the LLaDA, Dream, SDAR,
Fast-dLLM v2 and LLaDA2 families.

`load_model(path)` reads `config.json`, picks the family, builds the model on the meta device
(no weights allocated) and assigns the safetensors tensors shard by shard, converted to the
requested dtype on the target device: the host never holds a second copy of the weights. No
checkpoint remote code is imported, so it works with any transformers version.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, CheckpointNotFoundError, DllmDecodeError
from .denoiser import Denoiser, init_random_
from .dream import DreamConfig, DreamModel
from .fast_dllm_v2 import FastDLLMv2Config, FastDLLMv2Model
from .llada import LLaDAConfig, LLaDAModel
from .llada2 import LLaDA2Config, LLaDA2Model
from .sdar import SDARConfig, SDARModel

__all__ = ["detect_family", "load_model", "save_pretrained", "build_random_model",
           "load_tokenizer", "encode_prompts", "resolve_dtype", "check_device", "load_causal_lm"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
           "float16": torch.float16, "fp16": torch.float16}
_FAMILIES = {"llada": (LLaDAConfig, LLaDAModel), "dream": (DreamConfig, DreamModel),
             "sdar": (SDARConfig, SDARModel), "fast_dllm_v2": (FastDLLMv2Config, FastDLLMv2Model),
             "llada2": (LLaDA2Config, LLaDA2Model)}
# config.json's architectures / model_type of each family
_NAMES = {"llada": ("LLaDAModelLM", "llada"), "dream": ("DreamModel", "dream"),
          "sdar": ("SDARForCausalLM", "sdar"), "fast_dllm_v2": ("Fast_dLLM_QwenForCausalLM", "fast_dllm_qwen"),
          "llada2": ("LLaDA2MoeModelLM", "llada2_moe")}
_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
# turn-end tokens of the instruct tokenizers, looked up by name (ids differ per family)
_EOT_TOKENS = {"llada": "<|eot_id|>", "dream": "<|im_end|>", "sdar": "<|im_end|>", "fast_dllm_v2": "<|im_end|>",
               "llada2": "<|role_end|>"}
# families whose Hub tokenizer may name remote code over Qwen2's BPE files
_QWEN_BPE = ("dream", "sdar", "fast_dllm_v2")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float64, float16") from None


def detect_family(config: dict, source: str = "config.json") -> str:
    """The family ('llada', 'dream', 'sdar', 'fast_dllm_v2', 'llada2') from config.json's
    architectures (or model_type when it names none); anything else is refused with the path and
    the keys it read."""
    mt = config.get("model_type")
    archs = config.get("architectures") or []
    mt_l = str(mt).lower() if mt is not None else None
    for family, (arch, model_type) in _NAMES.items():
        if arch in archs or (mt_l == model_type and not archs):
            return family
    hint = ""
    if any(str(a).endswith("ForCausalLM") for a in archs):
        hint = " (an autoregressive model: bench takes it as --ar-model, apd as its verifier)"
    known = ", ".join(f"{arch} (model_type {mt!r})" for arch, mt in _NAMES.values())
    raise CheckpointError(
        f"{source}: unsupported model family: key 'model_type' is {mt!r}, key 'architectures' is "
        f"{archs!r}{hint}; dllm-decode loads {known}")


def _config_for(family: str, d: dict, source: str):
    cfg_cls, _ = _FAMILIES[family]
    try:
        return cfg_cls.from_dict(d, source)
    except (ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, DllmDecodeError):
            raise
        msg = str(exc) if str(exc).startswith(source) else f"{source}: {type(exc).__name__}: {exc}"
        raise CheckpointError(msg) from None


def _read_json(file: Path, what: str) -> dict:
    """A JSON object from ``file``; anything else is one error naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the {what}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def _shard_files(path: Path) -> list[Path]:
    index = path / _SAFE_INDEX
    if index.exists():
        weight_map = _read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        return [path / f for f in dict.fromkeys(weight_map.values())]  # ordered, unique
    if (path / _SAFE_SINGLE).exists():
        return [path / _SAFE_SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointNotFoundError(f"{path}: no {_SAFE_INDEX}, {_SAFE_SINGLE} or *.safetensors found")


def check_device(device: str | torch.device, what: str = "device") -> torch.device:
    """``device`` as a torch.device, refused in one line when torch cannot use it here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{what} {str(device)!r}: not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"{what} {str(device)!r}: this torch ({torch.__version__}) sees no CUDA device; "
                              "use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError(f"{what} {str(device)!r}: MPS is not available here; use cpu")
    return dev


#: the config field holding a block-diffusion family's block size
BLOCK_FIELDS = {"sdar": "block_size", "fast_dllm_v2": "bd_size", "llada2": "block_size"}


def _named(path: Path, what: str | None) -> str:
    """``path`` as an error names it: after the flag, option or recipe key that gave it, if known."""
    return f"{what} {str(path)!r}" if what else str(path)


def _config_file(path: Path, what: str | None) -> Path:
    """``path``/config.json, refused (:class:`CheckpointNotFoundError`) when ``path`` is not
    a directory holding one."""
    if not path.exists():
        raise CheckpointNotFoundError(f"{_named(path, what)}: directory does not exist")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{_named(path, what)}: a file, not a checkpoint directory (config.json "
                                      "and the weights)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointNotFoundError(f"{_named(path, what)}: no config.json in this directory: not a Hugging "
                                      "Face checkpoint directory")
    return cfg_path


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", *, tokenizer: bool = True, block_size: int | None = None,
               what: str | None = None):
    """Load a LLaDA, Dream, SDAR, Fast-dLLM v2 or LLaDA2 checkpoint directory -> (Denoiser,
    tokenizer or None). ``block_size``: decode a block-diffusion checkpoint in blocks of this
    size instead of its config's (as SDAR's ``generate.py --block_length`` does). ``what``:
    where ``path`` came from (``"--model"``, ``"r.yaml: model.path"``), named with it when
    ``path`` is not a checkpoint directory.

    :raises CheckpointError: naming the file at fault (config.json, a safetensors shard, the
        tokenizer), or the device; :class:`CheckpointNotFoundError` when ``path`` is not a
        directory with a config.json.
    """
    path = Path(path)
    cfg_path = _config_file(path, what)
    raw = _read_json(cfg_path, "model config")
    family = detect_family(raw, str(cfg_path))
    cfg = _config_for(family, raw, str(cfg_path))
    if block_size is not None:
        if family not in BLOCK_FIELDS:
            raise CheckpointError(f"{cfg_path}: block_size {block_size} asked of a {family} model, which attends "
                                  "bidirectionally; it applies to block-diffusion checkpoints")
        if block_size < 1:
            raise CheckpointError(f"{cfg_path}: block_size must be at least 1, got {block_size}")
        cfg = replace(cfg, **{BLOCK_FIELDS[family]: block_size})
    dt, dev = resolve_dtype(dtype), check_device(device)
    tok = load_tokenizer(path, family) if tokenizer else None
    _fill_special_ids(cfg, tok, family, str(cfg_path))
    with torch.device("meta"):
        model = _FAMILIES[family][1](cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    seen: set[str] = set()
    for shard in _shard_files(path):
        try:
            seen.update(_load_shard(model, shard, expected, family, dt, dev, cfg_path))
        except DllmDecodeError:
            raise
        except Exception as exc:  # safetensors' own errors name no file; this one does
            raise CheckpointError(f"{shard}: cannot read the weights ({type(exc).__name__}: {exc}); "
                                  "the file may be truncated or corrupt") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    model.eval().requires_grad_(False)
    return model, tok


def _fill_special_ids(cfg, tok, family: str, source: str) -> None:
    """Ids the config leaves out, from the tokenizer as the official code reads them: the turn end
    by name; SDAR's mask id (generate.py takes the tokenizer's mask token when the config has
    none) and pad / EOS (its config has no pad_token_id). Refuses, naming the key, an id neither
    gives."""
    if tok is not None and cfg.eot_token_id is None:
        cfg.eot_token_id = _token_id(tok, _EOT_TOKENS[family])
    if family != "sdar":
        return
    if tok is not None:
        for key, token in (("mask_token_id", "mask_token"), ("eos_token_id", "eos_token"),
                           ("pad_token_id", "pad_token")):
            if getattr(cfg, key) is None and getattr(tok, token, None):
                setattr(cfg, key, _token_id(tok, getattr(tok, token)))
    for key in ("mask_token_id", "eos_token_id"):
        if getattr(cfg, key) is None:
            raise CheckpointError(f"{source}: key {key!r} is missing and the checkpoint's tokenizer does not "
                                  "name that token")


def _load_shard(model, shard: Path, expected: dict[str, tuple[int, ...]], family: str, dt: torch.dtype,
                dev: torch.device, cfg_path: Path) -> set[str]:
    """Assign one safetensors file's tensors to ``model`` (``expected``: name -> the shape
    config.json implies); -> the names it held."""
    from safetensors import safe_open

    # safe_open memory-maps the file; each tensor is read, converted and assigned on its own, so
    # the peak is the model plus one tensor in transit
    with safe_open(str(shard), framework="pt", device=str(dev) if dev.type == "cuda" else "cpu") as f:
        part: dict[str, Tensor] = {}
        for name in f.keys():
            if name not in expected:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # buffer some exporters save; RoPE tables are recomputed
                raise CheckpointError(f"{shard}: unexpected parameter {name!r} for a {family} model")
            # read from the header before any data: torch's own refusal lists every mismatched
            # tensor and would be reported as a corrupt file
            shape = tuple(f.get_slice(name).get_shape())
            if shape != expected[name]:
                raise CheckpointError(f"{cfg_path} does not match the weights in {shard.name}: tensor {name!r} "
                                      f"is {list(shape)} there, config.json implies {list(expected[name])} "
                                      "(was config.json edited, or copied from another checkpoint?)")
            # copy=True: a tensor already in `dt` comes back from safetensors 0.8 at an address
            # that is not 64-byte aligned, and assign=True would keep it; its matmuls then round
            # differently (last bit) from the same weights in a fresh allocation
            part[name] = f.get_tensor(name).to(device=dev, dtype=dt, copy=True)
        model.load_state_dict(part, strict=False, assign=True)
    return set(part)


def _token_id(tok, token: str) -> int | None:
    try:
        i = tok.convert_tokens_to_ids(token)
    except Exception:
        return None
    unk = getattr(tok, "unk_token_id", None)
    return None if i is None or i == unk else int(i)


def load_tokenizer(path: str | os.PathLike, family: str | None = None):
    """transformers.AutoTokenizer for the checkpoint directory, or None when it ships no
    tokenizer files. Dream's Hub tokenizer names a remote-code class (DreamTokenizer), SDAR's
    and Fast-dLLM v2's may name their own Qwen2 tokenizer files; all are the Qwen2 BPE, so for
    those families we fall back to Qwen2TokenizerFast on its vocab.json / merges.txt."""
    path = Path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at config.json: it warns that model_type 'llada' is unknown to it and,
    # for Qwen2-style configs, that `rope_scaling` is deprecated; neither concerns us
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                # never remote code (and never transformers' interactive "run custom code?")
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            except Exception as err:  # tokenizers raises bare Exception on a corrupt tokenizer.json
                if family in _QWEN_BPE and (path / "vocab.json").exists() and (path / "merges.txt").exists():
                    from transformers import Qwen2TokenizerFast
                    return Qwen2TokenizerFast.from_pretrained(str(path))
                raise CheckpointError(f"{path}: could not load the tokenizer: {err}") from None
    finally:
        hf_logging.set_verbosity(level)


def encode_prompts(tokenizer, prompts: list[str], *, chat: bool = False, pad_token_id: int,
                   device: str | torch.device = "cpu", add_special_tokens: bool = True) -> tuple[Tensor, Tensor]:
    """Tokenize prompts (chat=True applies the tokenizer's chat template with a generation
    prompt, as the instruct models expect) and left-pad them: -> input_ids (B, P) long,
    attention_mask (B, P) bool."""
    rows: list[list[int]] = []
    for p in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False)
            # the template already holds the BOS / role tokens
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            rows.append(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            ids[b, P - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, P - len(r):] = True
    return ids.to(device), mask.to(device)


def save_pretrained(model: Denoiser, path: str | os.PathLike, *, shards: int = 1,
                    max_shard_size: int | None = None, dtype: str | torch.dtype | None = None) -> Path:
    """Write `model` in its family's real on-disk format: config.json with the checkpoint's own
    field names, safetensors with its own parameter names; with shards > 1 (or a byte limit)
    `model-0000k-of-0000n.safetensors` files plus `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dt = model.dtype if dtype is None else resolve_dtype(dtype)
    cfg = model.config.to_dict()
    # newer configs (LLaDA2's) spell the key "dtype"
    cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(dt).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    sd = {k: v.detach().to(dtype=dt, device="cpu").contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    sizes = [sd[n].numel() * sd[n].element_size() for n in names]
    total = sum(sizes)
    if max_shard_size is not None:
        groups, cur, cur_size = [], [], 0
        for n, sz in zip(names, sizes):
            if cur and cur_size + sz > max_shard_size:
                groups.append(cur)
                cur, cur_size = [], 0
            cur.append(n)
            cur_size += sz
        groups.append(cur)
    else:
        k = max(1, min(shards, len(names)))
        groups = [names[i * len(names) // k:(i + 1) * len(names) // k] for i in range(k)]

    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file(sd, str(path / _SAFE_SINGLE), metadata=meta)
        return path
    weight_map = {}
    for j, g in enumerate(groups, 1):
        fname = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in g}, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in g})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / _SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path


def build_random_model(family: str, vocab_size: int = 96, d_model: int = 32, n_layers: int = 2,
                       n_heads: int = 4, n_kv_heads: int | None = None, mlp_hidden: int | None = None,
                       mask_token_id: int | None = None, eos_token_id: int | None = None,
                       pad_token_id: int | None = None, eot_token_id: int | None = None,
                       seed: int = 0, dtype: str | torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", max_length: int = 4096,
                       rope_theta: float | None = None, norm_eps: float | None = None,
                       **extra) -> Denoiser:
    """A small model of the given family with deterministic random weights (tests, demos,
    shape checks). Special ids default to the top of the vocabulary: mask = V-1, eos = pad = V-2.
    `extra`: further fields of the family's config dataclass under their config.json names
    (e.g. ``block_size=8`` for SDAR, ``bd_size`` for Fast-dLLM v2, ``num_experts``,
    ``first_k_dense_replace`` for LLaDA2)."""
    family = family.lower()
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {sorted(_FAMILIES)}")
    ids = dict(mask_token_id=vocab_size - 1 if mask_token_id is None else mask_token_id,
               eos_token_id=vocab_size - 2 if eos_token_id is None else eos_token_id)
    ids["pad_token_id"] = ids["eos_token_id"] if pad_token_id is None else pad_token_id
    mlp_hidden = mlp_hidden or 4 * d_model
    cfg_cls, model_cls = _FAMILIES[family]
    cfg = cfg_cls(**_random_fields(family, vocab_size, d_model, n_layers, n_heads, n_kv_heads, mlp_hidden,
                                   max_length, rope_theta, norm_eps), **ids, eot_token_id=eot_token_id)
    names = {f.name for f in fields(cfg_cls)}
    bad = sorted(set(extra) - names)
    if bad:
        raise ValueError(f"build_random_model: {family} config has no field(s) {bad}")
    cfg = replace(cfg, **extra)
    if family == "dream":
        cfg.bos_token_id = cfg.eos_token_id
    if family == "llada2":
        cfg._check("build_random_model")
    with torch.device("meta"):
        model = model_cls(cfg)
    model = model.to_empty(device="cpu")
    init_random_(model, seed)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval().requires_grad_(False)


def _random_fields(family: str, V: int, d: int, n_layers: int, n_heads: int, n_kv: int | None, mlp: int,
                   max_length: int, theta: float | None, eps: float | None) -> dict:
    """The family's config fields for build_random_model's sizes (its own field names)."""
    if family == "llada":
        return dict(d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv or n_heads,
                    mlp_hidden_size=mlp, vocab_size=V, embedding_size=V, max_sequence_length=max_length,
                    rope_theta=500000.0 if theta is None else theta, rms_norm_eps=1e-5 if eps is None else eps)
    common = dict(vocab_size=V, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv or max(1, n_heads // 2), max_position_embeddings=max_length,
                  rope_theta=1e6 if theta is None else theta, rms_norm_eps=1e-6 if eps is None else eps)
    if family == "dream":
        return dict(common, intermediate_size=mlp)
    if family == "llada2":
        # a small mixture of experts: 8 experts in 4 groups, 2 groups kept, 2 experts chosen per
        # token, one shared expert, the first layer dense (LLaDA2-mini: 256 / 8 / 4 / 8 / 1 / 1)
        return dict(common, head_dim=d // n_heads, intermediate_size=mlp, num_experts=8, n_group=4, topk_group=2,
                    num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=max(8, mlp // 4),
                    first_k_dense_replace=1, use_bias=False)
    return dict(common, intermediate_size=mlp, head_dim=d // n_heads)


def load_causal_lm(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   device: str | torch.device = "cpu", *, what: str | None = None):
    """An autoregressive model from a local Hugging Face directory (``AutoModelForCausalLM``,
    no remote code), in eval mode: APD's verifier, the AR rows of bench and the model cards.
    ``what``: where ``path`` came from (``"--ar-model"``), named with it in errors.

    :raises CheckpointError: naming the path when it is no such directory, has no config.json,
        names a model type transformers does not know without remote code (a diffusion
        checkpoint), or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    cfg_path = _config_file(path, what)
    raw = _read_json(cfg_path, "model config")
    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            hint = (f"; it is a {detect_family(raw)} checkpoint, which dllm-decode decodes as the diffusion "
                    "model (--model)")
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"{_named(path, what)}: not an autoregressive checkpoint: {cfg_path} has model_type "
                              f"{model_type!r}, which AutoModelForCausalLM does not load without the checkpoint's "
                              f"own code (never run here){hint}")
    dt, dev = resolve_dtype(dtype), check_device(device)
    try:
        # local_files_only: a path is never looked up on the Hub
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, dtype=dt,
                                                     local_files_only=True)
    except Exception as exc:  # OSError, ValueError, RuntimeError, safetensors' errors: one line naming the path
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{_named(path, what)}: transformers cannot load it as AutoModelForCausalLM "
                              f"({type(exc).__name__}: {first})") from None
    return model.to(dev).eval()
