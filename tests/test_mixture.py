"""Mixture-of-Memories wrapper, for every registered rule.

Properties: the packed wrapper equals the plain dense reference (lsm/mixture/reference.py);
decoding token by token and prefix-then-continuation equal the full forward; causality; a packed
variable-length batch equals separate runs; a memory no token is routed to keeps exactly its
initial state; gradients reach the router, every memory's projections and the shared memory;
bad input raises errors that name the parameter; the aux loss on a hand-computed case.

float64 on CPU, tiny shapes. Tolerances: atol 1e-9 / rtol 1e-7 for memory states and layer
outputs (float64 arithmetic, reassociated), except for ttt: its gate module computes eta in
float32, so projecting one token at a time or a whole sequence can round eta one float32 ulp
apart; there atol 1e-7 / rtol 1e-6 for states and 1e-6 / 1e-5 for outputs. A dispatch or
routing error shows up at 1e-2 and above.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lsm.rules as R
from lsm.layers import RuleCache
from lsm.mixture import MixtureOfMemories, MoMCache, load_balancing_loss
from lsm.mixture.reference import mom_reference
from lsm.mixture.routing import Routing
from lsm.rules._chunking import ChunkLayout
from lsm.rules.base import UpdateRule

RULES = R.names()
READOUTS = ["sum", "per_memory"]   # how the memories' reads reach the output projection (MixtureOfMemories)
D, H = 16, 2
FLOAT64_TOL = dict(atol=1e-9, rtol=1e-7)
# rules whose gate modules compute in float32: (state tolerance, output tolerance)
FLOAT32_GATES = {"ttt": (dict(atol=1e-7, rtol=1e-6), dict(atol=1e-6, rtol=1e-5))}
# ttt's mini-batch of 3 puts mini-batch boundaries inside the short per-memory segments
OPTIONS = {"ttt": {"mini_batch_size": 3}}


def make_layer(name, seed=0, num_memories=3, topk=2, shared_memory=True, options=None, **kw):
    torch.manual_seed(seed)
    opts = OPTIONS.get(name) if options is None else options
    return MixtureOfMemories(name, D, H, num_memories=num_memories, topk=topk, shared_memory=shared_memory,
                             chunk_size=4, backend="torch", rule_options=opts, **kw).double()


def rand_x(B, T, seed):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_cache(layer, B, seed):
    """A cache whose every memory starts from a random state (through `state_from_final`)."""
    gen = torch.Generator().manual_seed(seed + 7)
    S = 0.5 * torch.randn(B * layer.num_states, H, layer.head_dim, layer.value_dim, generator=gen, dtype=torch.float64)
    state = tuple(s.unflatten(0, (B, layer.num_states)) for s in layer.rule.state_from_final(S))
    return MoMCache(state=state, config=layer.config)


def memory(layer, state):
    """The `[B, Ms, H, K, V]` memories held in a decode state."""
    return layer.rule.final_from_state(state)


def close(a, b, name, what, kind):
    """assert_close with the tolerance of rule `name` for `kind` ("state" or "output")."""
    state_tol, out_tol = FLOAT32_GATES.get(name, (FLOAT64_TOL, FLOAT64_TOL))
    tol = state_tol if kind == "state" else out_tol
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} {what}: {m}")


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("name", RULES)
@settings(max_examples=5)
@given(B=st.integers(1, 2), T=st.integers(1, 14), topk=st.integers(1, 3), shared=st.booleans(),
       with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_dense_reference(name, readout, B, T, topk, shared, with_state, seed):
    """The packed wrapper (chunk path; the step path when T = 1 with a cache) equals the dense reference."""
    layer = make_layer(name, seed, topk=topk, shared_memory=shared, readout=readout)
    x = rand_x(B, T, seed)
    cache = random_cache(layer, B, seed) if with_state else None
    h0 = None if cache is None else cache.state
    y_ref, state_ref = mom_reference(layer, x, h0)
    out = layer(x, cache=cache, use_cache=True)
    close(out.output, y_ref, name, "output", "output")
    close(memory(layer, out.cache.state), memory(layer, state_ref), name, "final memories", "state")


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_decoding_token_by_token_equals_forward(name, readout, T, seed):
    """From an empty cache, T calls with one token each equal one forward over all T tokens."""
    layer = make_layer(name, seed, readout=readout)
    x = rand_x(2, T, seed)
    full = layer(x, use_cache=True)
    cache, ys = None, []
    for t in range(T):
        out = layer(x[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        ys.append(out.output)
    close(torch.cat(ys, 1), full.output, name, "decoded outputs", "output")
    close(memory(layer, cache.state), memory(layer, full.cache.state), name, "decoded memories", "state")
    assert cache.seen == T


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(T=st.integers(2, 14), split=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_prefix_then_continuation_equals_forward(name, readout, T, split, seed):
    """A prefill with a cache, then the rest (chunked, from the cached per-memory states), equals one forward."""
    # ttt's decode state carries the position inside the current mini-batch, but a chunked prefill
    # returns only the memory S, and a continuation from an initial state starts a fresh mini-batch
    # (DESIGN: an initial state starts one). With mini-batches of one token the two agree exactly.
    layer = make_layer(name, seed, options={"mini_batch_size": 1} if name == "ttt" else None, readout=readout)
    x = rand_x(2, T, seed)
    t0 = min(max(int(T * split), 1), T - 1)
    full = layer(x, use_cache=True)
    a = layer(x[:, :t0], use_cache=True)
    b = layer(x[:, t0:], cache=a.cache)
    close(torch.cat([a.output, b.output], 1), full.output, name, "continued outputs", "output")
    close(memory(layer, b.cache.state), memory(layer, full.cache.state), name, "continued memories", "state")


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(T=st.integers(2, 14), cut=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_causality(name, T, cut, seed):
    """Changing tokens from t0 on (and so their routing) changes no output before t0."""
    layer = make_layer(name, seed)
    x = rand_x(2, T, seed)
    t0 = min(int(T * cut), T - 1)
    x2 = x.clone()
    x2[:, t0:] = rand_x(2, T - t0, seed + 1)
    y1, y2 = layer(x).output, layer(x2).output
    close(y2[:, :t0], y1[:, :t0], name, "outputs before t0", "output")
    assert not torch.allclose(y2[:, t0:], y1[:, t0:]), "the changed tokens should change their outputs"


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(lens=st.lists(st.integers(1, 14), min_size=1, max_size=3), packed=st.booleans(), with_state=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cpu_layout_equals_static_layout(name, lens, packed, with_state, seed):
    """The torch path's CPU layout (a sequence's memory segments one after another in one row, exact length)
    and the static one an accelerator builds (a row per segment, `max_seqlen = T`; one row when packed) give
    the same outputs, final states and gradients (input and every parameter), on random routings."""
    import lsm.rules.base as base
    layer = make_layer(name, seed)
    B, T = (1, sum(lens)) if packed else (len(lens), max(lens))
    cu = torch.tensor([0] + lens).cumsum(0) if packed else None
    gen = torch.Generator().manual_seed(seed + 1)
    runs = []
    for exact in (True, False):
        built = []

        def layout(*args, exact=exact, **kw):
            built.append(exact)
            return ChunkLayout(*args, **kw, exact=exact)
        x = rand_x(B, T, seed).requires_grad_()
        cache = random_cache(layer, B, seed) if with_state and not packed else None
        layer.zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(base, "ChunkLayout", layout)
            y = layer(x, cache=cache, cu_seqlens=cu).output
        assert built, "the torch path built no chunk layout"
        final = memory(layer, cache.state) if cache is not None else None
        loss = (y * torch.randn(y.shape, generator=gen.manual_seed(seed), dtype=y.dtype)).sum()
        loss = loss + (final.square().sum() if final is not None else 0)
        loss.backward()
        runs.append((y.detach(), final, x.grad, [p.grad for p in layer.parameters()]))
    (y1, S1, gx1, gp1), (y2, S2, gx2, gp2) = runs
    close(y1, y2, name, "outputs", "output")
    if S1 is not None:
        close(S1.detach(), S2.detach(), name, "final states", "state")
    close(gx1, gx2, name, "input gradient", "output")
    for n, (a, b) in enumerate(zip(gp1, gp2)):
        if a is not None or b is not None:
            close(a, b, name, f"gradient of parameter {n}", "output")


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(lens=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_varlen_equals_separate_runs(name, readout, lens, seed):
    """A packed batch (B = 1, cu_seqlens; segments are (sequence, memory) pairs) equals separate runs."""
    layer = make_layer(name, seed, readout=readout)
    x = rand_x(1, sum(lens), seed)
    cu = torch.tensor([0] + lens).cumsum(0)
    packed = layer(x, cu_seqlens=cu).output
    separate = torch.cat([layer(x[:, int(cu[n]):int(cu[n + 1])]).output for n in range(len(lens))], 1)
    close(packed, separate, name, "packed outputs", "output")


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=3)
@given(B=st.integers(1, 2), T=st.integers(1, 12), topk=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_unrouted_memory_keeps_its_initial_state(name, B, T, topk, seed):
    """Memory 0, which the router never picks, ends exactly (bit for bit) at its initial state."""
    layer = make_layer(name, seed, topk=topk)
    with torch.no_grad():  # token feature 0 is 1, and memory 0's logit is -100 * feature 0
        layer.router.proj.weight[0] = 0.0
        layer.router.proj.weight[0, 0] = -100.0
    x = rand_x(B, T, seed)
    x[..., 0] = 1.0
    cache = random_cache(layer, B, seed)
    initial = tuple(s.clone() for s in cache.state)
    out = layer(x, cache=cache)
    assert not bool((layer.router(x).index == 0).any())
    for i, (s, s0) in enumerate(zip(out.cache.state, initial)):
        assert torch.equal(s[:, 0], s0[:, 0]), f"{name}: state tensor {i} of the unrouted memory changed"
    # and the routed ones did change
    assert not torch.equal(memory(layer, out.cache.state)[:, -1], memory(layer, initial)[:, -1])


@pytest.mark.parametrize("name", RULES)
def test_gradients_reach_router_every_memory_and_shared(name):
    layer = make_layer(name, 3)
    x = rand_x(2, 16, 3).requires_grad_()
    out = layer(x)
    sel = layer.router(x).index
    assert all(bool((sel == m).any()) for m in range(layer.num_memories)), "test setup: every memory gets a token"
    w = torch.randn(out.output.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ((out.output * w).sum() + out.aux_loss).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"{name}: no gradient reaches {pname}"
        assert bool(torch.isfinite(p.grad).all()), f"{name}: non-finite gradient in {pname}"
    Ms = layer.num_states
    for pname in ("k_proj", "v_proj"):
        proj = getattr(layer, pname)
        if proj is None:  # hgrn2 derives its keys from the (per-memory) gate
            continue
        per_memory = proj.weight.grad.view(Ms, -1, D)
        for m in range(Ms):
            kind = "shared memory" if m == layer.num_memories else f"memory {m}"
            assert bool(per_memory[m].abs().sum() > 0), f"{name}: no gradient reaches {pname} of {kind}"
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("name", ["gla", "deltanet"])
def test_per_memory_readout_keeps_memories_apart(name):
    """readout: per_memory: the output projection is Ms slices wide; the slice of a memory no token reads gets no
    gradient, every read one does; the router learns through the reads alone (aux loss off); bad values name
    the parameter."""
    layer = make_layer(name, 3, readout="per_memory", aux_loss_weight=0.0)
    Ms, HV = layer.num_states, H * layer.value_dim
    assert layer.o_proj.weight.shape == (D, Ms * HV)
    with torch.no_grad():  # as in test_unrouted_memory_keeps_its_initial_state: memory 0 is never picked
        layer.router.proj.weight[0] = 0.0
        layer.router.proj.weight[0, 0] = -100.0
    x = rand_x(2, 12, 3)
    x[..., 0] = 1.0
    out = layer(x)
    w = torch.randn(out.output.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out.output * w).sum().backward()
    slices = layer.o_proj.weight.grad.view(D, Ms, HV)
    assert torch.equal(slices[:, 0], torch.zeros_like(slices[:, 0]))
    assert all(bool(slices[:, m].abs().sum() > 0) for m in range(1, Ms))
    assert bool(layer.router.proj.weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="readout"):
        make_layer(name, readout="concat")


# the MoM-side options together: routing from a causal conv window of x, a router temperature, a router init std
ROUTER_OPTIONS = dict(router_conv=3, router_temperature=0.5, router_init_std=0.5)


@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "ttt"])
@settings(max_examples=3)
@given(B=st.integers(1, 2), T=st.integers(1, 12), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_router_options_equal_dense_reference(name, B, T, with_state, seed):
    """With the router options, the packed wrapper equals the dense reference (which routes through the same
    `router_input`, a plain conv), so routing from the window changes only what the router reads."""
    layer = make_layer(name, seed, **ROUTER_OPTIONS)
    x = rand_x(B, T, seed)
    cache = random_cache(layer, B, seed) if with_state else None
    y_ref, state_ref = mom_reference(layer, x, None if cache is None else cache.state)
    out = layer(x, cache=cache, use_cache=True)
    close(out.output, y_ref, name, "output", "output")
    close(memory(layer, out.cache.state), memory(layer, state_ref), name, "final memories", "state")


@pytest.mark.parametrize("name", ["gated_deltanet", "mamba2"])
@settings(max_examples=3)
@given(T=st.integers(2, 12), lens=st.lists(st.integers(1, 7), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_router_conv_decodes_and_packs_exactly(name, T, lens, seed):
    """The router conv's tail rides in the cache (token-by-token decoding equals one forward) and its taps stop at
    sequence boundaries (a packed batch equals separate runs); a later token never changes an earlier routing."""
    layer = make_layer(name, seed, **ROUTER_OPTIONS)
    x = rand_x(2, T, seed)
    full = layer(x, use_cache=True)
    cache, ys = None, []
    for t in range(T):
        out = layer(x[:, t:t + 1], cache=cache, use_cache=True)
        cache, ys = out.cache, ys + [out.output]
    close(torch.cat(ys, 1), full.output, name, "decoded outputs", "output")
    assert cache.conv["router"].shape == (2, D, 2)
    xp = rand_x(1, sum(lens), seed + 1)
    cu = torch.tensor([0] + lens).cumsum(0)
    separate = torch.cat([layer(xp[:, int(cu[n]):int(cu[n + 1])]).output for n in range(len(lens))], 1)
    close(layer(xp, cu_seqlens=cu).output, separate, name, "packed outputs", "output")
    x2 = x.clone()
    x2[:, -1] = 0.0
    r1, r2 = (layer.router(layer.router_input(v, None, None)) for v in (x, x2))
    assert torch.equal(r1.index[:, :-1], r2.index[:, :-1])


def test_router_options_default_off_and_their_effect():
    """Off by default (no router conv parameters, temperature 1); a temperature divides the logits; the router's
    init std holds inside a LanguageModel, whose init of linear weights would otherwise overwrite it."""
    from lsm.config import from_dict
    from lsm.model import build_model

    plain = make_layer("deltanet", 0)
    assert plain.router_conv is None and plain.router.temperature == 1.0
    assert not any("router_conv" in n for n, _ in plain.named_parameters())
    hot = make_layer("deltanet", 0, router_temperature=4.0)
    x = rand_x(1, 5, 0)
    logits = x @ hot.router.proj.weight.T
    torch.testing.assert_close(hot.router(x).probs, torch.softmax(logits / 4.0, -1))
    cfg = {"model": {"hidden_size": 64, "mixer": {"type": "mom", "num_heads": 2, "num_memories": 64, "backend": "torch"}}}
    default = build_model(from_dict(cfg))
    cfg["model"]["mixer"].update(router_init_std=0.5, router_conv=4)
    wide = build_model(from_dict(cfg))
    assert abs(float(default.blocks[0].mixer.router.proj.weight.detach().std()) - 0.02) < 0.003
    assert abs(float(wide.blocks[0].mixer.router.proj.weight.detach().std()) - 0.5) < 0.05
    assert wide.blocks[0].mixer.router_conv.kernel_size == 4
    assert abs(float(wide.blocks[0].mixer.k_proj.weight.detach().std()) - 0.02) < 0.003      # other weights keep model.init_std


def test_aux_loss_hand_computed():
    """M = 2, top-1, three tokens with router probabilities (0.9, 0.1), (0.6, 0.4), (0.2, 0.8):
    f = (2/3, 1/3), P = (1.7/3, 1.3/3), loss = 2 * (2/3 * 1.7/3 + 1/3 * 1.3/3) = 9.4 / 9."""
    layer = MixtureOfMemories("linear_attention", 4, 2, num_memories=2, topk=1, aux_loss_weight=0.5,
                              backend="torch").double()
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[:, :3] = p.log().T                 # logits of token t = log p_t
    x = torch.eye(4, dtype=torch.float64)[None, :3]                  # token t = e_t
    out = layer(x)
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.5 * 9.4 / 9, dtype=torch.float64), atol=1e-12, rtol=0)
    # balanced routing gives exactly M * sum_m (1/M)(1/M) = 1
    balanced = Routing(probs=torch.full((1, 4, 2), 0.5), index=torch.tensor([[[0], [1], [0], [1]]]),
                       weight=torch.ones(1, 4, 1))
    assert float(load_balancing_loss(balanced, 2)) == pytest.approx(1.0)


def test_bad_input_names_the_parameter():
    mk = lambda **kw: MixtureOfMemories(**{"rule": "gla", "hidden_size": 16, "num_heads": 2, **kw})
    with pytest.raises(ValueError, match="topk"):
        mk(num_memories=2, topk=3)
    with pytest.raises(ValueError, match="num_memories"):
        mk(num_memories=0, topk=1)
    with pytest.raises(ValueError, match="topk"):
        mk(topk=0)
    with pytest.raises(ValueError, match="unknown update rule"):
        mk(rule="no_such_rule")
    with pytest.raises(ValueError, match="hidden_size"):
        mk(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="aux_loss_weight"):
        mk(aux_loss_weight=-1.0)
    for key, bad in (("router_conv", -1), ("router_temperature", 0.0), ("router_init_std", -0.1)):
        with pytest.raises(ValueError, match=key):
            mk(**{key: bad})
    layer = mk(num_memories=3)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 3, 8))
    cache = layer(x, use_cache=True).cache
    for other, key in ((mk(num_memories=4), "num_memories"),
                       (mk(num_memories=3, router_conv=2), "router_conv"),
                       (mk(num_memories=3, shared_memory=False), "shared_memory"),
                       (mk(num_memories=3, head_dim=4), "head_dim"), (mk(rule="mamba2", num_memories=3), "rule")):
        with pytest.raises(ValueError, match=key):
            other(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(3, 1, 16), cache=cache)
    with pytest.raises(TypeError, match="MoMCache"):
        layer(x, cache=RuleCache())
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], cache=cache, cu_seqlens=torch.tensor([0, 3]))


TRITON_RULES = [n for n in RULES if type(R.get(n))._chunk_triton is not UpdateRule._chunk_triton]


def forced_pair(name, backend, device="cpu", **kw):
    """A float32 layer whose router never picks memory 0, an input, and two equal random caches."""
    torch.manual_seed(0)
    layer = MixtureOfMemories(name, D, H, num_memories=3, topk=2, chunk_size=16, backend=backend, **kw).to(device)
    with torch.no_grad():
        layer.router.proj.weight[0] = 0.0
        layer.router.proj.weight[0, 0] = -100.0
    x = torch.randn(2, 12, D, device=device)
    x[..., 0] = 1.0
    cache = layer.init_cache(2, device=device)
    S = 0.5 * torch.randn_like(memory(layer, cache.state)).flatten(0, 1)           # a valid decode state (ttt: n = 0)
    cache.state = tuple(s.unflatten(0, (2, layer.num_states)) for s in layer.rule.state_from_final(S))
    twin = MoMCache(state=tuple(s.clone() for s in cache.state), config=cache.config)
    return layer, x, cache, twin


@pytest.mark.parametrize("name", TRITON_RULES)
def test_triton_backend_matches_torch(name):
    """backend="triton" (this project's kernels; TRITON_INTERPRET on CPU) equals backend="torch" through the
    packed varlen batch with per-memory initial states and an empty segment; float32, atol 1e-5."""
    layer, x, cache, twin = forced_pair(name, "triton", "cuda" if torch.cuda.is_available() else "cpu")
    y = layer(x, cache=cache)
    layer.backend = "torch"
    y_ref = layer(x, cache=twin)
    torch.testing.assert_close(y.output, y_ref.output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(memory(layer, y.cache.state), memory(layer, y_ref.cache.state), atol=1e-5, rtol=1e-4)
    assert torch.equal(memory(layer, y.cache.state)[:, 0], memory(layer, twin.state)[:, 0])


STEP_RULES = [n for n in RULES if R.get(n).has_triton_step]


def test_per_memory_readout_on_triton_matches_torch():
    """readout: per_memory with backend="triton" (TRITON_INTERPRET on CPU): a prefill from per-memory states, then
    decoding steps (the gathered step: the fused kernel returns mixed reads only), equal backend="torch";
    float32, atol 1e-5."""
    layer, x, cache, twin = forced_pair("gated_deltanet", "triton", "cuda" if torch.cuda.is_available() else "cpu",
                                        readout="per_memory")
    ys = [layer(x[:, :8], cache=cache).output, *[layer(x[:, t:t + 1], cache=cache).output for t in range(8, 11)]]
    layer.backend = "torch"
    ys_ref = [layer(x[:, :8], cache=twin).output, *[layer(x[:, t:t + 1], cache=twin).output for t in range(8, 11)]]
    torch.testing.assert_close(torch.cat(ys, 1), torch.cat(ys_ref, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(memory(layer, cache.state), memory(layer, twin.state), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", STEP_RULES)
def test_fused_decode_step_matches_torch(name, grad):
    """Decoding with backend="triton": without autograd one fused kernel (`lsm_kernels.decode.mom_step`)
    updates the routed memories and the shared one in place; with autograd the gathered step runs.
    Both equal backend="torch" token by token, and memory 0 (never routed) keeps its state; atol 1e-5."""
    layer, x, cache, twin = forced_pair(name, "triton", "cuda" if torch.cuda.is_available() else "cpu")
    before = memory(layer, cache.state)[:, 0].clone()
    with torch.set_grad_enabled(grad):
        ys = [layer(x[:, t:t + 1], cache=cache).output for t in range(4)]
        layer.backend = "torch"
        ys_ref = [layer(x[:, t:t + 1], cache=twin).output for t in range(4)]
    torch.testing.assert_close(torch.cat(ys, 1), torch.cat(ys_ref, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(memory(layer, cache.state), memory(layer, twin.state), atol=1e-5, rtol=1e-4)
    assert torch.equal(memory(layer, cache.state)[:, 0], before)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in RULES if R.get(n).has_fla])
def test_fla_backend_unrouted_memory_on_gpu(name):
    """fla's varlen kernels with an empty segment (memory 0 never routed): that memory keeps its
    initial state, and the rest matches the torch backend; float32, atol 2e-3."""
    layer, x, cache, twin = forced_pair(name, "fla", "cuda")
    initial = memory(layer, cache.state)[:, 0].clone()
    y = layer(x, cache=cache)
    layer.backend = "torch"
    y_ref = layer(x, cache=twin)
    torch.testing.assert_close(y.output, y_ref.output, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(memory(layer, y.cache.state)[:, 0], initial, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_does_not_synchronise_on_gpu(backend):
    """Routing, dispatch, the rule's chunked form (torch / triton backends) and combine run without a
    host synchronisation, forward and backward. (fla's varlen path builds chunk indices on the host.)"""
    name = "mamba2" if backend == "triton" else "gated_deltanet"
    torch.manual_seed(0)
    layer = MixtureOfMemories(name, 64, 2, num_memories=4, topk=2, backend=backend).cuda()
    x = torch.randn(2, 100, 64, device="cuda", requires_grad=True)
    layer(x).output.sum().backward()  # warm-up: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.output.sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in RULES if R.get(n).has_fla])
def test_fla_backend_matches_torch_on_gpu(name):
    """On a GPU the fla kernels (varlen, with per-memory initial states) agree with the torch backend.
    float32, atol 2e-3 (tf32 / kernel reassociation)."""
    torch.manual_seed(0)
    layer = MixtureOfMemories(name, 64, 2, num_memories=4, topk=2, backend="fla").cuda()
    x = torch.randn(2, 100, 64, device="cuda")
    cache = layer.init_cache(2, device="cuda")
    cache.state = tuple(torch.randn_like(s) * 0.1 for s in cache.state)
    ref_cache = MoMCache(state=tuple(s.clone() for s in cache.state), config=cache.config)
    y = layer(x, cache=cache)
    layer.backend = "torch"
    y_ref = layer(x, cache=ref_cache)
    torch.testing.assert_close(y.output, y_ref.output, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(memory(layer, y.cache.state), memory(layer, y_ref.cache.state), atol=2e-3, rtol=2e-3)
