"""Denoiser models (the LLaDA and Dream families, and the block-diffusion SDAR, Fast-dLLM v2 and
LLaDA2 families), checkpoint loading, compute plans and the per-request cache store. See
docs/models.md."""
from .denoiser import Denoiser, ModelSpec
from .dream import DreamConfig, DreamModel
from .fast_dllm_v2 import FastDLLMv2Config, FastDLLMv2Model
from .llada import LLaDAConfig, LLaDAModel
from .llada2 import LLaDA2Config, LLaDA2Model
from .loader import (build_random_model, detect_family, encode_prompts, load_causal_lm, load_model,
                     load_tokenizer, save_pretrained)
from .output import ForwardOutput
from .plan import ComputePlan, Drift
from .sdar import SDARConfig, SDARModel
from .store import CacheStore

__all__ = [
    "Denoiser", "ModelSpec", "ComputePlan", "Drift", "CacheStore", "ForwardOutput", "load_causal_lm", "load_model", "build_random_model",
    "save_pretrained", "detect_family", "load_tokenizer", "encode_prompts",
    "LLaDAConfig", "LLaDAModel", "DreamConfig", "DreamModel", "SDARConfig", "SDARModel",
    "FastDLLMv2Config", "FastDLLMv2Model", "LLaDA2Config", "LLaDA2Model",
]
