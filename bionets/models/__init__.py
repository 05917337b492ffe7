"""bionets' model families, registered with timm's ``@register_model`` on import.

Every module of this package is imported here, so ``import bionets`` makes every model available
to ``timm.create_model`` and ``timm.list_models``.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
