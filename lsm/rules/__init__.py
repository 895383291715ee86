"""Update rules: `lsm.rules.get(name)` returns the rule object, `lsm.rules.names()` lists them."""
# Importing a rule module registers it.
from lsm.rules import deltanet, gated_deltanet, gla, hgrn2, lightning, linear_attention, mamba2, retnet, ttt  # noqa: F401
from lsm.rules.backends import BACKENDS
from lsm.rules.base import DecodeState, GateSpec, UnknownRuleError, UpdateRule, get, names, register

__all__ = ["BACKENDS", "DecodeState", "GateSpec", "UnknownRuleError", "UpdateRule", "get", "names", "register"]
