"""Other forms of a weight tensor (a oneDNN-packed copy, Q8_0 blocks), kept beside it and valid
only for the values it had when the form was made.

Owns: `WeightForms`, a thread-safe map weight -> (its version when the form was made, the form,
the form's bytes). Keyed by the tensor's identity and dropped when the tensor dies (a weakref
callback); a lookup after the tensor's version counter moved (an in-place update through the
tensor or any view of it) finds nothing and forgets the stale form. Tensors without a version
counter (inference-mode tensors) never have forms.

Must not import: any loong module (torch and the standard library only).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["WeightForms", "version_of"]


def version_of(weight: torch.Tensor) -> Optional[int]:
    """The tensor's version counter, or None for a tensor without one (inference mode)."""
    try:
        return weight._version
    except RuntimeError:
        return None


class WeightForms:
    """One form per weight tensor, valid for one version of it."""

    def __init__(self) -> None:
        # re-entrant: a weight's death may call _forget while the lock is held
        self._lock = threading.RLock()
        # id(weight) -> (weakref to the weight, version, form, bytes)
        self._forms: Dict[int, Tuple[weakref.ref, int, Any, int]] = {}
        self.held_bytes = 0

    def get(self, weight: torch.Tensor) -> Optional[Any]:
        """The form made for the weight's current values, or None (forgetting a stale one)."""
        key = id(weight)
        entry = self._forms.get(key)
        if entry is None:
            return None
        if entry[0]() is weight and entry[1] == version_of(weight):
            return entry[2]
        self._forget(key)                 # updated in place, or the id of a dead tensor
        return None

    def put(self, weight: torch.Tensor, form: Any, nbytes: int,
            version: Optional[int] = None) -> bool:
        """Keep `form` for the weight's values at `version` (default: now). False (nothing
        kept) for a tensor without a version counter."""
        v = version_of(weight) if version is None else version
        if v is None:
            return False
        key = id(weight)
        with self._lock:
            self._forget(key)
            self._forms[key] = (weakref.ref(weight, lambda _r, k=key: self._forget(k)), v,
                                form, nbytes)
            self.held_bytes += nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._forms.clear()
            self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._forms)

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._forms.pop(key, None)
            if entry is not None:
                self.held_bytes -= entry[3]
