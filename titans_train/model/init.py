"""Initial weights that do not depend on the parallel layout.

Two rules, in one place:

- what each parameter is drawn from (`initial_distributions`, the choices of docs/model.md:
  normal(0, init_std) for embeddings and linear weights, init_std / sqrt(2 L) for residual output
  projections, ones for norms, the configured gate biases, ...), by parameter path;
- how the values are drawn (`SeededTensor`): element j of the flattened full tensor of parameter
  `path` is element j mod b of the b-long draw of a CPU generator seeded by
  sha256(seed, path, j div b), b = min(BLOCK, numel).

So any part of any tensor can be drawn alone (a tp shard, a ZeRO-3 partition, a partition of a
shard; `local_values`) and equals that part of the whole tensor drawn on one process: the
initial weights, and so the step-0 loss, are the same on every layout. The draws run on the CPU
generator whatever the training device, so a GPU run starts from the CPU run's weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

BLOCK = 1 << 16  # elements per seeded draw: small enough that a partition draws little it discards


@dataclass(frozen=True)
class Distribution:
    """normal(0, scale), uniform(-scale, scale), or the constant `scale`."""

    kind: str  # "normal" | "uniform" | "constant"
    scale: float


def initial_distributions(model: nn.Module) -> dict[str, Distribution]:
    """The distribution of every parameter of a plain `TitansLM` (any device, meta included), by
    path as `named_parameters` lists them (a tied LM head appears once, as `embedding.weight`)."""
    from .attention import Attention
    from .layers import CausalConv, HeadRMSNorm, RMSNorm
    from .memory import NeuralMemory

    config = model.config
    residual_std = config.init_std / math.sqrt(2 * config.n_layers)
    by_id: dict[int, Distribution] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = residual_std if getattr(module, "is_residual_projection", False) else config.init_std
            by_id[id(module.weight)] = Distribution("normal", std)
            if module.bias is not None:
                by_id[id(module.bias)] = Distribution("constant", 0.0)
        elif isinstance(module, nn.Embedding):
            by_id[id(module.weight)] = Distribution("normal", config.init_std)
        elif isinstance(module, (RMSNorm, HeadRMSNorm)):
            by_id[id(module.weight)] = Distribution("constant", 1.0)
        elif isinstance(module, CausalConv):
            by_id[id(module.weight)] = Distribution("uniform", module.init_bound)
    # After the generic pass, whose rule for the gate projections' biases (zero) these replace.
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            for gate, bias in module.gate_bias_inits.items():
                by_id[id(getattr(module, gate).bias)] = Distribution("constant", float(bias))
            for weight in module.initial_weights:
                by_id[id(weight)] = Distribution("normal", weight.shape[-1] ** -0.5)
        elif isinstance(module, Attention) and module.persistent_keys is not None:
            # The scale of a key projected from a unit-RMS token by an init_std matrix.
            std = config.init_std * math.sqrt(config.dim)
            by_id[id(module.persistent_keys)] = Distribution("normal", std)
            by_id[id(module.persistent_values)] = Distribution("normal", std)
    named = dict(model.named_parameters())
    missing = [path for path, parameter in named.items() if id(parameter) not in by_id]
    if missing:
        raise RuntimeError(f"no initialisation rule for {missing}; add one to titans_train/model/init.py")
    return {path: by_id[id(parameter)] for path, parameter in named.items()}


def _block_seed(seed: int, path: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{path}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededTensor:
    """The full initial tensor of one parameter, drawn on demand: `span(start, stop)` is its
    flattened elements [start, stop) (fp32, 1-D). Keeps the last drawn block, so consecutive
    short spans (the rows of a dim-1 shard) draw each block once."""

    def __init__(self, distribution: Distribution, seed: int, path: str, numel: int):
        self.distribution = distribution
        self.seed = seed
        self.path = path
        self.block = max(1, min(BLOCK, numel))
        self._cached: tuple[int, torch.Tensor] | None = None

    def _draw(self, index: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != index:
            # Always a whole block: torch's vectorised normal_ gives other values for other lengths.
            generator = torch.Generator().manual_seed(_block_seed(self.seed, self.path, index))
            if self.distribution.kind == "normal":
                values = torch.randn(self.block, generator=generator).mul_(self.distribution.scale)
            else:
                values = torch.rand(self.block, generator=generator).mul_(2).sub_(1).mul_(self.distribution.scale)
            self._cached = (index, values)
        return self._cached[1]

    def span(self, start: int, stop: int) -> torch.Tensor:
        if self.distribution.kind == "constant":
            return torch.full((stop - start,), self.distribution.scale)
        if self.distribution.kind not in ("normal", "uniform"):
            raise ValueError(f"{self.path}: unknown distribution {self.distribution.kind!r}")
        pieces = []
        for index in range(start // self.block, -(-stop // self.block)):
            offset = index * self.block
            pieces.append(self._draw(index)[max(start, offset) - offset: min(stop, offset + self.block) - offset])
        return torch.cat(pieces) if pieces else torch.empty(0)


def given_tensor(tensor: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """The `span` of a tensor that is already whole (weights from `train.init_from`)."""
    flat = tensor.detach().reshape(-1)
    return lambda start, stop: flat[start:stop].float()


@dataclass(frozen=True)
class Shard:
    """The part of a full tensor one rank holds: indices [start, stop) along `dim`, every index
    of the other dims. `stop` may pass the full size: the rows beyond are padding, zeros (the
    vocabulary padded to a multiple of tp)."""

    dim: int
    start: int
    stop: int


def local_values(span: Callable[[int, int], torch.Tensor], full_shape: tuple[int, ...],
                 shard: Optional[Shard], start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened local tensor (`shard` of the full tensor of
    `full_shape`, or the whole tensor), fp32 1-D, from `span` (`SeededTensor.span`, `given_tensor`).

    The full tensor is viewed as (outer, N, inner) around `shard.dim`; the local one is
    (outer, n, inner), n = stop - start of the shard, so each outer index is one contiguous run
    of n * inner local elements, read from the full tensor at one contiguous place.
    """
    if shard is None:
        shard = Shard(0, 0, full_shape[0] if full_shape else 1)
    full_rows = full_shape[shard.dim] if full_shape else 1
    inner = math.prod(full_shape[shard.dim + 1:])
    run = (shard.stop - shard.start) * inner  # local elements per outer index
    real = max(0, min(full_rows, shard.stop) - shard.start) * inner  # of which not padding
    pieces = []
    position = start
    while position < stop:
        index, within = divmod(position, run)
        end = min(stop, (index + 1) * run)
        length = end - position
        base = index * full_rows * inner + shard.start * inner
        drawn = max(0, min(end - index * run, real) - within)
        if drawn:
            pieces.append(span(base + within, base + within + drawn))
        if length - drawn:
            pieces.append(torch.zeros(length - drawn))
        position = end
    return torch.cat(pieces) if pieces else torch.zeros(0)


def initialize(model: nn.Module, seed: int) -> None:
    """Fill every parameter of a plain (unsharded, materialised) `TitansLM` from its rule."""
    with torch.no_grad():
        for path, distribution in initial_distributions(model).items():
            parameter = model.get_parameter(path)
            values = SeededTensor(distribution, seed, path, parameter.numel()).span(0, parameter.numel())
            parameter.copy_(values.view(parameter.shape))


__all__ = ["BLOCK", "Distribution", "SeededTensor", "Shard", "given_tensor", "initial_distributions",
           "initialize", "local_values"]
