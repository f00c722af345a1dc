"""A module's own forward, called without nn.Module's call machinery: decoding on a CPU.

On a CPU a small decoder's one-token step is mostly Python: some 60 module calls, each a few
microseconds of dispatch, hook checks and attribute look-ups around a matrix-vector product
of similar cost. `gathered(module)` returns a callable that runs `type(module).forward` over
a view of the module: an object of a class made from the module's own class (the same
methods, so the same code runs), whose attributes are the module's own parameters, buffers
and settings, gathered once, and whose submodules are views in turn. Leaves that torch
computes in one function (nn.Linear, nn.LayerNorm, nn.Embedding, GELU/ReLU, and dropout and
nn.Identity in eval mode) become that function over the module's own tensors.

So a view computes what the module computes: the same functions, in the same order, over
the same tensors (not copies: a weight changed in place is seen). Where that cannot be
promised, the module itself is called instead: a module with hooks, one in training mode,
one whose `forward` was replaced on the instance, and a class outside mmt that is none of
those leaves. A view sees the module tree as it
was when it was made: make one per decoding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch.nn.functional as F
from torch import nn


def _identity(x: Any) -> Any:
    return x


_LEAVES: dict[type, Callable[[Any], Callable]] = {
    nn.Linear: lambda m: functools.partial(F.linear, weight=m.weight, bias=m.bias),
    nn.LayerNorm: lambda m: functools.partial(
        F.layer_norm, normalized_shape=m.normalized_shape, weight=m.weight, bias=m.bias, eps=m.eps
    ),
    nn.Embedding: lambda m: functools.partial(
        F.embedding, weight=m.weight, padding_idx=m.padding_idx, max_norm=m.max_norm, norm_type=m.norm_type,
        scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
    ),
    nn.GELU: lambda m: functools.partial(F.gelu, approximate=m.approximate),
    nn.ReLU: lambda m: functools.partial(F.relu, inplace=m.inplace),
    nn.Dropout: lambda m: _identity,  # (views are made in eval mode only)
    nn.Identity: lambda m: _identity,
}


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether hooks registered for every module are present (a view would skip them)."""
    return any(getattr(nn.modules.module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


@functools.cache
def _view_class(cls: type) -> type:
    """A plain class with `cls`'s methods, properties and class attributes, called as `cls.forward`."""
    namespace: dict[str, Any] = {}
    for base in reversed(cls.__mro__[: cls.__mro__.index(nn.Module)]):
        namespace.update({k: v for k, v in vars(base).items() if not (k.startswith("__") and k.endswith("__"))})
    namespace["__call__"] = cls.forward
    return type(f"Gathered{cls.__name__}", (), namespace)


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "mmt"


def gathered(module: nn.Module) -> Callable:
    """A callable computing `module(...)` as described in the module docstring (or `module`
    itself where a view could differ)."""
    if module.training or _hooked(module) or global_hooks() or "forward" in vars(module):  # (a forward set on the instance)
        return module
    leaf = _LEAVES.get(type(module))
    if leaf is not None:
        return leaf(module)
    if not _ours(type(module)):
        return module
    view = _view_class(type(module)).__new__(_view_class(type(module)))
    view.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    view.__dict__.update(module._parameters)
    view.__dict__.update(module._buffers)
    for name, child in module._modules.items():
        if type(child) is nn.ModuleList:
            view.__dict__[name] = [gathered(c) for c in child]
        else:
            view.__dict__[name] = None if child is None else gathered(child)
    return view
