"""Denoiser models (LLaDA family, Dream family), checkpoint loading, compute plans and the
per-request cache store. See docs/models.md."""
from .denoiser import Denoiser, ModelSpec
from .dream import DreamConfig, DreamModel
from .llada import LLaDAConfig, LLaDAModel
from .loader import (build_random_model, detect_family, encode_prompts, load_causal_lm, load_model,
                     load_tokenizer, save_pretrained)
from .output import ForwardOutput
from .plan import ComputePlan, Drift
from .store import CacheStore

__all__ = [
    "Denoiser", "ModelSpec", "ComputePlan", "Drift", "CacheStore", "ForwardOutput", "load_causal_lm", "load_model", "build_random_model",
    "save_pretrained", "detect_family", "load_tokenizer", "encode_prompts",
    "LLaDAConfig", "LLaDAModel", "DreamConfig", "DreamModel",
]
