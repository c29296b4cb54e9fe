"""TitansConfig: every hyper-parameter of a TitansLM, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa")
MEMORY_VARIANTS = ("lmm", "mac", "mag", "mal")
WINDOWED_VARIANTS = ("swa", "mag", "mal")
PERSISTENT_VARIANTS = ("mac", "mag", "mal")
MEMORY_ACTIVATIONS = ("silu", "gelu")
RETRIEVE_MODES = ("token", "chunk")
MAG_GATE_ACTIVATIONS = ("sigmoid", "silu")
# SwiGLU hidden widths are rounded up to this multiple so they split evenly over tensor ranks.
MLP_MULTIPLE_OF = 32


@dataclass
class TitansConfig:
    """Defaults describe the paper's smallest MAC model (~150M parameters with a 32000 vocabulary);
    tiny configs (dim 16-64, 2 layers) work too.

    Optional fields left at None are derived: `n_memory_heads` = `n_heads`, `mlp_hidden_dim` =
    8/3 * dim rounded up to a multiple of 32.
    """

    variant: str = "mac"
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_hidden_dim: Optional[int] = None
    # neural memory (DESIGN section 3)
    n_memory_heads: Optional[int] = None
    memory_depth: int = 2
    memory_expansion: int = 4
    memory_activation: str = "silu"
    memory_residual: bool = True
    chunk_size: int = 64
    retrieve: str = "token"
    conv_kernel: int = 4
    # Inner learning rate theta = theta_max * sigmoid(.). A chunk sums up to chunk_size gradients
    # taken at the same weights, so when its keys align one chunk steps by ~ theta * chunk_size /
    # (1 - eta), and training pushes eta towards 1. At chunk 64, 0.03 diverged for MAC and 0.01
    # for MAL; 0.002 trained as well and stayed finite (docs/model.md, "Stability").
    # Scale theta_max ~ 1 / chunk_size when changing chunk_size.
    theta_max: float = 0.002
    # A bound c on each token's surprise (the inner-loss gradient, all memory layers together):
    # u_t is scaled by min(1, c / ||u_t||), not differentiated. 0 = the paper's update (no bound).
    # A deviation from the paper, a stabiliser for larger theta_max (kernels/memory_scan/README.md,
    # "The surprise bound").
    surprise_bound: float = 0.0
    theta_bias_init: float = 0.0
    eta_bias_init: float = 0.0
    alpha_bias_init: float = -5.0
    # Ablations of the update (paper Table 5). False removes the term exactly: no momentum is
    # eta = 0 (S_t = -theta_t * grad), no weight decay is alpha = 0 (M_t = M_{t-1} + S_t).
    memory_momentum: bool = True
    memory_decay: bool = True
    # attention
    segment_len: int = 128
    window: int = 512
    n_persistent: int = 4
    rope_base: float = 10000.0
    mag_gate_activation: str = "sigmoid"
    # model
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def memory_heads(self) -> int:
        return self.n_heads if self.n_memory_heads is None else self.n_memory_heads

    @property
    def memory_head_dim(self) -> int:
        return self.dim // self.memory_heads

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_dim is not None:
            return self.mlp_hidden_dim
        return MLP_MULTIPLE_OF * math.ceil(8 * self.dim / 3 / MLP_MULTIPLE_OF)

    @property
    def has_memory(self) -> bool:
        return self.variant in MEMORY_VARIANTS

    @property
    def persistent_tokens(self) -> int:
        """Persistent tokens actually used: the baselines have none."""
        return self.n_persistent if self.variant in PERSISTENT_VARIANTS else 0

    @property
    def attention_window(self) -> Optional[int]:
        """Keys a query may see (itself included); None is full causal attention."""
        return self.window if self.variant in WINDOWED_VARIANTS else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TitansConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(key, values[key], "unknown field", f"use one of {sorted(known)}")
        return cls(**values)

    def validate(self) -> None:
        def need(ok: bool, field: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(field, getattr(self, field), problem, fix)

        need(self.variant in VARIANTS, "variant", "unknown variant", f"use one of {VARIANTS}")
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "memory_depth",
                      "memory_expansion", "chunk_size", "conv_kernel", "segment_len", "window"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
                 "must be an integer >= 1", f"set {field} to a positive integer")
        need(self.dim % self.n_heads == 0, "n_heads", f"dim={self.dim} is not divisible by it",
             "choose n_heads dividing dim")
        need(self.head_dim % 2 == 0, "n_heads", f"head_dim=dim/n_heads={self.head_dim} is odd, "
             "RoPE rotates pairs of features", "choose n_heads so that dim/n_heads is even")
        if self.n_memory_heads is not None:
            need(isinstance(self.n_memory_heads, int) and self.n_memory_heads >= 1,
                 "n_memory_heads", "must be an integer >= 1 (or None for n_heads)",
                 "set a positive integer or leave it unset")
        need(self.dim % self.memory_heads == 0, "n_memory_heads",
             f"dim={self.dim} is not divisible by {self.memory_heads} memory heads",
             "choose n_memory_heads dividing dim")
        if self.mlp_hidden_dim is not None:
            need(isinstance(self.mlp_hidden_dim, int) and self.mlp_hidden_dim >= 1,
                 "mlp_hidden_dim", "must be an integer >= 1 (or None for 8/3 * dim)",
                 "set a positive integer or leave it unset")
        need(self.memory_activation in MEMORY_ACTIVATIONS, "memory_activation",
             "unknown activation", f"use one of {MEMORY_ACTIVATIONS}")
        need(self.retrieve in RETRIEVE_MODES, "retrieve", "unknown retrieve mode",
             f"use one of {RETRIEVE_MODES}")
        need(self.mag_gate_activation in MAG_GATE_ACTIVATIONS, "mag_gate_activation",
             "unknown activation", f"use one of {MAG_GATE_ACTIVATIONS}")
        need(isinstance(self.n_persistent, int) and self.n_persistent >= 0, "n_persistent",
             "must be an integer >= 0", "set 0 to disable persistent tokens")
        if self.variant == "mac":
            need(self.segment_len % self.chunk_size == 0, "segment_len",
                 f"not a multiple of chunk_size={self.chunk_size}, so memory chunks would "
                 "straddle MAC segments", "make segment_len a multiple of chunk_size")
        for field in ("theta_max", "rope_base", "norm_eps", "init_std"):
            need(getattr(self, field) > 0, field, "must be > 0", f"set {field} to a positive number")
        bound = self.surprise_bound
        need(isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound >= 0,
             "surprise_bound", "must be a finite number >= 0", "set 0 (no bound) or a positive bound such as 1.0")
