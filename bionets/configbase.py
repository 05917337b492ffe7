"""The base of every typed config section: unknown keys are errors, values are validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. ``extra='forbid'`` turns a misspelt key into an error naming it; no number
    may be infinite or NaN (``d_max=inf`` failed deep in the first step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)
