"""The public `memory_scan`: checks its inputs, picks the compute dtype, runs a kernel."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .chunked import chunked_scan
from .cpu import cpp_scan, extension_loads
from .fused import fused_scan
from .mlp import ACTIVATIONS

RETRIEVE_MODES = ("token", "chunk")
# triton: imported on use
IMPLEMENTATIONS = {"fused": fused_scan, "autograd": chunked_scan, "cpp": cpp_scan, "triton": None}
AUTO = "auto"  # triton on CUDA (where it supports the inputs), cpp on CPU (fused if it cannot load), fused elsewhere
TRITON_DEPTHS = (1, 2)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_scan():
    """The Triton implementation, imported on first use: TRITON_INTERPRET is read when its kernels are defined."""
    try:
        from .triton import triton_scan
    except ImportError as error:
        raise ValueError(f"implementation='triton' needs the triton package ({error}); pip install triton") from error
    return triton_scan


def _resolve_implementation(implementation, tensors, depth):
    """`auto`: triton for CUDA inputs it supports (depth 1-2, fp32/bf16/fp16), cpp for CPU tensors
    (every dtype, computed in fp32 or fp64) when the extension loads, fused otherwise."""
    if implementation == AUTO:
        supported = depth in TRITON_DEPTHS and all(x.dtype in TRITON_DTYPES for x in tensors)
        if tensors[0].is_cuda and supported:
            return "triton"
        return "cpp" if tensors[0].device.type == "cpu" and extension_loads() else "fused"
    return implementation


def _check_triton_inputs(tensors, depth):
    if depth not in TRITON_DEPTHS:
        raise ValueError(f"implementation='triton' supports memory depth {TRITON_DEPTHS}, got {depth}; "
                         "use implementation='fused'")
    if any(x.dtype not in TRITON_DTYPES for x in tensors):
        raise ValueError(f"implementation='triton' takes fp32, bf16 or fp16 inputs, got "
                         f"{sorted({str(x.dtype) for x in tensors})}; use implementation='fused' for fp64")
    if not tensors[0].is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("implementation='triton' needs CUDA tensors (or TRITON_INTERPRET=1, set before the first "
                         "triton call, to interpret the kernels on CPU)")


def _check_inputs(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, implementation,
                  surprise_bound):
    if isinstance(surprise_bound, bool) or not isinstance(surprise_bound, (int, float)) or not (
            math.isfinite(surprise_bound) and surprise_bound >= 0):
        raise ValueError(f"surprise_bound must be a finite number >= 0 (0 = no bound), got {surprise_bound!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if retrieve not in RETRIEVE_MODES:
        raise ValueError(f"retrieve must be one of {RETRIEVE_MODES}, got {retrieve!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if implementation != AUTO and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be {AUTO!r} or one of {tuple(IMPLEMENTATIONS)}, got {implementation!r}")
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    if any(not isinstance(x, torch.Tensor) for x in tensors):
        raise ValueError("q, k, v, theta, eta, alpha and every weights/momentum entry must be tensors")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, T, d), got {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (B, H, T) = {tuple(q.shape[:3])}, got {tuple(x.shape)}")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one layer (memory depth >= 1)")
    if len(momentum) != len(weights):
        raise ValueError(
            f"momentum must have one tensor per layer: got {len(weights)} weights and {len(momentum)} momentum"
        )
    batch, heads, _, dim = q.shape
    in_features = dim
    for layer, (weight, mom) in enumerate(zip(weights, momentum)):
        if weight.dim() != 4 or weight.shape[:2] != (batch, heads) or weight.shape[3] != in_features:
            raise ValueError(
                f"weights[{layer}] must have shape (B, H, d_out, d_in) = ({batch}, {heads}, *, {in_features}), "
                f"got {tuple(weight.shape)}"
            )
        if mom.shape != weight.shape:
            raise ValueError(
                f"momentum[{layer}] must have the shape of weights[{layer}] {tuple(weight.shape)}, "
                f"got {tuple(mom.shape)}"
            )
        in_features = weight.shape[2]
    if in_features != dim:
        raise ValueError(f"the last layer must map back to d = {dim}, but weights[-1] has d_out = {in_features}")
    if any(not x.is_floating_point() for x in tensors):
        raise ValueError("memory_scan needs floating-point inputs (fp32, fp64, bf16 or fp16)")
    if len({x.device for x in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(x.device) for x in tensors})}")
    if _resolve_implementation(implementation, tensors, len(weights)) == "triton":
        _check_triton_inputs(tensors, len(weights))


@torch.compiler.disable
def _run_kernel(kernel, sequences, gates, weights, momentum, compute_dtype, options):
    """One kernel call, outside torch.compile and autocast.

    torch.compile would unroll the chunk loop of the fused kernel (minutes of compile time) and
    cannot see into the Triton kernels; the memory state recurs over the whole sequence, so its
    products stay in the compute dtype (autocast would round the state to bf16 at every chunk).
    """
    device_type = sequences[0].device.type
    # The meta device (the planner's shape-only trace) has no autocast to leave.
    outside_autocast = (contextlib.nullcontext() if device_type == "meta"
                        else torch.autocast(device_type, enabled=False))
    with outside_autocast:
        return kernel(
            *sequences, *(x.to(compute_dtype) for x in gates),
            [w.to(compute_dtype) for w in weights], [s.to(compute_dtype) for s in momentum], *options,
        )


def memory_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    momentum: tuple[torch.Tensor, ...],
    *,
    chunk_size: int,
    retrieve: str = "token",
    activation: str = "silu",
    residual: bool = True,
    surprise_bound: float = 0.0,
    implementation: str = AUTO,
) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """Titans neural memory over a sequence: update chunk by chunk, retrieve per token (DESIGN section 3).

    q, k, v: (B, H, T, d); theta, eta, alpha: (B, H, T) (inner learning rate, momentum, forgetting);
    weights, momentum: L_M >= 1 tensors (B, H, d_out, d_in), the state at the start of the sequence.
    Returns y (B, H, T, d) and the state after the last token (weights, momentum). The last chunk
    may be short and updates like any other.

    `surprise_bound` c > 0 bounds each token's surprise u_t (the inner-loss gradient at the
    chunk-start weights, all layers together) to norm <= c: u_t is replaced by s_t u_t with
    s_t = min(1, c / ||u_t||), s_t not differentiated (a stop-gradient, like an optimiser's gradient
    clipping). A deviation from the paper (README.md here, "The surprise bound"); 0 (the default) is
    the paper's update, unchanged bit for bit.

    Half-precision inputs are computed in fp32 (fp64 if any input is fp64), also under autocast;
    y comes back in q's dtype and each state tensor in its input's dtype. `implementation`: "auto"
    (default: "triton" for CUDA inputs of depth 1-2 in fp32/bf16/fp16, "cpp" for CPU tensors when its
    extension loads, "fused" otherwise), "cpp" (kernels/memory_scan/cpu: fused's math compiled, parallel
    over (batch, head) groups; raises ExtensionBuildError if it cannot be built), "fused" (a
    hand-written backward, first-order gradients),
    "autograd" (the same closed form through autograd: slower, but differentiable to any order) or
    "triton" (kernels/memory_scan/triton: depth 1 or 2, first-order; q, k, v are read in their
    own dtype, everything is computed in fp32; on CPU only under TRITON_INTERPRET=1).
    """
    weights, momentum = tuple(weights), tuple(momentum)
    _check_inputs(q, k, v, theta, eta, alpha, weights, momentum, chunk_size, retrieve, activation, implementation,
                  surprise_bound)
    if q.shape[2] == 0:
        return q.clone(), (weights, momentum)
    tensors = (q, k, v, theta, eta, alpha, *weights, *momentum)
    compute_dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    implementation = _resolve_implementation(implementation, tensors, len(weights))
    if implementation == "triton":  # converts q, k, v in the kernel, as it loads them
        kernel, sequences = _triton_scan(), (q, k, v)
    else:
        kernel, sequences = IMPLEMENTATIONS[implementation], tuple(x.to(compute_dtype) for x in (q, k, v))
    y, weights_out, momentum_out = _run_kernel(
        kernel, sequences, (theta, eta, alpha), weights, momentum, compute_dtype,
        (chunk_size, retrieve, activation, residual, float(surprise_bound)),
    )
    return y.to(q.dtype), (
        tuple(w.to(ref.dtype) for w, ref in zip(weights_out, weights)),
        tuple(s.to(ref.dtype) for s, ref in zip(momentum_out, momentum)),
    )
