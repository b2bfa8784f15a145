"""The shipped reference models and held-out prompts the parity tests decode with."""

from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"


def shipped_model_and_prompts(family: str, tasks, seed: int = 0, dtype: str = "float64"):
    """``models/{family}-reference`` in ``dtype`` and the token ids of the first held-out problem
    (``seed``) of each task in ``tasks`` (names may repeat)."""
    from dllm_decode.models import load_model
    from dllm_decode.measure.tasks import get_task

    model, tok = load_model(MODELS / f"{family}-reference", dtype=dtype)
    prompts = [tok.encode(get_task(name).problems("test", 1, seed)[0].prompt, add_special_tokens=False)
               for name in tasks]
    return model, prompts
