"""Update rules: `lsm.rules.get(name)` returns the rule object, `lsm.rules.names()` lists them."""
from lsm.rules.base import BACKENDS, DecodeState, GateSpec, UnknownRuleError, UpdateRule, get, names, register

# Importing a rule module registers it.
from lsm.rules import deltanet, gated_deltanet, gla, hgrn2, lightning, linear_attention, mamba2, retnet, ttt  # noqa: E402,F401

__all__ = ["BACKENDS", "DecodeState", "GateSpec", "UnknownRuleError", "UpdateRule", "get", "names", "register"]
