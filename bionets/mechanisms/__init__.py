"""Mechanisms as model changes plus training hooks; see :mod:`bionets.mechanisms.registry`."""
from bionets.mechanisms.registry import (MECHANISMS, Applied, Report, apply_mechanisms, get_mechanism,
                                         parse_mechanisms, register_mechanism)

__all__ = ["MECHANISMS", "Applied", "Report", "apply_mechanisms", "get_mechanism", "parse_mechanisms",
           "register_mechanism"]
