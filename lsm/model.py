"""The language model: embedding -> blocks (pre-norm mixer + pre-norm SwiGLU MLP) -> RMSNorm -> head.

The mixer of a block is one of
  - `RuleLayer`: a single memory updated by an update rule (lsm.rules),
  - `MixtureOfMemories`: a router over several memories of the rule plus a shared one,
  - `Attention`: causal softmax attention (hybrids put it every n-th block).
Every mixer has the same interface, `mixer(x, cache, cu_seqlens, use_cache) -> MixerOutput`, so a
block does not care which one it holds. Decoding passes one token and the per-block caches: the
linear mixers keep a fixed-size state, so memory per token is constant.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsm.attention import Attention
from lsm.config import Config, MixerConfig, ModelConfig, model_vocab_size
from lsm.layers import RuleLayer
from lsm.mixture import MixtureOfMemories
from lsm.modules import RMSNorm


def build_mixer(cfg: MixerConfig, hidden_size: int, norm_eps: float, attention: bool = False) -> nn.Module:
    """The token mixer a `MixerConfig` declares (`attention=True` forces softmax attention)."""
    if attention or cfg.type == "attention":
        return Attention(hidden_size, cfg.num_heads, cfg.rope_theta)
    kwargs = dict(head_dim=cfg.head_dim, value_dim=cfg.value_dim, conv_size=cfg.conv_size,
                  use_short_conv=cfg.use_short_conv, use_output_gate=cfg.use_output_gate, norm_eps=norm_eps,
                  chunk_size=cfg.chunk_size, backend=cfg.backend, rule_options=dict(cfg.rule_options))
    if cfg.type == "mom":
        return MixtureOfMemories(cfg.rule, hidden_size, cfg.num_heads, num_memories=cfg.num_memories, topk=cfg.topk,
                                 shared_memory=cfg.shared_memory, aux_loss_weight=cfg.aux_loss_weight,
                                 router_conv=cfg.router_conv, router_temperature=cfg.router_temperature,
                                 router_init_std=cfg.router_init_std, readout=cfg.readout, **kwargs)
    return RuleLayer(cfg.rule, hidden_size, cfg.num_heads, **kwargs)


def is_attention_block(cfg: ModelConfig, i: int) -> bool:
    """Whether block i is softmax attention (hybrids: every `attention_every`-th block, or listed)."""
    return (cfg.mixer.type == "attention" or i in cfg.attention_layers
            or (cfg.attention_every > 0 and (i + 1) % cfg.attention_every == 0))


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = -(-int(mlp_ratio * hidden_size * 2 / 3) // 8) * 8  # 2/3 keeps the parameter count of a 2-matrix MLP
        self.gate_up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) (no MLP when `mlp_ratio` is 0: mixer-only blocks, as in Zoology)."""

    def __init__(self, cfg: ModelConfig, attention: bool):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = build_mixer(cfg.mixer, cfg.hidden_size, cfg.norm_eps, attention)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.mlp_ratio > 0 else None
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_ratio) if cfg.mlp_ratio > 0 else None

    def forward(self, x: Tensor, cache: Any = None, cu_seqlens: Tensor | None = None, use_cache: bool = False):
        out = self.mixer(self.mixer_norm(x), cache=cache, cu_seqlens=cu_seqlens, use_cache=use_cache)
        x = x + out.output
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, out.cache, out.aux_loss


@dataclass
class ModelOutput:
    logits: Tensor              # [B, T, vocab]
    aux_loss: Tensor            # scalar: the summed (already weighted) MoM load-balancing losses, 0 without MoM
    caches: list | None = None  # one cache per block, to pass back for the next decoding step


class LanguageModel(nn.Module):
    """A causal language model over token ids; `cfg.vocab_size` must be set (see `build_model`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("LanguageModel: `cfg.vocab_size` is None; build from a full Config with `build_model`")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, is_attention_block(cfg, i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.init_std is not None:
            self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        # Only plain linear/embedding weights: rules' gate parameters (decay rates, biases) keep their own init;
        # a module that declares its own std (`_init_std`: the MoM router's `router_init_std`) keeps it.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=getattr(m, "_init_std", self.cfg.init_std))
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor | None = None, caches: list | None = None,
                use_cache: bool = False, positions: Tensor | None = None) -> ModelOutput:
        """input_ids `[B, T]` (packed: `[1, total]` with `cu_seqlens [N+1]`) -> ModelOutput.

        positions `[B, K]`: the output head runs at these positions only, logits `[B, K, vocab]` (a loss that reads
        a few positions, e.g. MQAR's queries: `lsm.data.labelled_positions`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"LanguageModel: `input_ids` must be [B, T], got shape {tuple(input_ids.shape)}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"LanguageModel: got {len(caches)} caches for {len(self.blocks)} blocks")
        x = self.embed(input_ids)                                            # [B, T, D]
        aux = x.new_zeros((), dtype=torch.float32)
        new_caches = [] if (use_cache or caches is not None) else None
        for i, block in enumerate(self.blocks):
            x, cache, aux_i = block(x, None if caches is None else caches[i], cu_seqlens, use_cache)
            if new_caches is not None:
                new_caches.append(cache)
            if aux_i is not None:
                aux = aux + aux_i.float()
        if positions is not None:
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        logits = self.head(self.norm(x))                                     # [B, T or K, vocab]
        return ModelOutput(logits, aux, new_caches)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None) -> Tensor:
        """Continue `input_ids [B, T]` by `max_new_tokens` sampled tokens -> `[B, T + max_new_tokens]`.

        The prompt runs once in parallel (prefill); each new token is one recurrent step on the
        caches. `temperature=0` is greedy decoding; `top_k` keeps the k likeliest tokens.
        `cuda_graph=True` (CUDA, models without attention blocks) captures the step once and
        replays it (`lsm.decoding.GraphedStep`): the same tokens, without per-kernel launch overhead.
        `None` (the default) does so wherever it applies (`decodes_in_a_graph`), and decodes eagerly if the step
        cannot be captured; `False` decodes eagerly.
        """
        by_default = cuda_graph is None
        if by_default:
            cuda_graph = self.decodes_in_a_graph(input_ids.device)
        out = self(input_ids, use_cache=True)
        tokens = [input_ids]
        step = None
        if cuda_graph and max_new_tokens > 1:
            from lsm.decoding import GraphedStep
            caches = out.caches
            try:   # the capture's warm-up runs on a copy of the caches: they are as the prefill left them if it fails
                step = GraphedStep(lambda ids, c: (self(ids, caches=c, use_cache=True).logits, c),
                                   input_ids[:, -1:], caches)
            except (RuntimeError, ValueError):
                if not by_default:
                    raise
        for i in range(max_new_tokens):
            logits = out.logits[:, -1].float()                               # [B, vocab]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
            tokens.append(nxt[:, None])
            if i + 1 < max_new_tokens:
                out = (ModelOutput(step(nxt[:, None]), None, caches) if step is not None
                       else self(nxt[:, None], caches=out.caches, use_cache=True))
        return torch.cat(tokens, 1)

    def decodes_in_a_graph(self, device: torch.device) -> bool:
        """Whether `generate` replays its decoding step as a CUDA graph by default: on a CUDA device, for models
        whose caches keep their shapes (no attention block, whose KV cache grows every step)."""
        return device.type == "cuda" and not any(isinstance(b.mixer, Attention) for b in self.blocks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: Config) -> LanguageModel:
    """The model of a full config, with the vocabulary taken from the data when `model.vocab_size` is unset."""
    return LanguageModel(replace(cfg.model, vocab_size=model_vocab_size(cfg)))
