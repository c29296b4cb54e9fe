"""Hand a layer state from one span owner to the next, with its gradient flowing back.

Two autograd Functions (CPU-NOTES, "Sequence-parallel state relay"):

- `_ReceiveState`: forward receives the incoming state from the previous span owner into buffers
  of known shapes; backward sends the gradient of that state back to it. It takes a 0-dim
  "anchor" that requires grad, because autograd records a Function only if an input requires
  grad and the received buffers do not.
- `_SendState`: forward starts an asynchronous send of the outgoing state to the next span owner
  and returns a 0-dim zero; backward receives the gradient of the state from the next owner.
  The zero must be added to the loss, otherwise autograd never reaches this node.

States travel flattened, one message per dtype and direction per layer. States always move from
sp rank r to r+1 and gradients from r+1 to r, so the blocking receives in this order cannot
deadlock: the last span owner never waits in backward, and each owner only waits for its
successor. Sends are asynchronous; `StateRelay.finish()` waits for the ones still in flight
(call it after backward, or after a forward that is not followed by one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

LayerState = dict[str, torch.Tensor]


class TensorSpec(NamedTuple):
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _spec(tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(tensor.shape, tensor.dtype, tensor.device)


def _dtype_groups(specs: Sequence[TensorSpec]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(spec.dtype, []).append(index)
    return groups


def _pack(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One contiguous 1-D buffer per dtype, in order of first appearance."""
    return [
        torch.cat([tensors[i].reshape(-1) for i in indices])
        for indices in _dtype_groups([_spec(t) for t in tensors]).values()
    ]


def _unpack(buffers: Sequence[torch.Tensor], specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(specs)
    for buffer, indices in zip(buffers, _dtype_groups(specs).values()):
        pieces = buffer.split([specs[i].shape.numel() for i in indices])
        for i, piece in zip(indices, pieces):
            out[i] = piece.view(specs[i].shape)
    return out  # type: ignore[return-value]


def _empty_buffers(specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
    return [
        torch.empty(sum(specs[i].shape.numel() for i in indices), dtype=dtype,
                    device=specs[indices[0]].device)
        for dtype, indices in _dtype_groups(specs).items()
    ]


class StateRelay:
    """Point-to-point state exchange with the neighbouring span owners of one sp group.

    `previous_rank` / `next_rank` are global ranks (None at the ends of the sequence). Messages
    carry `tag`, so several relays between the same two ranks cannot take each other's messages.
    Counts the bytes this rank sends, forward and backward, for the benchmark.
    """

    def __init__(self, previous_rank: int | None, next_rank: int | None, tag: int = 0):
        self.previous_rank = previous_rank
        self.next_rank = next_rank
        self.tag = tag
        self._pending: list[dist.Work] = []
        self.bytes_sent = 0
        self.wait_seconds = 0.0  # blocked in receives: the wavefront's idle time on this rank

    def _isend(self, buffers: Sequence[torch.Tensor], destination: int) -> None:
        for buffer in buffers:
            self._pending.append(dist.isend(buffer, dst=destination, tag=self.tag))
            self.bytes_sent += buffer.numel() * buffer.element_size()

    def _recv(self, buffers: Sequence[torch.Tensor], source: int) -> None:
        start = time.perf_counter()
        for buffer in buffers:
            dist.recv(buffer, src=source, tag=self.tag)
        self.wait_seconds += time.perf_counter() - start

    def finish(self) -> None:
        """Wait for every send still in flight."""
        for work in self._pending:
            work.wait()
        self._pending.clear()

    def receive(self, template: LayerState, anchor: torch.Tensor) -> LayerState:
        """The state sent by the previous span owner, shaped like `template` (same keys)."""
        if self.previous_rank is None:
            raise RuntimeError("the first span owner has no previous rank to receive from")
        keys = sorted(template)
        specs = [_spec(template[key]) for key in keys]
        tensors = _ReceiveState.apply(self, specs, anchor)
        return dict(zip(keys, tensors))

    def send(self, state: LayerState, anchor: torch.Tensor) -> torch.Tensor:
        """Start sending `state` to the next span owner; add the returned zero to the loss."""
        if self.next_rank is None:
            raise RuntimeError("the last span owner has no next rank to send to")
        keys = sorted(state)
        return _SendState.apply(self, anchor, *(state[key] for key in keys))

    def discard(self, state: LayerState, anchor: torch.Tensor) -> torch.Tensor:
        """The last span owner's outgoing state: a zero (add it to the loss) whose backward gives
        every state tensor a zero gradient, as `send`'s backward gives them their gradients.

        Every span owner then runs the same backward graph, module by module; ZeRO-3 checks that
        the modules it gathers parameters for come in the same order on every rank."""
        keys = sorted(state)
        return _DiscardState.apply(anchor, *(state[key] for key in keys))


class _ReceiveState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, relay: StateRelay, specs: list[TensorSpec], anchor: torch.Tensor):
        buffers = _empty_buffers(specs)
        relay._recv(buffers, relay.previous_rank)
        ctx.relay = relay
        ctx.specs = specs
        ctx.anchor_dtype = anchor.dtype
        return tuple(_unpack(buffers, specs))

    @staticmethod
    def backward(ctx, *grads):
        grads = [torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device) if g is None else g
                 for g, spec in zip(grads, ctx.specs)]
        ctx.relay._isend(_pack(grads), ctx.relay.previous_rank)
        return None, None, torch.zeros((), dtype=ctx.anchor_dtype)


class _SendState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, relay: StateRelay, anchor: torch.Tensor, *state: torch.Tensor):
        relay._isend(_pack([t.detach() for t in state]), relay.next_rank)
        ctx.relay = relay
        ctx.specs = [_spec(t) for t in state]
        return torch.zeros((), dtype=anchor.dtype, device=anchor.device)

    @staticmethod
    def backward(ctx, _grad_zero):
        buffers = _empty_buffers(ctx.specs)
        ctx.relay._recv(buffers, ctx.relay.next_rank)
        return (None, None, *_unpack(buffers, ctx.specs))


class _DiscardState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *state: torch.Tensor):
        ctx.specs = [_spec(t) for t in state]
        return torch.zeros((), dtype=anchor.dtype, device=anchor.device)

    @staticmethod
    def backward(ctx, _grad_zero):
        return (None, *(torch.zeros(spec.shape, dtype=spec.dtype, device=spec.device) for spec in ctx.specs))
