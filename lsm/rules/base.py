"""The update-rule interface every rule implements, with shared input validation.

A rule is a stateless object. Its three forms share one signature (DESIGN.md):

    recurrent(q, k, v, initial_state=None, output_final_state=False, scale=None, cu_seqlens=None, **gates)
    chunk(q, k, v, initial_state=None, output_final_state=False, scale=None, cu_seqlens=None,
          chunk_size=64, backend="auto", **gates)
    step(q, k, v, state, scale=None, **gates)

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`; gates `[B, T, H]` ("head" gates) or `[B, T, H, K]`
("key" gates); initial/final state `[N, H, K, V]` float32 (N = B, or the number of packed
sequences); o `[B, T, H, V]` in the dtype of v. `step` takes one token: q, k `[B, H, K]`,
v `[B, H, V]`, gates `[B, H]` / `[B, H, K]`, and a decode state (a tuple of tensors, see
`init_state`).

Value checks (monotonic `cu_seqlens`, non-positive log-decays) read tensor values, so they run
only for CPU tensors: on an accelerator they would force a host synchronisation in the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lsm.dtypes import at_least_float32
from lsm.rules import backends
from lsm.rules._chunking import ChunkLayout
from lsm.rules.backends import Backend
from lsm.rules.gates import NoGates

DecodeState = tuple[Tensor, ...]


@dataclass(frozen=True)
class GateSpec:
    """A per-token gate input of a rule.

    per: "head" -> `[B, T, H]`, "key" -> `[B, T, H, K]`.
    kind: "log_decay" (must be <= 0), "rate" (beta, eta: >= 0) or "free".
    required: whether the rule cannot run without it.
    """

    per: Literal["head", "key"]
    kind: Literal["log_decay", "rate", "free"]
    required: bool = True


def _check(cond: bool, exc: type[Exception], msg: str) -> None:
    if not cond:
        raise exc(msg)


class UpdateRule:
    """Base class. Subclasses set `name`, `gates`, and implement `_step` and `_chunk_torch`."""

    name: str = ""
    gates: dict[str, GateSpec] = {}
    #: extra keyword options (not per-token tensors) the rule accepts, with defaults
    options: dict[str, object] = {}
    #: True for rules whose keys must be L2-normalised by the layer (delta rules)
    normalize_keys: bool = False

    # ---------------------------------------------------------------- validation
    def _validate(self, q: Tensor, k: Tensor, v: Tensor, initial_state, cu_seqlens, gates: dict, single_step=False):
        for n, t in (("q", q), ("k", k), ("v", v)):
            _check(isinstance(t, Tensor), TypeError, f"{self.name}: `{n}` must be a torch.Tensor, got {type(t).__name__}")
            _check(t.is_floating_point(), TypeError, f"{self.name}: `{n}` must be a floating-point tensor, got {t.dtype}")
        nd = 3 if single_step else 4
        lay = "[B, H, K]" if single_step else "[B, T, H, K]"
        _check(q.dim() == nd, ValueError, f"{self.name}: `q` must be {lay}, got shape {tuple(q.shape)}")
        _check(k.shape == q.shape, ValueError,
               f"{self.name}: `k` must have the shape of `q` {tuple(q.shape)}, got {tuple(k.shape)}")
        _check(v.dim() == nd and v.shape[:-1] == q.shape[:-1], ValueError,
               f"{self.name}: `v` must be {lay[:-2]}V] matching q's leading dims {tuple(q.shape[:-1])}, got {tuple(v.shape)}")
        _check(q.dtype == k.dtype == v.dtype, TypeError,
               f"{self.name}: `q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        known = set(self.gates) | set(self.options)
        for g in gates:
            _check(g in known, TypeError,
                   f"{self.name}: unexpected argument `{g}`; this rule takes {sorted(known) or 'no gate inputs'}")
        for g, spec in self.gates.items():
            t = gates.get(g)
            if t is None:
                _check(not spec.required, ValueError, f"{self.name}: gate `{g}` is required ({self._gate_shape(g, single_step)})")
                continue
            _check(isinstance(t, Tensor) and t.is_floating_point(), TypeError,
                   f"{self.name}: gate `{g}` must be a floating-point tensor, got "
                   f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
            want = tuple(q.shape[:-1]) + ((q.shape[-1],) if spec.per == "key" else ())
            _check(tuple(t.shape) == want, ValueError,
                   f"{self.name}: gate `{g}` must be {self._gate_shape(g, single_step)} = {want}, got {tuple(t.shape)}")
            if t.device.type == "cpu" and spec.kind == "log_decay" and not bool(((t <= 0) & t.isfinite()).all()):
                raise ValueError(f"{self.name}: gate `{g}` holds log-decays and must be finite and <= 0 "
                                 f"(g = log(alpha), alpha in (0, 1]); got values in [{t.min().item():.4g}, {t.max().item():.4g}]")
            if t.device.type == "cpu" and spec.kind == "rate" and bool((t < 0).any()):
                raise ValueError(f"{self.name}: gate `{g}` must be >= 0, got a minimum of {t.min().item():.4g}")
        if single_step:
            return
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B
        if cu_seqlens is not None:
            _check(isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and not cu_seqlens.is_floating_point()
                   and cu_seqlens.dtype != torch.bool, TypeError,
                   f"{self.name}: `cu_seqlens` must be a 1-D int32/int64 tensor [N+1], got "
                   f"{cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__}"
                   f"{' of shape ' + str(tuple(cu_seqlens.shape)) if isinstance(cu_seqlens, Tensor) else ''}")
            _check(B == 1, ValueError,
                   f"{self.name}: with `cu_seqlens` the sequences are packed along T, so the batch size must be 1, got B={B}")
            _check(cu_seqlens.numel() >= 2, ValueError,
                   f"{self.name}: `cu_seqlens` needs at least 2 entries [0, ..., T], got {cu_seqlens.numel()}")
            N = cu_seqlens.numel() - 1
            if cu_seqlens.device.type == "cpu":
                c = cu_seqlens
                _check(int(c[0]) == 0, ValueError, f"{self.name}: `cu_seqlens` must start at 0, got {int(c[0])}")
                if not bool((c[1:] >= c[:-1]).all()):
                    raise ValueError(f"{self.name}: `cu_seqlens` must be non-decreasing (cumulative sequence lengths), "
                                     f"got {c.tolist()}")
                _check(int(c[-1]) == T, ValueError,
                       f"{self.name}: `cu_seqlens` must end at T={T} (the packed length), got {int(c[-1])}")
        if initial_state is not None:
            _check(isinstance(initial_state, Tensor) and initial_state.is_floating_point(), TypeError,
                   f"{self.name}: `initial_state` must be a floating-point tensor [N, H, K, V]")
            _check(tuple(initial_state.shape) == (N, H, K, V), ValueError,
                   f"{self.name}: `initial_state` must be [N, H, K, V] = {(N, H, K, V)} "
                   f"(N = {'number of sequences in cu_seqlens' if cu_seqlens is not None else 'batch size'}), "
                   f"got {tuple(initial_state.shape)}")

    def _gate_shape(self, g: str, single_step=False) -> str:
        lead = "[B, H" if single_step else "[B, T, H"
        return lead + (", K]" if self.gates[g].per == "key" else "]")

    # ---------------------------------------------------------------- options / defaults
    def _fill(self, q: Tensor, gates: dict) -> dict:
        """Fill defaults for optional gates/options. Subclasses override to derive e.g. a decay schedule."""
        out = {name: value for name, value in self.options.items()}
        out.update(gates)
        return out

    @staticmethod
    def _scale(scale, q: Tensor) -> float:
        return q.shape[-1] ** -0.5 if scale is None else scale

    @staticmethod
    def _compute_dtype(q: Tensor) -> torch.dtype:
        return at_least_float32(q.dtype)

    # ---------------------------------------------------------------- decoding
    def init_state(self, batch: int, num_heads: int, key_dim: int, value_dim: int,
                   device=None, dtype=torch.float32) -> DecodeState:
        """Empty decode state: a tuple of tensors, each with leading dims `[batch, num_heads]`."""
        return (torch.zeros(batch, num_heads, key_dim, value_dim, device=device, dtype=dtype),)

    def state_from_final(self, S: Tensor) -> DecodeState:
        """Decode state continuing from a final state `S [N, H, K, V]` returned by `chunk`/`recurrent`."""
        return (S,)

    def final_from_state(self, state: DecodeState) -> Tensor:
        """The `[N, H, K, V]` memory held in a decode state."""
        return state[0]

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: DecodeState, scale=None, backend: Backend = "auto",
             **gates) -> tuple[Tensor, DecodeState]:
        """One decoding step. q, k `[B, H, K]`, v `[B, H, V]`, gates `[B, H]`/`[B, H, K]` -> (o `[B, H, V]`, state)."""
        self._validate(q, k, v, None, None, gates, single_step=True)
        _check(isinstance(state, tuple), TypeError,
               f"{self.name}: `state` must be the tuple returned by init_state/state_from_final/step, got {type(state).__name__}")
        gates = self._fill(q, gates)
        backend = backends.resolve_step(self, backend, q, k, v, state, gates)
        step = self._step_triton if backend == "triton" else self._step
        o, state = step(q, k, v, state, self._scale(scale, q), **gates)
        return o.to(v.dtype), state  # like chunk/recurrent: the output in the inputs' dtype, the state in float32

    def _step(self, q, k, v, state: DecodeState, scale: float, **gates) -> tuple[Tensor, DecodeState]:
        raise NotImplementedError

    #: True for rules whose decode state is one `[.., K, V]` memory updated by `lsm_kernels.decode`
    #: (the diagonal-decay and delta families: their gates are the kernel's `g`, `g_gamma`, `beta`)
    has_triton_step: bool = False

    def _kernel_gates(self, gates: dict) -> dict:
        return {n: gates[n] for n in ("g", "g_gamma", "beta") if gates.get(n) is not None}

    def _step_triton(self, q, k, v, state, scale, **gates):
        if not self.has_triton_step:
            raise NotImplementedError(f"{self.name}: no Triton decode step; use backend='torch'")
        from lsm_kernels.decode import recurrent_step
        o, S = recurrent_step(q, k, v, state[0], scale, inplace=False, **self._kernel_gates(gates))
        return o, (S,)

    def kernel_step_args(self, q: Tensor, scale: float | None, gates: dict) -> tuple[float, dict]:
        """(scale, gates) as the fused decode kernels (`lsm_kernels.decode`) take them: the scale resolved,
        the gates filled with their defaults and reduced to the kernel's `g` / `g_gamma` / `beta`."""
        return self._scale(scale, q), self._kernel_gates(self._fill(q, gates))

    # ---------------------------------------------------------------- recurrent (the definition)
    def recurrent(self, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None = None,
                  output_final_state: bool = False, scale: float | None = None,
                  cu_seqlens: Tensor | None = None, **gates) -> tuple[Tensor, Tensor | None]:
        """Token-by-token reference: the definition of the rule (plain PyTorch, loops over tokens).

        `initial_state` may also be the rule's decode-state tuple (see `chunk`); the final state is then
        that tuple too."""
        as_tuple = isinstance(initial_state, tuple)
        self._validate(q, k, v, self._check_state(initial_state, q, v, cu_seqlens) if as_tuple else initial_state,
                       cu_seqlens, gates)
        gates = self._fill(q, gates)
        scale = self._scale(scale, q)
        if cu_seqlens is None:
            return self._recurrent_dense(q, k, v, initial_state, output_final_state, scale, gates)
        bounds = cu_seqlens.tolist()  # the reference may synchronise
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = lambda t: t[:, a:b] if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[1] == q.shape[1] else t
            h0 = None if initial_state is None else (tuple(s[n:n + 1] for s in initial_state) if as_tuple
                                                     else initial_state[n:n + 1])
            o, S = self._recurrent_dense(q[:, a:b], k[:, a:b], v[:, a:b], h0, True, scale,
                                         {g: sl(t) for g, t in gates.items()})
            outs.append(o)
            finals.append(S)
        if not output_final_state:
            return torch.cat(outs, 1), None
        final = tuple(torch.cat(f, 0) for f in zip(*finals)) if as_tuple else torch.cat(finals, 0)
        return torch.cat(outs, 1), final

    def _recurrent_dense(self, q, k, v, initial_state, output_final_state, scale, gates):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dt = self._compute_dtype(q)
        as_tuple = isinstance(initial_state, tuple)
        state = (tuple(s.to(dt) for s in initial_state) if as_tuple
                 else self.state_from_final(initial_state.to(dt)) if initial_state is not None
                 else self.init_state(B, H, K, V, device=q.device, dtype=dt))
        per_token = {g: t for g, t in gates.items() if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[:2] == (B, T)}
        fixed = {g: t for g, t in gates.items() if g not in per_token}
        outs = []
        for t in range(T):
            o, state = self._step(q[:, t], k[:, t], v[:, t], state, scale,
                                  **{g: x[:, t] for g, x in per_token.items()}, **fixed)
            outs.append(o)
        o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
        if as_tuple:
            return o.to(v.dtype), (state if output_final_state else None)
        S = self.final_from_state(state).float() if dt == torch.float32 else self.final_from_state(state)
        return o.to(v.dtype), (S if output_final_state else None)

    # ---------------------------------------------------------------- chunked
    def chunk(self, q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None = None,
              output_final_state: bool = False, scale: float | None = None, cu_seqlens: Tensor | None = None,
              chunk_size: int = 64, backend: Backend = "auto", max_seqlen: int | None = None,
              seqs_per_row: int | None = None, **gates) -> tuple[Tensor, Tensor | None]:
        """Chunked (parallel) form; equals `recurrent` for any T, chunk size, initial state and packing.

        `initial_state` is a state `[N, H, K, V]` or the rule's decode-state tuple (`init_state`, `step`,
        leading dims `[N, H]`); given a tuple, the final state is that tuple too, so a cache continues
        exactly wherever it was split (prefill + continuation + steps = one pass). A rule whose decode
        state is more than `S` (ttt mid-mini-batch) overrides `_chunk_from_state`.

        `max_seqlen` (packed batches only, optional): a static upper bound on the sequence lengths, as in
        FlashAttention. The torch backend then scans all sequences side by side (ceil(max_seqlen / C)
        steps) instead of one after another; results are the same.

        `seqs_per_row` (packed batches only, optional; the torch backend on CPU): scan every `seqs_per_row`
        consecutive sequences one after another in one row, the rows side by side, each row as long as the
        longest one (`ChunkLayout`). MoM groups each sequence's memory segments so: their lengths sum to
        (K + shared) * T, while one row per segment would pad every segment to T. Results are the same.
        """
        if isinstance(initial_state, tuple):
            self._check_state(initial_state, q, v, cu_seqlens)
            return self._chunk_from_state(q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size,
                                          backend, max_seqlen, seqs_per_row, **gates)
        self._validate(q, k, v, initial_state, cu_seqlens, gates)
        _check(isinstance(chunk_size, int) and chunk_size >= 1, ValueError,
               f"{self.name}: `chunk_size` must be a positive int, got {chunk_size!r}")
        if max_seqlen is not None:
            _check(isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) and max_seqlen >= 0, ValueError,
                   f"{self.name}: `max_seqlen` must be a non-negative int, got {max_seqlen!r}")
            if cu_seqlens is not None and cu_seqlens.device.type == "cpu" and cu_seqlens.numel() > 1:
                longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                _check(longest <= max_seqlen, ValueError,
                       f"{self.name}: `max_seqlen`={max_seqlen} is shorter than the longest sequence ({longest})")
        if seqs_per_row is not None:
            _check(isinstance(seqs_per_row, int) and not isinstance(seqs_per_row, bool) and seqs_per_row >= 1, ValueError,
                   f"{self.name}: `seqs_per_row` must be a positive int (or None), got {seqs_per_row!r}")
        gates = self._fill(q, gates)
        scale = self._scale(scale, q)
        backend = self.resolve_backend(backend, q, k, v, gates)
        if backend == "fla":
            return self._chunk_fla(q, k, v, initial_state, output_final_state, scale, cu_seqlens, **gates)
        if backend == "triton":
            return self._chunk_triton(q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, **gates)
        layout = ChunkLayout(q.shape[0], q.shape[1], chunk_size, cu_seqlens, q.device, max_seqlen, seqs_per_row)
        o, S = self._chunk_torch(q, k, v, initial_state, scale, layout, **gates)
        return o.to(v.dtype), (S if output_final_state else None)

    def _check_state(self, state: tuple, q: Tensor, v: Tensor, cu_seqlens) -> Tensor:
        """Check a decode-state tuple given as `initial_state` (leading dims `[N, H]`, floating point);
        returns its memory `[N, H, K, V]` for the usual checks."""
        N = q.shape[0] if cu_seqlens is None or not isinstance(cu_seqlens, Tensor) else cu_seqlens.numel() - 1
        for t in state:
            _check(isinstance(t, Tensor) and t.is_floating_point() and tuple(t.shape[:2]) == (N, q.shape[-2]),
                   ValueError, f"{self.name}: a decode-state `initial_state` must be the tuple of init_state/step/chunk "
                   f"with floating-point tensors of leading dims [N, H] = {(N, q.shape[-2])}, got "
                   f"{[tuple(getattr(s, 'shape', ())) for s in state]}")
        want = len(self.init_state(1, 1, 1, 1))
        _check(len(state) == want, ValueError,
               f"{self.name}: a decode-state `initial_state` holds {want} tensors, got {len(state)}")
        return self.final_from_state(state)

    def _chunk_from_state(self, q, k, v, state, output_final_state, scale, cu_seqlens, chunk_size, backend,
                          max_seqlen, seqs_per_row, **gates):
        """`chunk` from a decode-state tuple. Rules whose state is the memory alone unwrap and rewrap it."""
        o, S = self.chunk(q, k, v, initial_state=self.final_from_state(state), output_final_state=output_final_state,
                          scale=scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend,
                          max_seqlen=max_seqlen, seqs_per_row=seqs_per_row, **gates)
        return o, (self.state_from_final(S) if output_final_state else None)

    def resolve_backend(self, backend: str, q: Tensor, k: Tensor | None = None, v: Tensor | None = None,
                        gates: dict | None = None) -> str:
        """The concrete backend `chunk` runs for `backend` on q's device (lsm.rules.backends.resolve_chunk)."""
        return backends.resolve_chunk(self, backend, q, k, v, gates)

    def kernel_refusal(self, call: Literal["chunk", "step"], backend: str, q: Tensor, k: Tensor | None,
                       v: Tensor | None, gates: dict, state: DecodeState | None = None, auto: bool = False) -> str | None:
        """Why `backend`'s kernel cannot take this `call` (a message naming the option and the fix), or None.

        The hook of lsm.rules.backends: an explicit backend raises the message as a `ValueError`; `auto`
        (asked while resolving backend="auto") may also decline calls the kernel takes but runs slower
        than the torch form, and then runs the torch form. Reads shapes, dtypes and flags only."""
        return None

    has_fla: bool = False
    #: True for rules with a chunked Triton kernel (`_chunk_triton`)
    has_triton_chunk: bool = False

    def _chunk_torch(self, q, k, v, initial_state, scale, layout: ChunkLayout, **gates) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, **gates):
        raise NotImplementedError(f"{self.name}: backend='fla' is not available for this rule")

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, **gates):
        raise NotImplementedError(f"{self.name}: backend='triton' is not implemented for this rule yet; use 'torch' or 'fla'")

    # ---------------------------------------------------------------- parameterisation
    def gate_module(self, hidden_size: int, num_heads: int, head_dim: int) -> nn.Module:
        """Module mapping hidden states `x [B, T, D]` to this rule's gate dict (e.g. {"g": [B, T, H]})."""
        return NoGates()

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


_REGISTRY: dict[str, UpdateRule] = {}


def register(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator: instantiate and register a rule under `cls.name`."""
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> UpdateRule:
    """The rule registered as `name`; an unknown name raises a KeyError-compatible ValueError listing the valid ones."""
    if isinstance(name, UpdateRule):
        return name
    if name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownRuleError(f"unknown update rule {name!r}.{hint} Valid rules: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered rule names, sorted."""
    return sorted(_REGISTRY)


class UnknownRuleError(ValueError, KeyError):
    """Raised by `get` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])

