"""Which form of each projection weight the native decode step (`loong.ops.decoder_layers`,
csrc/cpu/decoder_step.cpp) reads: the lists of packed copies or Q8_0 blocks it takes
beside the plain weights.

Owns: `PROJECTIONS` (the positions of the projections among a layer's 8 weights),
`packed_lists` and `q8_lists`. Each list is as long as the weight list, holding a projection's
form where it has one and an empty tensor everywhere else; an empty list means no projection
has that form (the C++ side then never looks).

Must not import: model, engine or scheduler code, nor names of the ops package itself (the
package imports this module): only its submodules packed_weights and quantized_weights.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from loong.ops import packed_weights, quantized_weights

Tensor = torch.Tensor

__all__ = ["PROJECTIONS", "packed_lists", "q8_lists"]

# Positions of the projections among a layer's 8 `decoder_layers` weights (qkv, o_proj,
# gate_up, down): the ones `loong.ops.linear` would run on another form.
PROJECTIONS = (0, 2, 5, 6)


def _form_lists(layer_weights: Sequence[Tensor], empty: Tensor,
                form_of: Callable[[Tensor], Optional[tuple]]) -> Optional[List[list]]:
    """One list per tensor of the form `form_of(weight)` gives (a tuple, or None where the
    weight has none); None when no projection has the form."""
    lists = None
    for base in range(0, len(layer_weights), 8):
        for i in PROJECTIONS:
            form = form_of(layer_weights[base + i])
            if form is None:
                continue
            if lists is None:
                lists = [[empty] * len(layer_weights) for _ in form]
            for out, t in zip(lists, form):
                out[base + i] = t
    return lists


def packed_lists(layer_weights: Sequence[Tensor], empty: Tensor, native=None,
                 skip_q8: bool = False) -> list:
    """`decoder_layers`' packed_weights (`packed_weights.packed(w, native)`: our layout where
    `native`, the loaded native module, has the kernel, else oneDNN's); [] when nothing is
    packed. `skip_q8`: leave out (and do not pack) weights that have Q8_0 blocks."""
    def packed(w: Tensor):
        if skip_q8 and quantized_weights.q8_form(w) is not None:
            return None
        wp = packed_weights.packed(w, native)
        return None if wp is None else (wp,)
    lists = _form_lists(layer_weights, empty, packed)
    return lists[0] if lists else []


def q8_lists(layer_weights: Sequence[Tensor], empty: Tensor) -> Tuple[list, list]:
    """`decoder_layers`' q8_weights and q8_scales (Q8_0 blocks and their scales); ([], []) when
    no projection has any."""
    lists = _form_lists(layer_weights, empty, quantized_weights.q8_form)
    return (lists[0], lists[1]) if lists else ([], [])
