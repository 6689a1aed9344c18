"""One gradient hook per tensor, however many owners want its gradient.

A tensor often passes through several probes (hidden states feed query, key and
value; a layer's output is its container's output and the next layer's input).
Hooking it once and crediting each owner, in the order they asked, is what
separate hooks would do, for one Python call instead of many.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


class _Hook:
    """A gradient hook and the owners it credits (one object: a closure would be three)."""

    __slots__ = ("owners", "_on_grad")

    def __init__(self, owner, on_grad) -> None:
        self.owners = [owner]
        self._on_grad = on_grad

    def __call__(self, grad):
        self._on_grad(grad, self.owners)


class SharedGradHooks:
    """``watch(tensor, owner)`` -> the hook's handle when it is new, None when the
    tensor is already hooked (the owner is added to its list). ``on_grad(grad,
    owners)`` runs once per gradient."""

    def __init__(self, on_grad: Callable[[torch.Tensor, list], None]) -> None:
        self._on_grad = on_grad
        # Keyed by id, checked by a weak reference: a tensor that died leaves its id to
        # a new one (CPython reuses it at once), and the new tensor's gradient must get
        # a hook of its own, not be credited to the dead one's owners. Flat dicts and
        # one small object per tensor, no tuples: objects alive through a pass are
        # what makes Python's garbage collector run.
        self._refs: dict[int, weakref.ref] = {}
        self._hooks: dict[int, _Hook] = {}

    def watch(self, tensor: torch.Tensor, owner):
        key = id(tensor)
        ref = self._refs.get(key)
        if ref is not None and ref() is tensor:
            self._hooks[key].owners.append(owner)
            return None
        hook = _Hook(owner, self._on_grad)
        self._refs[key] = weakref.ref(tensor)
        self._hooks[key] = hook
        return tensor.register_hook(hook)

    def forget(self) -> None:
        """Hooks already made keep their owners; later tensors start afresh."""
        self._refs.clear()
        self._hooks.clear()
