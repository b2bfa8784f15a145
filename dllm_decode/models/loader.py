"""Loading and saving checkpoints in the real LLaDA / Dream on-disk formats.

`load_model(path)` reads `config.json`, picks the family, builds the model on the meta device
(no weights allocated) and assigns the safetensors tensors shard by shard, converted to the
requested dtype on the target device: the host never holds a second copy of the weights. No
checkpoint remote code is imported, so it works with any transformers version.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, CheckpointNotFoundError, DllmDecodeError
from .denoiser import Denoiser, init_random_
from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModel

__all__ = ["detect_family", "load_model", "save_pretrained", "build_random_model",
           "load_tokenizer", "encode_prompts", "resolve_dtype", "check_device", "load_causal_lm"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64,
           "float16": torch.float16, "fp16": torch.float16}
_FAMILIES = {"llada": (LLaDAConfig, LLaDAModel), "dream": (DreamConfig, DreamModel)}
_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
# turn-end tokens of the instruct tokenizers, looked up by name (ids differ per family)
_EOT_TOKENS = {"llada": "<|eot_id|>", "dream": "<|im_end|>"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float64, float16") from None


def detect_family(config: dict, source: str = "config.json") -> str:
    """'llada' or 'dream' from config.json's model_type / architectures; anything else is
    refused with the path and what it found."""
    mt = config.get("model_type")
    archs = config.get("architectures") or []
    mt_l = str(mt).lower() if mt is not None else None
    if "LLaDAModelLM" in archs or (mt_l == "llada" and not archs):
        return "llada"
    if "DreamModel" in archs or (mt_l == "dream" and not archs):
        return "dream"
    hint = ""
    if any(str(a).endswith("ForCausalLM") for a in archs):
        hint = " (an autoregressive model: bench takes it as --ar-model, apd as its verifier)"
    raise CheckpointError(
        f"{source}: unsupported model family model_type={mt!r}, architectures={archs!r}{hint}; "
        "dllm-decode loads LLaDA (model_type 'llada', LLaDAModelLM) and Dream "
        "(model_type 'Dream', DreamModel) checkpoints")


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


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", *, tokenizer: bool = True):
    """Load a LLaDA or Dream checkpoint directory -> (Denoiser, tokenizer or None).

    :raises CheckpointError: naming the file at fault (config.json, a safetensors shard, the
        tokenizer), or the device; :class:`CheckpointNotFoundError` without a config.json.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointNotFoundError(f"{path}: no config.json (is --model a checkpoint directory?)")
    raw = _read_json(cfg_path, "model config")
    family = detect_family(raw, str(cfg_path))
    cfg = _config_for(family, raw, str(cfg_path))
    dt, dev = resolve_dtype(dtype), check_device(device)
    tok = load_tokenizer(path, family) if tokenizer else None
    if tok is not None and cfg.eot_token_id is None:
        cfg.eot_token_id = _token_id(tok, _EOT_TOKENS[family])
    with torch.device("meta"):
        model = _FAMILIES[family][1](cfg)
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for shard in _shard_files(path):
        try:
            seen.update(_load_shard(model, shard, expected, family, dt, dev))
        except DllmDecodeError:
            raise
        except Exception as exc:  # safetensors' own errors name no file; this one does
            raise CheckpointError(f"{shard}: cannot read the weights ({type(exc).__name__}: {exc}); "
                                  "the file may be truncated or corrupt") from None
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    model.eval().requires_grad_(False)
    return model, tok


def _load_shard(model, shard: Path, expected: set[str], family: str, dt: torch.dtype,
                dev: torch.device) -> set[str]:
    """Assign one safetensors file's tensors to ``model``; -> the names it held."""
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
            part[name] = f.get_tensor(name).to(device=dev, dtype=dt)
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
    tokenizer files. Dream's Hub tokenizer names a remote-code class (DreamTokenizer); it is the
    Qwen2 BPE, so we fall back to Qwen2TokenizerFast on its vocab.json / merges.txt."""
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
                if family == "dream" and (path / "vocab.json").exists() and (path / "merges.txt").exists():
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
    cfg["torch_dtype"] = str(dt).removeprefix("torch.")
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
                       rope_theta: float | None = None, norm_eps: float | None = None) -> Denoiser:
    """A small model of the given family with deterministic random weights (tests, demos,
    shape checks). Special ids default to the top of the vocabulary: mask = V-1, eos = pad = V-2."""
    family = family.lower()
    mask_token_id = vocab_size - 1 if mask_token_id is None else mask_token_id
    eos_token_id = vocab_size - 2 if eos_token_id is None else eos_token_id
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
    mlp_hidden = mlp_hidden or 4 * d_model
    if family == "llada":
        cfg = LLaDAConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          n_kv_heads=n_kv_heads or n_heads, mlp_hidden_size=mlp_hidden,
                          vocab_size=vocab_size, embedding_size=vocab_size,
                          max_sequence_length=max_length,
                          rope_theta=500000.0 if rope_theta is None else rope_theta,
                          rms_norm_eps=1e-5 if norm_eps is None else norm_eps,
                          mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, eot_token_id=eot_token_id)
        model = LLaDAModel(cfg)
    elif family == "dream":
        cfg = DreamConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=mlp_hidden,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv_heads or max(1, n_heads // 2),
                          max_position_embeddings=max_length,
                          rope_theta=1e6 if rope_theta is None else rope_theta,
                          rms_norm_eps=1e-6 if norm_eps is None else norm_eps,
                          mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, bos_token_id=eos_token_id,
                          eot_token_id=eot_token_id)
        model = DreamModel(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; use 'llada' or 'dream'")
    init_random_(model, seed)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval().requires_grad_(False)


def load_causal_lm(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                   device: str | torch.device = "cpu"):
    """An autoregressive model from a local Hugging Face directory (``AutoModelForCausalLM``,
    no remote code), in eval mode: APD's verifier, the AR rows of bench and the model cards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, dtype=resolve_dtype(dtype))
    return model.to(device).eval()
