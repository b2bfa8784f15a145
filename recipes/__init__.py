"""Shipped recipes, found by name. This folder installs as ``dllm_decode.recipes`` (data + this finder)."""

from __future__ import annotations

from pathlib import Path

from dllm_decode.errors import RecipeError

SHIPPED = Path(__file__).resolve().parent


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped with the package."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))} if SHIPPED.is_dir() else {}


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or the name of a shipped recipe (``llada`` -> ``recipes/llada.yaml``)."""
    path = Path(name_or_path)
    shipped = shipped_recipes()
    if name_or_path in shipped and not path.is_file():     # a folder of that name (a checkpoint
        return shipped[name_or_path]                        # called `sdar`) does not hide it
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path                     # load_recipe reports a missing or unreadable file with its path
    raise RecipeError(f"{name_or_path}: no such recipe file, and no shipped recipe of that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")


#: the shipped recipe a checkpoint of each block-causal family decodes with by default (its
#: official loop's settings); every other family: ``llada``
FAMILY_RECIPES = {"sdar": "sdar", "llada2": "llada2", "fast_dllm_v2": "fast-dllm-v2"}


def default_recipe(model_dir: str | Path | None) -> str:
    """The shipped recipe for the checkpoint in ``model_dir`` (read from its config.json): its
    family's (``FAMILY_RECIPES``), else ``llada``. Unreadable configs give ``llada``; loading
    the model reports them."""
    import json

    from dllm_decode.models.loader import detect_family

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return FAMILY_RECIPES.get(detect_family(config), "llada")
    except (OSError, ValueError, TypeError, AttributeError):   # CheckpointError is a ValueError
        return "llada"


def fit_blocks(model_dir: str | Path | None, name: str) -> list[str]:
    """The override that fits the shipped recipe ``name`` to the checkpoint in ``model_dir``: its
    ``generation.block_length`` cut to the model's block size when longer (Fast-dLLM v2's
    sub-blocks of 8 on a checkpoint trained in blocks of 4, where the official loop would find no
    whole sub-block to decode); [] when it fits, or for a model without blocks."""
    import json

    from dllm_decode.config import load_recipe
    from dllm_decode.models.loader import BLOCK_FIELDS, detect_family

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        size = config.get(BLOCK_FIELDS.get(detect_family(config), ""))
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    length = load_recipe(find_recipe(name)).generation.block_length
    fits = not isinstance(size, int) or size < 1 or length is None or length <= size
    return [] if fits else [f"generation.block_length={size}"]
