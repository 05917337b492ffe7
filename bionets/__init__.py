"""bionets: biologically inspired neuron mechanisms for PyTorch.

Importing the package registers its models with timm (``timm.create_model("dit_resnet20")``).
"""
from bionets import models  # noqa: F401  (registers models with timm)
from bionets.conversion import ConversionReport, convert
from bionets.errors import BionetsError

__version__ = "0.1.0"
__all__ = ["BionetsError", "ConversionReport", "__version__", "convert"]

