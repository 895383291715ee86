"""Decoding steps replayed as CUDA graphs.

A decoding step of a linear-recurrent layer is a few dozen small kernels on a fixed-size cache:
the GPU idles between launches. Because our layers keep the step free of host synchronisation
(no `.item()`, no data-dependent Python branching, routing included), the whole step can be
captured once and replayed:

    cache = layer(prompt, use_cache=True).cache            # prefill: fixes the cache's shapes
    step = GraphedStep(lambda x, c: (layer(x, cache=c).output, c), x_example, cache)
    for ...:
        y = step(x)          # runs the captured step; `cache` is updated in place

`fn(x, cache) -> (y, cache)` may reassign the cache's tensors (a dataclass, tuple, list or dict
tree of tensors, as `RuleCache`, `MoMCache` and lists of them are) or update them in place; the
captured step copies every new tensor into the cache's own buffers, so the cache object the
caller holds stays valid between replays. Integer counters in cache dataclasses (`seen`) are
advanced on the host by what one step added. Caches that grow (attention KV caches) cannot be
replayed and raise an error naming the problem.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor


def cache_tensors(tree: Any) -> list[Tensor]:
    """The tensors of a cache tree in a fixed order (dataclass fields, tuples, lists, dict values by key)."""
    if isinstance(tree, Tensor):
        return [tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in cache_tensors(getattr(tree, f.name))]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in cache_tensors(x)]
    if isinstance(tree, dict):
        return [t for key in sorted(tree) for t in cache_tensors(tree[key])]
    return []


def _counters(tree: Any, path: str = "") -> dict[str, tuple[Any, str, int]]:
    """Integer fields of the dataclasses in a cache tree: path -> (object, field, value)."""
    out = {}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            val = getattr(tree, f.name)
            if isinstance(val, int) and not isinstance(val, bool):
                out[f"{path}.{f.name}"] = (tree, f.name, val)
            else:
                out.update(_counters(val, f"{path}.{f.name}"))
    elif isinstance(tree, (list, tuple)):
        for i, x in enumerate(tree):
            out.update(_counters(x, f"{path}[{i}]"))
    elif isinstance(tree, dict):
        for key in sorted(tree):
            out.update(_counters(tree[key], f"{path}[{key!r}]"))
    return out


def _rebind(tree: Any, tensors: list[Tensor]) -> Any:
    """Point the tree at `tensors` (in `cache_tensors` order): dataclasses, lists and dicts are
    updated in place; tuples are rebuilt. Returns the tree."""
    it = iter(tensors)

    def walk(node):
        if isinstance(node, Tensor):
            return next(it)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                setattr(node, f.name, walk(getattr(node, f.name)))
            return node
        if isinstance(node, list):
            node[:] = [walk(x) for x in node]
            return node
        if isinstance(node, tuple):
            return type(node)(walk(x) for x in node)
        if isinstance(node, dict):
            for key in sorted(node):
                node[key] = walk(node[key])
            return node
        return node

    return walk(tree)


def _check_same(new: list[Tensor], static: list[Tensor]) -> None:
    if len(new) != len(static) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(new, static)):
        raise ValueError("GraphedStep: the step changed the cache's structure or shapes (an attention KV cache "
                         "grows every token); CUDA-graph decoding needs fixed-size caches (linear-recurrent layers)")


class GraphedStep:
    """One decoding step `fn(x, cache) -> (y, cache)` captured as a CUDA graph and replayed.

    Args:
        fn: the step. It must not synchronise with the host and must keep the cache's shapes.
        example: an input of the shape and dtype every later call passes (e.g. `[B, 1, D]` or token ids `[B, 1]`).
        cache: the filled cache (after a prefill); updated in place by every call.
        warmup: eager runs on a copy of the cache before capture (kernel compilation, autotuning,
            library workspaces happen there, not in the graph).
        graph: False runs the same static-buffer step eagerly (CPU tests, debugging).

    Calling it copies `x` into the static input, replays, and returns the static output: it is
    overwritten by the next call, so clone it to keep it. Steps run without autograd (decoding).
    """

    def __init__(self, fn: Callable[[Tensor, Any], tuple[Tensor, Any]], example: Tensor, cache: Any,
                 warmup: int = 2, graph: bool = True):
        self.fn, self.cache = fn, cache
        static = cache_tensors(cache)
        if not static:
            raise ValueError("GraphedStep: the cache holds no tensors; run a prefill with use_cache=True first")
        # one buffer per slot: a tensor held twice (e.g. ttt's (S0, S) right after a prefill) gets its own copy,
        # or copying the step's new values into one slot would overwrite the other
        seen: set[int] = set()
        for i, t in enumerate(static):
            if t.data_ptr() in seen:
                static[i] = t.clone()
            seen.add(static[i].data_ptr())
        self.static = static
        _rebind(cache, static)
        self.x = example.clone()
        self.graph = None
        if graph:
            if not (self.x.is_cuda and all(t.is_cuda for t in self.static)):
                raise ValueError("GraphedStep: CUDA graphs need the input and every cache tensor on a CUDA device; "
                                 "pass graph=False to run the same step eagerly")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                spare = copy.deepcopy(cache)
                for _ in range(max(warmup, 1)):
                    _, spare = self.fn(self.x, spare)
                    _check_same(cache_tensors(spare), self.static)
            torch.cuda.current_stream().wait_stream(side)
            del spare
            before = {k: v for k, (_, _, v) in _counters(cache).items()}
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.y = self._record()
            self.advance = {k: (obj, name, val - before[k]) for k, (obj, name, val) in _counters(cache).items()
                            if k in before}
            # the capture ran the Python once without computing; the counters moved: rewind them
            for _, (obj, name, delta) in self.advance.items():
                setattr(obj, name, getattr(obj, name) - delta)
        else:
            self.y = None

    def _record(self) -> Tensor:
        """Run the step on the static input and copy every new cache tensor into the static buffers."""
        with torch.no_grad():
            y, new_cache = self.fn(self.x, self.cache)
        new = cache_tensors(new_cache)
        _check_same(new, self.static)
        for a, b in zip(self.static, new):
            if a is not b and a.data_ptr() != b.data_ptr():
                a.copy_(b)
        _rebind(new_cache, self.static)
        if new_cache is not self.cache:
            _rebind(self.cache, self.static)
        return y

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape != self.x.shape or x.dtype != self.x.dtype:
            raise ValueError(f"GraphedStep: captured for inputs {tuple(self.x.shape)} {self.x.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        self.x.copy_(x)
        if self.graph is None:
            return self._record()
        self.graph.replay()
        for _, (obj, name, delta) in self.advance.items():
            setattr(obj, name, getattr(obj, name) + delta)
        return self.y
