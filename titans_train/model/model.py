"""TitansLM: embedding, pre-norm residual layers (mixer + SwiGLU), final norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .config import TitansConfig
from .errors import InputIdsError, StateMismatchError
from .exchange import StateExchange
from .init import initialize
from .layers import RMSNorm, SwiGLU
from .mixers import build_mixer

LayerState = dict[str, torch.Tensor]
GATE_PROJECTIONS = ("theta_proj", "eta_proj", "alpha_proj")


@dataclass
class ModelState:
    """Everything needed to continue a sequence: tokens consumed so far and one dict per layer."""

    position: int
    layers: list[LayerState]

    def detach(self) -> "ModelState":
        return ModelState(self.position, [{name: value.detach() for name, value in layer.items()}
                                          for layer in self.layers])


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    state: ModelState
    # "layers.{i}.memory.{theta,eta,alpha,update_norm}" -> detached 0-dim tensors, when asked for.
    telemetry: Optional[dict[str, torch.Tensor]] = field(default=None)


class TitansBlock(nn.Module):
    """x + Mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: TitansConfig, index: int):
        super().__init__()
        self.index = index
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = build_mixer(config)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_hidden)

    def state_shapes(self, batch_size: int, position: int) -> dict[str, tuple[int, ...]]:
        return self.mixer.state_shapes(batch_size, position)

    def empty_state(self, batch_size: int, position: int, device=None, dtype=None) -> LayerState:
        """Zeros shaped like the state after `position` tokens (receive buffers)."""
        dtype = dtype or torch.get_default_dtype()
        return {name: torch.zeros(shape, device=device, dtype=dtype)
                for name, shape in self.state_shapes(batch_size, position).items()}

    def initial_state(self, batch_size: int, device=None, dtype=None) -> LayerState:
        """The state at position 0 (learned initial memory weights, empty tails)."""
        return self.mixer.initial_state(batch_size, device, dtype or torch.get_default_dtype())

    def check_state(self, layer_state: LayerState, batch_size: int, position: int) -> None:
        expected = self.state_shapes(batch_size, position)
        if not isinstance(layer_state, dict) or set(layer_state) != set(expected):
            got = sorted(layer_state) if isinstance(layer_state, dict) else type(layer_state).__name__
            raise StateMismatchError(
                f"layer {self.index}: state has keys {got}, this layer expects {sorted(expected)}; "
                "pass a state produced by a model with the same config (or None to start a sequence)")
        for name, shape in expected.items():
            if tuple(layer_state[name].shape) != shape:
                raise StateMismatchError(
                    f"layer {self.index}: state[{name!r}] has shape {tuple(layer_state[name].shape)}, "
                    f"expected {shape} for batch size {batch_size} at position {position}; pass the "
                    "state of the same config, batch and position (or None to start a sequence)")

    def forward(
        self,
        hidden: torch.Tensor,
        layer_state: Optional[LayerState] = None,
        position: int = 0,
        telemetry: Optional[dict[str, torch.Tensor]] = None,
        exchange: Optional[StateExchange] = None,
    ) -> tuple[torch.Tensor, LayerState]:
        """hidden (B, T, D) continuing `layer_state` after `position` tokens -> hidden, new state.

        `exchange` (see `exchange.py`; not for mac) supplies the tails and the incoming memory
        state through hooks, late; `layer_state` must still have the right shapes.
        """
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise StateMismatchError(f"position must be an int >= 0, got {position!r}")
        batch_size = hidden.shape[0]
        if layer_state is None:
            if position != 0:
                raise StateMismatchError(
                    f"layer {self.index}: no state given at position {position}; a state may be "
                    "omitted only at position 0")
            layer_state = self.initial_state(batch_size, hidden.device, hidden.dtype)
        else:
            self.check_state(layer_state, batch_size, position)
        stats = {} if telemetry is not None else None  # memory call index -> statistics
        mixed, new_state = self.mixer(self.mixer_norm(hidden), layer_state, position, stats, exchange=exchange)
        hidden = hidden + mixed
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        if stats:
            for name in stats[0]:
                telemetry[f"layers.{self.index}.memory.{name}"] = torch.stack([s[name] for s in stats.values()]).mean()
        return hidden, new_state


class TitansLM(nn.Module):
    def __init__(self, config: TitansConfig, init_seed: Optional[int] = None):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TitansBlock(config, index) for index in range(config.n_layers))
        self.final_norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.init_weights(init_seed)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise every parameter by the layout-independent rule of `init.py` (docs/model.md).

        `seed` None draws one from torch's global generator (so `torch.manual_seed` decides it). A
        model on the meta device is left unfilled: `titans_train.parallel.construction`
        materialises only this rank's part of it, by the same rule.
        """
        if any(parameter.is_meta for parameter in self.parameters()):
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        initialize(self, seed)

    # -- layer-level API (sequence parallelism, activation checkpointing) ----------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D); ids are checked against the vocabulary."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InputIdsError(f"input_ids must be an integer tensor, got "
                                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}; "
                                "pass token ids as a LongTensor")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputIdsError(f"input_ids must have shape (batch, seq_len) with seq_len >= 1, got "
                                f"{tuple(input_ids.shape)}; add a batch dimension with input_ids[None]")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise InputIdsError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), "
                                f"got values in [{low}, {high}]; check the tokenizer matches the model")
        return self.embedding(input_ids)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))

    def empty_state(self, batch_size: int, position: int, device=None, dtype=None) -> ModelState:
        return ModelState(position, [layer.empty_state(batch_size, position, device, dtype)
                                     for layer in self.layers])

    def forward(self, input_ids: torch.Tensor, state: Optional[ModelState] = None,
                return_telemetry: bool = False) -> ModelOutput:
        hidden = self.embed_tokens(input_ids)
        if state is None:
            position, layer_states = 0, [None] * len(self.layers)
        elif not isinstance(state, ModelState):
            raise StateMismatchError(f"state must be a ModelState (from a previous call's out.state), "
                                     f"got {type(state).__name__}")
        elif len(state.layers) != len(self.layers):
            raise StateMismatchError(f"state has {len(state.layers)} layers, this model has "
                                     f"{len(self.layers)}; pass a state from a model with the same config")
        else:
            position, layer_states = state.position, state.layers
        telemetry = {} if return_telemetry else None
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states):
            hidden, new_state = layer(hidden, layer_state, position, telemetry)
            new_states.append(new_state)
        return ModelOutput(self.final_logits(hidden), ModelState(position + input_ids.shape[1], new_states),
                           telemetry)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay: norms, biases, the memory's gate projections."""
    parts = name.split(".")
    return (param.ndim < 2 or any(part.endswith("norm") for part in parts)
            or any(part in GATE_PROJECTIONS for part in parts))
