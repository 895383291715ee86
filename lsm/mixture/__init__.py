"""Mixture-of-Memories: any update rule behind a router, K routed memories per token and a shared one."""
from lsm.mixture.mom import MixtureOfMemories, MoMCache
from lsm.mixture.routing import Router, Routing, dispatch, load_balancing_loss
from lsm.mixture.slots import mix_slots, routed_step, with_shared_slot

__all__ = ["MixtureOfMemories", "MoMCache", "Router", "Routing", "dispatch", "load_balancing_loss", "mix_slots",
           "routed_step", "with_shared_slot"]
