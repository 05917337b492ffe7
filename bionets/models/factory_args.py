"""What timm's factory passes to every registered model function besides the model's own options."""
from __future__ import annotations

# timm.create_model adds these to the options of every model function it calls
FACTORY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def model_options(kwargs: dict) -> dict:
    """``kwargs`` without timm's factory arguments, for a model class that is not built through
    ``build_model_with_cfg`` (which takes them itself): what is left must be the class's own
    options, so that a misspelt one is refused (a TypeError that names it), not ignored."""
    return {k: v for k, v in kwargs.items() if k not in FACTORY_ARGS}
