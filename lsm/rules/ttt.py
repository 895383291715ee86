"""ttt: TTT-Linear, test-time training of a linear inner model by mini-batch gradient descent (Sun et al., 2024).

The memory `S [K, V]` is the weight of an inner model trained online, one gradient step per
token, on a self-supervised loss. Per head, with learning rate `eta_t >= 0` (gate `[B, T, H]`):

Plain form (default)
    f(x; S) = S^T x,                        loss  l(S; k, v) = 1/2 ||S^T k - v||^2
    grad_S l(S; k, v) = k (S^T k - v)^T,    readout  o_t = scale * S_t^T q_t

LayerNorm form (when `ln_weight` and/or `ln_bias` `[H, V]` are given; needs K == V)
    f(x; S) = x + LN_{w,b}(S^T x),          loss  l(S; k, v) = 1/2 ||f(k; S) - v||^2
    readout  o_t = q_t + LN_{w,b}(scale * S_t^T q_t)
    LN normalises over V with the biased variance and `ln_eps` inside the square root (default
    1e-6), then applies the per-head affine `w [V]`, `b [V]` (a missing one defaults to ones /
    zeros). `scale` multiplies the readout before the LayerNorm, as in the plain form; LN is
    invariant to it up to `ln_eps`, so `o_t` is in effect `f(q_t; S_t)` (exactly so with scale=1).

Mini-batch gradient descent with mini-batch size `b` (option `mini_batch_size`, default 16):
tokens are grouped into mini-batches of b consecutive tokens, aligned to each sequence's start
(a sequence boundary, or an initial state `[N, H, K, V]`, starts a fresh mini-batch; the last mini-batch
of a sequence may be shorter). Given the decode-state tuple (S0, S, n) below as `initial_state`, `chunk`
and `recurrent` continue the current mini-batch instead (its first b - n tokens take their gradients
at S0, descending from S; each sequence at its own n) and return the tuple as the final state, so a
cache split anywhere continues exactly. Inside a mini-batch entered with state S0 every gradient is taken at S0:
    S_t = S0 - sum_{i <= t, i in mini-batch} eta_i grad_S l(S0; k_i, v_i)
and the next mini-batch starts from the state at the end of this one. With b = 1 and the plain
form this is exactly deltanet with beta = eta: S_t = (I - eta_t k_t k_t^T) S_{t-1} + eta_t k_t v_t^T.

Like the delta rules, ttt expects L2-normalised keys (`normalize_keys = True`: the layer
normalises them). Then the plain mini-batch step `S0 - K^T diag(eta) (K S0 - V)` is
non-expansive while `sum_i eta_i <= 2` over a mini-batch, which the default gate
(`eta <= 1 / head_dim`, see `TTTGate`) guarantees for b <= 2 * head_dim.

Decode state: `(S0 [B, H, K, V], S [B, H, K, V], n [B, H])`: the state at the current
mini-batch's start, the current state, and the number of tokens already in the current
mini-batch (held in the state's float dtype; always < b, the same for every head). `state_from_final(S)`
starts a fresh mini-batch from S, `final_from_state` returns the current S.

Backends: "torch" (the dual form below, any device), "triton" (`lsm_kernels.ttt.chunk_ttt_linear`, both forms,
K <= 256, mini_batch_size <= 64, float32/bf16/fp16 inputs; anything else is a ValueError naming the fix) and, for
`step`, the fused `lsm_kernels.ttt.ttt_step` (forward only). "auto" picks triton on CUDA tensors where the kernel
takes the call (the LN form only up to V = 128; the step only for float32 states with no gradient needed), else torch.

flash-linear-attention (0.6, `fla.ops.ttt.chunk_ttt_linear` / `naive.ttt_linear`) implements a
different function, so `has_fla = False` and backend="fla" is refused:
  1. its inner model has a bias: state `(W, b1)`, prediction `LN(W^T k + b1)`, and b1 is trained
     too (its own `initial_state_bias` / `final_state_bias`); ours has no inner bias;
  2. learning rates: within a mini-batch its output at position t uses `eta_t` (the *query's*
     rate) for every earlier token, `o_t = ... - eta_t sum_{i<=t} (q_t . k_i) g_i`, and its state
     update uses the *last* token's rate for the whole mini-batch, `W -= eta_last K^T G`; ours
     weights each token's gradient by its own `eta_i`. (TTT's reference code uses a matrix
     `eta[t, i] = ttt_lr(x_i) / (t + 1)`; neither fla nor we carry the 1/(t+1) token factor.)
  3. output: fla returns `Z + LN(Z)` with `Z = scale * W_t^T q_t + b1_t` (residual on the inner
     model's output); ours returns `q_t + LN(scale * S_t^T q_t)` (residual on the input, as
     TTT-Linear's f(x) = x + LN(f_res(x)));
  4. it supports only the LN form with K == V (no plain form).
They agree on the per-token gradient: its LN backward `v_new`, with target `v - k` and loss
1/2 ||.||^2, equals our `dl/dz`; with a zero initial bias and eta constant inside one mini-batch
its first mini-batch's W equals our S (tests/test_rules_ttt.py checks this on CPU).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lsm.dtypes import at_least_float32
from lsm.rules import backends
from lsm.rules._chunking import ChunkLayout, token_sequences
from lsm.rules.base import GateSpec, UpdateRule, _check, register
from lsm.rules.gates import TTTGate


def _layer_norm(z: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """LN over the last dim with per-head affine: z `[..., H, V]`, w, b `[H, V]`."""
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).pow(2).mean(-1, keepdim=True)
    return (z - mu) * torch.rsqrt(var + eps) * w + b


def _ln_loss_grad_z(z: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """Analytic dl/dz of l = 1/2 ||k + LN(z) - v||^2 (z = S0^T k). All `[..., H, V]`, w, b `[H, V]`.

    zhat = (z - mean) * r, r = (var + eps)^-1/2;  gh = w * (w * zhat + b + k - v)
    dl/dz = r * (gh - mean(gh) - zhat * mean(gh * zhat))
    """
    mu = z.mean(-1, keepdim=True)
    r = torch.rsqrt((z - mu).pow(2).mean(-1, keepdim=True) + eps)
    zhat = (z - mu) * r
    gh = w * (w * zhat + b + k - v)
    return r * (gh - gh.mean(-1, keepdim=True) - zhat * (gh * zhat).mean(-1, keepdim=True))


def _autograd_loss_grad(S0: Tensor, k: Tensor, v: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """grad_S l(S; k, v) at S = S0 by torch.autograd (the definition), differentiable (create_graph).

    S0 `[B, H, K, V]`, k `[B, H, K]`, v `[B, H, V]`. The loss is summed over B and H, which are
    independent, so the gradient of the sum is the stack of per-(B, H) gradients.
    """
    if torch.is_inference_mode_enabled():  # autograd cannot record inference tensors: compute on normal copies
        with torch.inference_mode(False):
            cl = lambda t: None if t is None else t.clone()
            return _autograd_loss_grad(cl(S0), cl(k), cl(v), cl(w), cl(b), eps).detach()
    with torch.enable_grad():
        W = S0 if S0.requires_grad else S0.detach().requires_grad_(True)
        pred = torch.einsum("bhk,bhkv->bhv", k, W)                                   # S^T k  [B, H, V]
        if w is not None:
            pred = k + _layer_norm(pred, w, b, eps)                                   # f(k; S)
        loss = 0.5 * (pred - v).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, W, create_graph=True)                     # [B, H, K, V]
    return grad


def _mini_batch(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, S0: Tensor, S: Tensor, scale: float,
                w: Tensor | None, b: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """One mini-batch of the dual form: q, k `[N, b, H, K]`, v `[N, b, H, V]`, eta `[N, b, H]`, entered with
    the mini-batch's starting state S0 and the current state S `[N, H, K, V]` (S0 = S unless a partial
    mini-batch is continued). Returns (o `[N, b, H, V]`, the state after the mini-batch).
      1. gradients at S0, all tokens at once: Z = K S0, E = Z - V (plain) or dl/dz through the LayerNorm;
         grad_i = k_i e_i^T
      2. causal readout: R_t = S^T q_t - sum_{i<=t} (q_t . k_i) eta_i e_i, o = scale R (LN: q + LN(scale R))
      3. state: S - K^T diag(eta) E
    Slots with eta 0 (padding) change neither the state nor another slot's output."""
    n = q.shape[1]
    Z = torch.einsum("bihk,bhkv->bihv", k, S0)                                         # [N, b, H, V]
    E = _ln_loss_grad_z(Z, k, v, w, b, eps) if w is not None else Z - v
    A = torch.einsum("bthk,bihk->bhti", q, k) * eta.transpose(1, 2)[:, :, None, :]     # [N, H, t, i]
    A = A.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), 0)
    R = torch.einsum("bthk,bhkv->bthv", q, S) - torch.einsum("bhti,bihv->bthv", A, E)
    o = scale * R
    if w is not None:
        o = q + _layer_norm(o, w, b, eps)
    return o, S - torch.einsum("bihk,bihv->bhkv", k * eta[..., None], E)


@register
class TTT(UpdateRule):
    name = "ttt"
    gates = {"eta": GateSpec(per="head", kind="rate")}
    options = {"mini_batch_size": 16, "ln_weight": None, "ln_bias": None, "ln_eps": 1e-6}
    normalize_keys = True
    has_fla = False
    has_triton_chunk = True

    # ---------------------------------------------------------------- options
    def _validate(self, q, k, v, initial_state, cu_seqlens, gates, single_step=False):
        super()._validate(q, k, v, initial_state, cu_seqlens, gates, single_step)
        b = gates.get("mini_batch_size", self.options["mini_batch_size"])
        _check(isinstance(b, int) and not isinstance(b, bool) and b >= 1, ValueError,
               f"{self.name}: `mini_batch_size` must be a positive int, got {b!r}")
        eps = gates.get("ln_eps", self.options["ln_eps"])
        _check(isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0, ValueError,
               f"{self.name}: `ln_eps` must be a positive float, got {eps!r}")
        H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
        for n in ("ln_weight", "ln_bias"):
            t = gates.get(n)
            if t is None:
                continue
            _check(isinstance(t, Tensor) and t.is_floating_point(), TypeError,
                   f"{self.name}: `{n}` must be a floating-point tensor [H, V]")
            _check(tuple(t.shape) == (H, V), ValueError, f"{self.name}: `{n}` must be [H, V] = {(H, V)}, got {tuple(t.shape)}")
            _check(K == V, ValueError,
                   f"{self.name}: the LayerNorm form f(x) = x + LN(S^T x) needs K == V, got K={K}, V={V}")

    def _fill(self, q, gates):
        out = super()._fill(q, gates)
        w, b = out["ln_weight"], out["ln_bias"]
        if w is not None and b is None:
            out["ln_bias"] = torch.zeros_like(w)
        if b is not None and w is None:
            out["ln_weight"] = torch.ones_like(b)
        return out

    # ---------------------------------------------------------------- decode state
    def init_state(self, batch, num_heads, key_dim, value_dim, device=None, dtype=torch.float32):
        S = torch.zeros(batch, num_heads, key_dim, value_dim, device=device, dtype=dtype)
        return (S, S, torch.zeros(batch, num_heads, device=device, dtype=dtype))

    def state_from_final(self, S):
        return (S, S, S.new_zeros(S.shape[:2]))

    def final_from_state(self, state):
        return state[1]

    # ---------------------------------------------------------------- the definition
    def _step(self, q, k, v, state, scale, eta, mini_batch_size, ln_weight, ln_bias, ln_eps):
        """One token of mini-batch gradient descent, by autograd. q, k `[B, H, K]`, v `[B, H, V]`, eta `[B, H]`."""
        S0, S, n = state
        dt = S.dtype
        q, k, v, eta = q.to(dt), k.to(dt), v.to(dt), eta.to(dt)
        ln = ln_weight is not None
        w, b = (ln_weight.to(dt), ln_bias.to(dt)) if ln else (None, None)
        # 1. gradient of this token's loss at the mini-batch's starting state S0
        grad = _autograd_loss_grad(S0, k, v, w, b, ln_eps)                           # [B, H, K, V]
        # 2. descend from the current state
        S = S - eta[..., None, None] * grad
        # 3. read out
        o = scale * torch.einsum("bhk,bhkv->bhv", q, S)                               # [B, H, V]
        if ln:
            o = q + _layer_norm(o, w, b, ln_eps)
        # 4. mini-batch boundary: after b tokens the next mini-batch starts from S
        n = n + 1
        full = n >= mini_batch_size                                                   # [B, H]
        S0 = torch.where(full[..., None, None], S, S0)
        n = torch.where(full, torch.zeros_like(n), n)
        return o, (S0, S, n)

    # ---------------------------------------------------------------- decoding on the GPU (lsm_kernels.ttt.ttt_step)
    has_triton_step = True

    def _step_triton(self, q, k, v, state, scale, eta, mini_batch_size, ln_weight, ln_bias, ln_eps):
        """One token by the fused kernel (forward only): the same (o, (S0, S, n)) as `_step`, in new tensors."""
        _check(len(state) == 3, ValueError,
               f"{self.name}: `state` must be the (S0, S, n) tuple of init_state/state_from_final/step, "
               f"got {len(state)} tensors")
        from lsm_kernels.ttt import ttt_step
        return ttt_step(q, k, v, eta, state, scale, mini_batch_size, ln_weight, ln_bias, ln_eps)

    # ---------------------------------------------------------------- chunked (mini-batch dual form)
    def chunk(self, q, k, v, initial_state=None, output_final_state=False, scale=None, cu_seqlens=None,
              chunk_size=64, backend="auto", max_seqlen=None, seqs_per_row=None, **gates):
        """As `UpdateRule.chunk`; `chunk_size` is rounded down to a multiple of `mini_batch_size`
        (at least one mini-batch), so that every chunk holds whole mini-batches."""
        b = gates.get("mini_batch_size", self.options["mini_batch_size"])
        if isinstance(b, int) and not isinstance(b, bool) and b >= 1 and isinstance(chunk_size, int) and chunk_size >= 1:
            chunk_size = b * max(1, chunk_size // b)
        return super().chunk(q, k, v, initial_state=initial_state, output_final_state=output_final_state, scale=scale,
                             cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, max_seqlen=max_seqlen,
                             seqs_per_row=seqs_per_row, **gates)

    def _chunk_from_state(self, q, k, v, state, output_final_state, scale, cu_seqlens, chunk_size, backend,
                          max_seqlen, seqs_per_row, **gates):
        """`chunk` continuing the decode state (S0, S, n), maybe mid-mini-batch, on any backend.

        Every sequence (row, or packed sequence) splits into a head, a body and, when the final state is
        asked for, a foot: the head is the first h = min(len, b - n) tokens, which finish the current
        mini-batch (gradients at S0, descending from S); the body is whole mini-batches from the head's
        end, run by the backend's chunked form as one packed batch (the other tokens' eta set to 0, so
        that they change nothing; a sequence boundary after each head); the foot is the last
        (len - h) % b tokens, a partial mini-batch whose start state is the final S0. Head and foot are one
        mini-batch each (`_mini_batch`, torch). Positions in the mini-batch stay on the device (n may
        differ per sequence, e.g. per MoM memory segment): no host synchronisation."""
        self._validate(q, k, v, self.final_from_state(state), cu_seqlens, gates)
        g = self._fill(q, gates)
        b, eta = g["mini_batch_size"], g["eta"]
        ln_weight, ln_bias, ln_eps = g["ln_weight"], g["ln_bias"], g["ln_eps"]
        S0, S, n = state
        B, T, H, K = q.shape
        V, TT, dev = v.shape[-1], q.shape[0] * q.shape[1], q.device
        if TT == 0:
            return v.new_zeros(B, T, H, V), (state if output_final_state else None)
        dt = torch.promote_types(at_least_float32(q.dtype), S.dtype)
        if n.device.type == "cpu":
            _check(bool(((n >= 0) & (n < b) & (n == n.round()) & (n == n[:, :1])).all()), ValueError,
                   f"{self.name}: the decode state's position `n` must be an integer in [0, {b}) that is the same for "
                   f"every head (as init_state/step/chunk make it)")
        cu = (torch.arange(B + 1, device=dev) * T if cu_seqlens is None else cu_seqlens.to(dev)).long()
        lens, pos0 = cu[1:] - cu[:-1], n[:, 0].round().long()                          # [N]
        head = torch.minimum(lens, b - pos0)                                            # tokens finishing this mini-batch
        foot = (lens - head) % b if output_final_state else torch.zeros_like(lens)      # tokens of the last partial one
        seq, pos = token_sequences(cu, TT)                                              # [TT] sequence of each token
        in_head, in_foot = pos < head[seq], pos >= (lens - foot)[seq]
        w, bias = (ln_weight.to(dt), ln_bias.to(dt)) if ln_weight is not None else (None, None)
        flat = lambda t: t.reshape(TT, *t.shape[2:])
        qf, kf, vf, ef = flat(q), flat(k), flat(v), flat(eta)
        slot = torch.arange(b, device=dev)

        def one(first: Tensor, count: Tensor, S0_: Tensor, S_: Tensor) -> tuple[Tensor, Tensor]:
            """The `count [N]` tokens from `first [N]` of every sequence as one mini-batch (padded to b slots)."""
            idx = (first[:, None] + slot).clamp(max=max(TT - 1, 0))                    # [N, b]
            live = (slot < count[:, None]).to(dt)
            take = lambda t: t[idx].to(dt)
            return _mini_batch(take(qf), take(kf), take(vf), take(ef) * live[..., None], S0_.to(dt), S_.to(dt),
                               self._scale(scale, q), w, bias, ln_eps)

        o_head, S_head = one(cu[:-1], head, S0, S)
        body_mask = ~(in_head | in_foot)
        done = (pos0 + lens >= b)[:, None, None, None]                                  # the head finished its mini-batch
        # body: one packed batch, a boundary after every head (and a leading sequence for the first one)
        cu_body = torch.cat([cu[:1], cu[:-1] + head, cu[-1:]])
        h0 = torch.cat([S_head.new_zeros(1, H, K, V), S_head])
        gates_body = {**gates, "eta": (ef * body_mask[:, None].to(ef.dtype))[None]}
        o, S_body = self.chunk(qf[None], kf[None], vf[None], initial_state=h0, output_final_state=output_final_state,
                               scale=scale, cu_seqlens=cu_body, chunk_size=chunk_size, backend=backend,
                               max_seqlen=None if max_seqlen is None else max_seqlen + b,
                               seqs_per_row=seqs_per_row, **gates_body)
        o = torch.where(in_head[:, None, None], o_head.flatten(0, 1)[seq * b + pos.clamp(max=b - 1)].to(o.dtype), o[0])
        final = None
        if output_final_state:
            S_body = S_body[1:].to(dt)
            o_foot, S_end = one(cu[1:] - foot, foot, S_body, S_body)
            at = (pos - (lens - foot)[seq]).clamp(0, b - 1)
            o = torch.where(in_foot[:, None, None], o_foot.flatten(0, 1)[seq * b + at].to(o.dtype), o)
            n_end = ((pos0 + lens) % b).to(n.dtype)[:, None].repeat(1, H)
            final = (torch.where(done, S_body, S0.to(dt)), S_end, n_end)
        return o.view(B, T, H, V).to(v.dtype), final

    def _chunk_torch(self, q, k, v, initial_state, scale, layout: ChunkLayout, eta, mini_batch_size,
                     ln_weight, ln_bias, ln_eps):
        """Mini-batch dual form. Returns (o `[B, T, H, V]` in the compute dtype, final states `[N, H, K, V]`).

        The layout's chunks hold M = C / b whole mini-batches and start at sequence starts, so
        mini-batches are aligned to sequence starts. Per mini-batch (Q, K `[b, K]`, V `[b, V]`,
        eta `[b]`, per head) entered with state S0:
          1. gradients at S0, all tokens at once:  Z = K S0,  E = Z - V (plain) or
             E = dl/dz through the LayerNorm (LN form); grad_i = k_i e_i^T
          2. causal dual readout:  A = tril(Q K^T) diag(eta),  R = Q S0 - A E,
             o = scale * R (plain) or q + LN(scale * R) (LN form)
          3. state:  S = S0 - K^T diag(eta) E
        Padding slots (eta 0, k = v = 0) give grad 0 and A-column 0: they change nothing (`_mini_batch`).
        """
        H, K = q.shape[-2:]
        V = v.shape[-1]
        dt = at_least_float32(q.dtype)
        b, C = mini_batch_size, layout.C
        M = C // b
        ln = ln_weight is not None
        w, bias = (ln_weight.to(dt), ln_bias.to(dt)) if ln else (None, None)          # [H, V]
        # 0. chunk-aligned layout
        qc, kc, vc = (layout.to_chunks(x.to(dt)) for x in (q, k, v))                   # [Nb, NC, C, H, K|V]
        ec = layout.to_chunks(eta.to(dt))                                              # [Nb, NC, C, H]
        h0s = layout.initial_states(initial_state, (H, K, V), dt, q.device)            # [N, H, K, V]
        S = q.new_zeros(layout.Nb, H, K, V, dtype=dt)
        outs, states = [], []
        for c in range(layout.NC):
            S = layout.reset(S, h0s, c)                                                # fresh mini-batch at a sequence start
            col = []
            for m in range(M):
                sl = slice(m * b, (m + 1) * b)
                o, S = _mini_batch(qc[:, c, sl], kc[:, c, sl], vc[:, c, sl], ec[:, c, sl], S, S, scale, w, bias, ln_eps)
                col.append(o)
            outs.append(torch.cat(col, 1))                                             # [Nb, C, H, V]
            states.append(S)
        o = layout.from_chunks(torch.stack(outs, 1))                                   # [B, T, H, V]
        return o, layout.final_states(torch.stack(states, 1))

    # ---------------------------------------------------------------- Triton (lsm_kernels.ttt)
    #: the largest mini-batch the chunk kernel holds in one tile (its [b, b] and [b, K] blocks live in registers)
    triton_max_mini_batch = 64
    #: the largest key head dim the chunk kernel holds (the state tile spans all of K)
    triton_max_key_dim = 256

    def kernel_refusal(self, call, backend, q, k, v, gates, state=None, auto=False):
        """The Triton kernels' limits (lsm.rules.backends asks): the chunk kernel holds K <= 256, a mini-batch
        <= 64 and float32/bfloat16/float16 inputs, and `auto` keeps the LN form above V = 128 on the torch
        form; `auto` runs the fused decode step (forward only) when nothing needs gradients through it and
        the state is float32. fla has no kernel for this function (see the module docstring)."""
        if call == "step":
            if not auto:
                return None
            if backends.requires_grad(q, k, v, *(state if isinstance(state, tuple) else ()), *gates.values()):
                return f"{self.name}: the fused decode step is forward only; use backend='torch' to differentiate"
            if not (isinstance(state, tuple) and all(isinstance(t, Tensor) and t.dtype == torch.float32 for t in state)):
                return f"{self.name}: the fused decode step takes a float32 state; use backend='torch'"
            return None
        fix = "use backend='torch'"
        K = q.shape[-1]
        if K > self.triton_max_key_dim:
            return (f"{self.name}: backend='triton' needs the key head dim K <= {self.triton_max_key_dim} "
                    f"(the kernel holds a [K, BV] state tile), got K={K}: {fix} or use smaller heads")
        b = gates.get("mini_batch_size", self.options["mini_batch_size"])
        if isinstance(b, int) and not isinstance(b, bool) and b > self.triton_max_mini_batch:
            return (f"{self.name}: backend='triton' needs `mini_batch_size` <= {self.triton_max_mini_batch} "
                    f"(a mini-batch is one tile of the kernel), got {b}: {fix} or a smaller `mini_batch_size`")
        kernel_dtypes = (torch.float32, torch.bfloat16, torch.float16)
        dtypes = [t.dtype for t in (q, k, v) if t is not None]   # k and v may be unknown yet (resolve_backend)
        if any(d not in kernel_dtypes for d in dtypes):
            return (f"{self.name}: backend='triton' takes float32/bfloat16/float16 q, k, v, got {dtypes}: "
                    f"{fix}, or cast the inputs to float32")
        ln = gates.get("ln_weight") is not None or gates.get("ln_bias") is not None
        if auto and ln and v is not None and v.shape[-1] > self.triton_auto_max_ln_dim:
            return (f"{self.name}: backend='auto' keeps the LayerNorm form at V={v.shape[-1]} > "
                    f"{self.triton_auto_max_ln_dim} on the torch form (the kernel's state tile spills registers)")
        return None

    #: the LN form holds all of V in one program: `auto` takes the kernel up to this head dim (at 256 the
    #: [256, 256] float32 state tile spills registers and the backward takes minutes per autotune config to compile)
    triton_auto_max_ln_dim = 128

    def _chunk_triton(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, chunk_size, eta,
                      mini_batch_size, ln_weight, ln_bias, ln_eps):
        """Plain and LayerNorm form by `lsm_kernels.ttt.chunk_ttt_linear`: one kernel step per mini-batch (the
        chunk is the mini-batch; `chunk_size` does not change the result and is not used)."""
        from lsm_kernels.ttt import chunk_ttt_linear
        return chunk_ttt_linear(q, k, v, eta, scale, initial_state, output_final_state, cu_seqlens, mini_batch_size,
                                ln_weight, ln_bias, ln_eps)

    def _chunk_fla(self, q, k, v, initial_state, output_final_state, scale, cu_seqlens, **gates):
        raise ValueError(f"{self.name}: fla's chunk_ttt_linear computes a different function (an inner bias, "
                         "per-query / last-token learning rates, Z + LN(Z) output; see lsm/rules/ttt.py); use backend='torch'")

    # ---------------------------------------------------------------- parameterisation
    def gate_module(self, hidden_size, num_heads, head_dim):
        return TTTGate(hidden_size, num_heads, head_dim)
