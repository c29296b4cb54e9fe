"""Analytic training FLOPs per token (forward + backward), for MFU.

Counted: every matmul (2 FLOPs per multiply-add), including the LM head, the attention scores
and weighted sums over the keys a query actually sees, and the memory's inner loop. Not counted:
element-wise work (norms, activations, gates, RoPE, softmax) and the embedding lookup. Backward is
taken as twice the forward, so training = 3 x forward.

Memory inner loop, per token and memory head, with P = sum of the memory MLP's d_out * d_in and
chunk size b (the chunked form of DESIGN section 3):
  2P forward of M at k, 2P back-propagated errors, 4P the chunk-end weight and momentum updates
  (amortised over the chunk), 2P retrieval through the chunk-start weights, and for
  retrieve="token" the dual-form corrections 2 b * sum(d_in + d_out) (b x b scores times blocks).
MAC adds the retrieval of h with fixed weights (2P) and the keys/values of the h tokens.
"""

from __future__ import annotations

from .config import TitansConfig

ATTENTION_VARIANTS = ("mac", "mag", "mal", "transformer", "swa")


def memory_layer_widths(config: TitansConfig) -> list[tuple[int, int]]:
    """(d_out, d_in) of each memory MLP layer."""
    d = config.memory_head_dim
    widths = [d] + [config.memory_expansion * d] * (config.memory_depth - 1) + [d]
    return [(d_out, d_in) for d_in, d_out in zip(widths[:-1], widths[1:])]


def linear_parameter_count(config: TitansConfig) -> int:
    """Weights of every nn.Linear in a TitansLM (LM head included, tied or not)."""
    dim, variant = config.dim, config.variant
    per_layer = 3 * dim * config.mlp_hidden + 2 * dim * dim  # SwiGLU + output gate and projection
    if variant in ATTENTION_VARIANTS:
        per_layer += 3 * dim * dim
    if config.has_memory:
        per_layer += 3 * dim * dim + 3 * dim * config.memory_heads
    if variant in ("mac", "mal"):
        per_layer += dim * dim  # MAC's attention output projection, MAL's memory projection
    return config.n_layers * per_layer + dim * config.vocab_size


def mean_visible_keys(config: TitansConfig, seq_len: int) -> float:
    """Keys (persistent included) an average query attends to in a sequence of seq_len tokens."""
    variant = config.variant
    if variant == "mac":
        # h tokens and segment tokens, both causal within the segment.
        visible = sum(2 * (t % config.segment_len + 1) for t in range(seq_len))
    elif config.attention_window is not None:
        visible = sum(min(t + 1, config.attention_window) for t in range(seq_len))
    else:
        visible = seq_len * (seq_len + 1) // 2
    return visible / seq_len + config.persistent_tokens


def flops_per_token(config: TitansConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token for sequences of seq_len tokens."""
    dim = config.dim
    forward = 2.0 * linear_parameter_count(config)
    per_layer = 0.0
    if config.variant in ATTENTION_VARIANTS:
        per_layer += 4.0 * dim * mean_visible_keys(config, seq_len)
    if config.has_memory:
        widths = memory_layer_widths(config)
        inner_params = sum(d_out * d_in for d_out, d_in in widths)
        per_head = 10.0 * inner_params
        if config.retrieve == "token":
            per_head += 2.0 * config.chunk_size * sum(d_out + d_in for d_out, d_in in widths)
        if config.variant == "mac":
            per_head += 2.0 * inner_params
            per_layer += 2.0 * 3 * dim * dim  # h's keys and values, the x-stream memory query
        per_layer += config.memory_heads * per_head
    forward += config.n_layers * per_layer
    return 3.0 * forward
