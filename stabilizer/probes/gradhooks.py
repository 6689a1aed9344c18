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


class SharedGradHooks:
    """``watch(tensor, owner)`` -> the hook's handle when it is new, None when the
    tensor is already hooked (the owner is added to its list). ``on_grad(grad,
    owners)`` runs once per gradient."""

    def __init__(self, on_grad: Callable[[torch.Tensor, list], None]) -> None:
        self._on_grad = on_grad
        # Keyed by id, checked by a weak reference: a tensor that died leaves its id to
        # a new one (CPython reuses it at once), and the new tensor's gradient must get
        # a hook of its own, not be credited to the dead one's owners.
        self._owners: dict[int, tuple[weakref.ref, list]] = {}

    def watch(self, tensor: torch.Tensor, owner):
        entry = self._owners.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            entry[1].append(owner)
            return None
        owners = [owner]
        self._owners[id(tensor)] = (weakref.ref(tensor), owners)
        return tensor.register_hook(lambda grad: self._on_grad(grad, owners))

    def forget(self) -> None:
        """Hooks already made keep their owners; later tensors start afresh."""
        self._owners.clear()
