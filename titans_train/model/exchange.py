"""A seam for supplying parts of a layer's incoming state from outside the layer.

Normally a layer reads its whole incoming state from the `layer_state` dict. A `StateExchange`
passed as `exchange=` to `TitansBlock.forward` lets a caller provide some parts late, at the
moment the layer has computed what the caller needs for them from its own input. Sequence
parallelism's lockstep schedule (`titans_train.parallel.scan_schedule`) uses it: the neighbouring
span owner's tails arrive once this span's own tails are known (they are sent the other way), and
the incoming memory state is found from this span's keys, values and gates (the affine map of a
linear memory). The model calls the hooks; it never communicates itself.

Hooks are called in the order the layer computes (MAG: attention, then memory; MAL: memory, then
attention); every call's `incoming` holds the parts `layer_state` gave, to be returned when the
caller has nothing better (e.g. at the start of the sequence), with the same shapes.
"""

from __future__ import annotations

from typing import Protocol

import torch

State = dict[str, torch.Tensor]


class StateExchange(Protocol):
    def exchange_tails(self, outgoing: State, incoming: State) -> State:
        """Tails (convolution inputs, attention keys/values) of a sub-module.

        `outgoing`: the tails this call leaves for the next span, computed from this span's input
        alone (valid because the span is at least as long as each tail). Returns the incoming
        tails to use, keyed and shaped like `incoming`.
        """

    def incoming_memory(self, memory, keys: torch.Tensor, values: torch.Tensor,
                        theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor,
                        weights: tuple[torch.Tensor, ...], momentum: tuple[torch.Tensor, ...]
                        ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The memory's incoming weights and momentum (each a tuple of (B, Hm, d_out, d_in)).

        `memory` is the `NeuralMemory` (for `chunk_size`, `residual`); keys/values (B, Hm, T, d)
        and gates (B, Hm, T) are the whole-chunk tokens this call stores, starting at the
        incoming state; `weights`/`momentum` are the ones `layer_state` gave.
        """
