"""Sequence parallelism in lockstep for linear memory: `parallel.sp_schedule = "scan"`.

The relay schedule (`sequence_parallel.py`) makes span owner r wait for r-1's whole layer before
it starts its own: a wavefront. For a depth-1 memory whose keys, values and gates depend only on
the layer input (lmm, mag, mal; not mac) every sp rank can instead run the same layer at the same
time. Per layer, on every rank:

1. tails: the conv tails of q/k/v (and the attention key/value tail of mag/mal) this span leaves
   depend only on its own input, so each rank sends its own to r+1 and then receives r-1's: one
   hop, all ranks at once (for mal the attention tail is taken from the memory's output, after
   step 3, the same way);
2. memory state: the span's effect on X = [W | S] is affine, X_out = X_in A + b
   (`titans_train.kernels.memory_scan.span_map`, in closed form per chunk). Every rank but the last
   computes its (A, b) at the same time; then the incoming states are found by a scan over the
   ranks of these maps: rank r receives X_in from r-1, sends X_in A_r + b_r to r+1. Each hop is
   one (d x 2d) @ (2d x 2d) product per head, not a span;
3. the span runs with its incoming state (`TitansBlock.forward(..., exchange=...)`, the model's
   `StateExchange` seam supplies steps 1 and 2 at the moment the layer has the keys they need).

Why a chain of point-to-point hops and not the all-gather of `scan_memory_scan`: every message
goes r -> r+1 forward and r+1 -> r backward, like the relay, so the schedule cannot deadlock
whatever order autograd runs the backward in (a collective mixed with the tail exchanges would
need every sp rank to reach it in the same order), and a hop carries one state (B, Hm, d, 2d)
instead of all P maps (B, Hm, 2d, 2d) each way. The scan's sequential part is P-1 hops of one
small product, not P-1 spans. Each message has its own tag (layer, call), so messages between two
neighbours pair up by tag, independent of the order autograd reaches them in backward.

Costs against the relay: the map per layer, 0.5x (d = 16) to 1.4x (d = 64) the span's
memory_scan forward + backward (none on the last rank), and P-1 hops per layer and direction; the layer's projections
are not recomputed (the hooks receive the layer's own keys). Gains: no wavefront idle time,
(P-1)/(L+P-1) of the step with the relay.
Activation checkpointing would repeat the exchanges during recomputation and is refused.
"""

from __future__ import annotations

import torch

from titans_train.parallel.context import ParallelContext
from titans_train.kernels.memory_scan.span_map import span_affine_map
from titans_train.parallel.relay import StateRelay
from titans_train.parallel.sequence_parallel import (
    StepLoss,
    initial_state_zero,
    relay_anchor,
    span_bounds,
    span_step_loss,
)
from titans_train.parallel.validation import validate_sequence_parallel

# Exchanges per layer: attention tail, conv tails, memory state (mag: that order; mal: conv,
# memory, attention). Tags are 1 + layer * MESSAGES_PER_LAYER + call.
MESSAGES_PER_LAYER = 4


class RelayGroup:
    """The relays of one step (one per message), used like a `StateRelay` in `StepLoss`:
    `finish()` after backward; `bytes_sent` and `wait_seconds` summed over them."""

    def __init__(self, previous_rank: int | None, next_rank: int | None):
        self.previous_rank = previous_rank
        self.next_rank = next_rank
        self.relays: list[StateRelay] = []

    def new(self, tag: int) -> StateRelay:
        relay = StateRelay(self.previous_rank, self.next_rank, tag)
        self.relays.append(relay)
        return relay

    def finish(self) -> None:
        for relay in self.relays:
            relay.finish()

    @property
    def bytes_sent(self) -> int:
        return sum(relay.bytes_sent for relay in self.relays)

    @property
    def wait_seconds(self) -> float:
        return sum(relay.wait_seconds for relay in self.relays)


class LockstepExchange:
    """The model's `StateExchange` for one rank and one forward (see the module docstring).

    `relay_zeros` collects the sends' zeros: add it to the loss, or their backward never runs.
    """

    def __init__(self, relays: RelayGroup, anchor: torch.Tensor):
        self.relays = relays
        self.anchor = anchor  # 0-dim, requires grad: makes autograd record every receive
        self.relay_zeros = anchor.new_zeros(())
        self._layer = 0
        self._calls = 0

    def start_layer(self, index: int) -> None:
        self._layer, self._calls = index, 0

    def _relay(self) -> StateRelay:
        if self._calls == MESSAGES_PER_LAYER:
            raise RuntimeError(f"layer {self._layer} asked for more than {MESSAGES_PER_LAYER} exchanges")
        tag = 1 + self._layer * MESSAGES_PER_LAYER + self._calls
        self._calls += 1
        return self.relays.new(tag)

    def _send(self, relay: StateRelay, state: dict[str, torch.Tensor]) -> None:
        if relay.next_rank is not None:
            self.relay_zeros = self.relay_zeros + relay.send(state, self.anchor)

    def exchange_tails(self, outgoing, incoming):
        relay = self._relay()
        # Send first: our tail does not depend on the one we receive, so no rank waits on a chain.
        self._send(relay, outgoing)
        if relay.previous_rank is None:
            return incoming  # the first span starts from the layer's initial (zero) tails
        return relay.receive(incoming, self.anchor)

    def incoming_memory(self, memory, keys, values, theta, eta, alpha, weights, momentum):
        if len(weights) != 1:
            raise ValueError(f"the scan schedule needs a linear memory (memory_depth 1), got depth "
                             f"{len(weights)}; use parallel.sp_schedule=relay")
        relay = self._relay()
        head_dim = keys.shape[-1]
        if relay.next_rank is not None:  # before the receive: every rank builds its map at once
            linear, offset = span_affine_map(keys, values, theta, eta, alpha,
                                             chunk_size=memory.chunk_size, residual=memory.residual)
        state = torch.cat([weights[0], momentum[0]], dim=-1)  # (B, Hm, d, 2d): [W | S]
        if relay.previous_rank is not None:
            state = relay.receive({"memory": state}, self.anchor)["memory"]
        if relay.next_rank is not None:
            self._send(relay, {"memory": state @ linear + offset})
        return (state[..., :head_dim],), (state[..., head_dim:],)


def forward_span_lockstep(model, input_ids: torch.Tensor, position: int, relays: RelayGroup,
                          anchor: torch.Tensor, telemetry: dict[str, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of this rank's span (B, S, V_local) and the sum of the relay zeros (0-dim).

    `input_ids` (B, S) are the span's tokens, starting at absolute `position`.
    """
    batch = input_ids.shape[0]
    hidden = model.embed_tokens(input_ids)  # (B, S, D)
    exchange = LockstepExchange(relays, anchor)
    for index, layer in enumerate(model.layers):
        incoming = None  # the first span starts from the layer's own initial state
        if relays.previous_rank is not None:
            # Shapes only: the exchange supplies every part (the open-block parts are empty).
            incoming = layer.empty_state(batch, position, hidden.device, hidden.dtype)
            exchange.relay_zeros = exchange.relay_zeros + initial_state_zero(layer, batch, hidden)
        exchange.start_layer(index)
        hidden, _ = layer(hidden, incoming, position, telemetry, exchange=exchange)
    return model.final_logits(hidden), exchange.relay_zeros


def scan_schedule_loss(model, tokens: torch.Tensor, context: ParallelContext, token_loss_fn,
                       return_telemetry: bool = False) -> StepLoss:
    """`sequence_parallel_loss` with the lockstep schedule (never activation-checkpointed: the
    config refuses it), same `StepLoss`."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    batch, seq_len = inputs.shape
    # The config was validated for train.seq_len; a call of another length (evaluation) must
    # still give chunk-aligned spans: the exchange carries no open block (the relay would).
    validate_sequence_parallel(model.config, context.sp_size, seq_len)
    start, stop = span_bounds(seq_len, context)
    relays = RelayGroup(context.sp_previous_rank, context.sp_next_rank)
    anchor = relay_anchor(model)
    telemetry = {} if return_telemetry else None
    logits, relay_zeros = forward_span_lockstep(model, inputs[:, start:stop], start, relays, anchor,
                                                telemetry)
    span_loss_sum = token_loss_fn(logits, labels[:, start:stop]).float().sum()
    return span_step_loss(span_loss_sum, relay_zeros, relays, context, batch, seq_len, telemetry)
