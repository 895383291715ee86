"""Parameter, state and FLOP accounting of a model: the one function every table and report uses.

    acc = account(model, seq_len=256)          # a built LanguageModel
    acc = account_config(cfg)                  # a Config: built on the meta device, nothing allocated
    acc.as_dict()                              # the columns of runs.csv / `lsm info`

What is counted (per sequence, summed over blocks):

  params_total        every parameter (a tied head counts once).
  params_active       parameters a token uses: in a MoM layer the per-memory projections (keys, values,
                      gates and their convolutions; the output projection with `readout: per_memory`) count
                      (K + shared) / (M + shared) of their size.
  memory_floats       the matrix memories S alone: blocks x memories x H x K x V.
  state_floats        everything the decode cache holds (float32): the rule's decode state (ttt also
                      keeps the mini-batch's starting memory and its position) and the short-conv tails.
                      Attention blocks' KV cache grows with the context: `kv_floats_per_token`.
  state_rw_floats     floats of the cache one decoding step reads and writes: all of it for a single
                      memory; in a MoM layer the K routed and the shared memories' states, and every conv tail.
  flops_per_token     forward FLOPs per token in training (chunked form at `seq_len`): 2 x the active
                      matmul weights (the head included, the embedding lookup not), the rule's chunked
                      core and softmax attention; fwd + bwd is 3x this (`train_flops_per_token`).

The rule core per head and memory touched, chunk C (ttt: mini-batch b), key dim K, value dim V:
  diagonal decay (linear_attention, retnet, lightning, gla, hgrn2, mamba2):
      2C(K + V)  intra-chunk scores and their values,  + 4KV  readout from and update of S
  delta (deltanet, gated_deltanet): the above, + 2CK (k k^T), + 2C(K + V) (the WY factors), + 2KV (w S)
  ttt: 2b(K + V) within the mini-batch, + 6KV (prediction, gradient step, readout)
Softmax attention: 2 x 2 x D x seq_len / 2 (scores and values over the causal half).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

DELTA_RULES = frozenset({"deltanet", "gated_deltanet"})
STATE_FLOAT_BYTES = 4   # decode states (memories, conv tails) are kept in float32
TTT_RULES = frozenset({"ttt"})


@dataclass(frozen=True)
class Account:
    params_total: int
    params_active: int
    memory_floats: int
    state_floats: int
    state_rw_floats: int
    kv_floats_per_token: int
    flops_per_token: int

    @property
    def state_bytes(self) -> int:
        """Decode-cache bytes per sequence (states are float32)."""
        return STATE_FLOAT_BYTES * self.state_floats

    @property
    def train_flops_per_token(self) -> int:
        """Forward + backward FLOPs per training token (backward ~ 2x forward)."""
        return 3 * self.flops_per_token

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "state_bytes": self.state_bytes, "train_flops_per_token": self.train_flops_per_token}


def rule_core_flops(rule_name: str, key_dim: int, value_dim: int, chunk: int) -> int:
    """Forward FLOPs per token, head and memory of a rule's chunked form (see the module docstring)."""
    K, V, C = key_dim, value_dim, chunk
    if rule_name in TTT_RULES:
        return 2 * C * (K + V) + 6 * K * V
    flops = 2 * C * (K + V) + 4 * K * V
    if rule_name in DELTA_RULES:
        flops += 2 * C * K + 2 * C * (K + V) + 2 * K * V
    return flops


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _mixer_account(mixer: nn.Module, seq_len: int) -> dict[str, float]:
    """Counts of one token mixer (RuleLayer, MixtureOfMemories or Attention)."""
    from lsm.attention import Attention
    from lsm.mixture import MixtureOfMemories

    linears = [m for m in mixer.modules() if isinstance(m, nn.Linear)]
    if isinstance(mixer, Attention):
        D = mixer.hidden_size if hasattr(mixer, "hidden_size") else linears[0].in_features
        params = sum(p.numel() for p in mixer.parameters())
        return dict(params=params, active=params, memory=0, state=0, rw=0,
                    kv=2 * D, flops=2 * sum(m.weight.numel() for m in linears) + 2 * D * seq_len)
    H, K, V = mixer.num_heads, mixer.head_dim, mixer.value_dim
    rule = mixer.rule
    Ms, touched = 1, 1
    if isinstance(mixer, MixtureOfMemories):
        Ms, touched = mixer.num_states, mixer.topk + int(mixer.shared_memory)
    # the rule's decode state for Ms memories (on the meta device: shapes only)
    state = _numel(rule.init_state(Ms, H, K, V, device="meta"))
    memory = Ms * H * K * V
    router_conv = getattr(mixer, "router_conv", None)   # MoM routing from a conv window: its tail is cached too
    convs = [*getattr(mixer, "convs", {}).values(), *([router_conv] if router_conv is not None else [])]
    conv = sum(c.channels * (c.kernel_size - 1) for c in convs)
    # per-memory parameters: projections whose output holds Ms memories' channels, the gate module, their convs
    per_memory = set()
    if Ms > 1:
        for name in ("k_proj", "v_proj"):
            mod = getattr(mixer, name, None)
            if mod is not None:
                per_memory.update(id(p) for p in mod.parameters())
        per_memory.update(id(p) for p in mixer.gates.parameters())
        if getattr(mixer, "readout_mode", "sum") == "per_memory":   # a slice of the output projection per memory
            per_memory.update(id(p) for p in mixer.o_proj.parameters())
        for name in ("k", "v"):
            if name in mixer.convs:
                per_memory.update(id(p) for p in mixer.convs[name].parameters())
    params = active = 0.0
    for p in mixer.parameters():
        params += p.numel()
        active += p.numel() * (touched / Ms if id(p) in per_memory else 1.0)
    flops = 0.0
    for m in linears:
        frac = touched / Ms if id(m.weight) in per_memory else 1.0
        flops += 2 * m.weight.numel() * frac
    chunk = mixer.chunk_size
    if rule.name in TTT_RULES:
        chunk = int(mixer.rule_options.get("mini_batch_size", rule.options["mini_batch_size"]))  # the rule owns its default
    flops += touched * H * rule_core_flops(rule.name, K, V, chunk)
    state_total = state + conv
    rw = state * touched / Ms + conv
    return dict(params=params, active=active, memory=memory, state=state_total, rw=rw, kv=0, flops=flops)


def head_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token of the output head (in `flops_per_token`; a loss at a few positions runs it there only)."""
    return 2 * model.head.weight.numel()


def account(model: nn.Module, seq_len: int) -> Account:
    """Parameters, decode-state and FLOP counts of a built `LanguageModel` at context length `seq_len`."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"account: `seq_len` must be a positive int, got {seq_len!r}")
    total = sum(p.numel() for p in model.parameters())
    sums = dict(active=0.0, memory=0.0, state=0.0, rw=0.0, kv=0.0, flops=0.0)
    mixer_params = 0
    for block in model.blocks:
        c = _mixer_account(block.mixer, seq_len)
        mixer_params += c["params"]
        for key in sums:
            sums[key] += c[key]
        if block.mlp is not None:
            sums["flops"] += 2 * sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, nn.Linear))
    sums["flops"] += head_flops_per_token(model)
    active = total - mixer_params + sums["active"]
    return Account(params_total=int(total), params_active=int(round(active)), memory_floats=int(sums["memory"]),
                   state_floats=int(sums["state"]), state_rw_floats=int(round(sums["rw"])),
                   kv_floats_per_token=int(sums["kv"]), flops_per_token=int(round(sums["flops"])))


def config_seq_len(cfg) -> int:
    """The training context length a config declares (MQAR or text)."""
    if cfg.data.kind != "mqar":
        return cfg.data.text.seq_len
    q = cfg.data.mqar
    return max(L for L, _ in q.train_cells) if q.train_cells else q.seq_len


def account_config(cfg, seq_len: int | None = None) -> Account:
    """`account` of the model a full `Config` declares, built on the meta device (no memory, no data read)."""
    from lsm.config import model_vocab_size
    from lsm.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(replace(cfg.model, vocab_size=model_vocab_size(cfg)))
    return account(model, config_seq_len(cfg) if seq_len is None else seq_len)
