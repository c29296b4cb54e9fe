"""Triton kernels of the chunked memory scan: one program per (batch, head) walks all chunks.

The math is README.md ("Closed form per chunk", "The backward"); names follow it: W, S the
chunk-start weights and momentum of a layer, k/a the store pass's layer inputs, err the errors
delta, A/E the retrieval decays, C the update scores C[t, i] theta_i, c/m the state rows.
Layer 1 maps d -> O1 (O1 = d for depth 1, the hidden width for depth 2), layer 2 maps hidden -> d.
The state of every layer stays in registers across the whole sequence; the forward stores each
chunk's start state for the backward, which recomputes the chunk's intermediates from it (one
extra forward's worth of FLOPs instead of saving O(n^2 + n d) per chunk).
Inputs are loaded in their dtype and computed in fp32 (the interpreter cannot do bf16 arithmetic,
and the inner recurrence needs fp32 anyway); y and the input gradients are stored in their
tensors' dtypes.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _configs():
    """H100-class search space; the interpreter gets one config (autotuning would rerun it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (8, 1), (8, 2), (16, 1))]


_KEY = ["D", "O1", "H2", "CHUNK", "DEPTH", "TOKEN", "BOUNDED"]


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(x)
        return s + x * s * (1.0 - s)
    return 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def _act_grad2(x, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.sigmoid(x)
        return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
    return tl.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cast_for_store(x, dtype: tl.constexpr):
    """fp32 -> dtype; bf16 rounds to nearest even by bit arithmetic, because the interpreter's
    conversion truncates (GPUs round to nearest: the same bits). NaN stays NaN, overflow gives inf."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_matrix(p, ROWS: tl.constexpr, COLS: tl.constexpr, B_R: tl.constexpr, B_C: tl.constexpr):
    """A row-major (ROWS, COLS) fp32 block, zero outside."""
    o_r = tl.arange(0, B_R)
    o_c = tl.arange(0, B_C)
    m = (o_r[:, None] < ROWS) & (o_c[None, :] < COLS)
    return tl.load(p + o_r[:, None] * COLS + o_c[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_matrix(p, x, ROWS: tl.constexpr, COLS: tl.constexpr, B_R: tl.constexpr, B_C: tl.constexpr):
    o_r = tl.arange(0, B_R)
    o_c = tl.arange(0, B_C)
    m = (o_r[:, None] < ROWS) & (o_c[None, :] < COLS)
    tl.store(p + o_r[:, None] * COLS + o_c[None, :], _cast_for_store(x, p.dtype.element_ty), mask=m)


@triton.jit
def _load_tokens(p, m_n, D: tl.constexpr, B_N: tl.constexpr, B_D: tl.constexpr):
    """(B_N, B_D) rows of a (T, D) tensor starting at p, rows where m_n, fp32."""
    o_n = tl.arange(0, B_N)
    o_d = tl.arange(0, B_D)
    m = m_n[:, None] & (o_d[None, :] < D)
    return tl.load(p + o_n[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_tokens(p, x, m_n, D: tl.constexpr, B_N: tl.constexpr, B_D: tl.constexpr):
    o_n = tl.arange(0, B_N)
    o_d = tl.arange(0, B_D)
    m = m_n[:, None] & (o_d[None, :] < D)
    tl.store(p + o_n[:, None] * D + o_d[None, :], _cast_for_store(x, p.dtype.element_ty), mask=m)


@triton.jit
def _load_pair(p, m_n, B_N: tl.constexpr):
    """Two columns of a (n, 2) gate tensor at p, zero on masked rows."""
    o_n = tl.arange(0, B_N)
    first = tl.load(p + o_n * 2, mask=m_n, other=0.0)
    second = tl.load(p + o_n * 2 + 1, mask=m_n, other=0.0)
    return first, second


@triton.jit
def _store_pair(p, first, second, m_n, B_N: tl.constexpr):
    o_n = tl.arange(0, B_N)
    tl.store(p + o_n * 2, first, mask=m_n)
    tl.store(p + o_n * 2 + 1, second, mask=m_n)


@triton.jit
def _load_state(w1_ptr, s1_ptr, w2_ptr, s2_ptr, index, D: tl.constexpr, O1: tl.constexpr, H2: tl.constexpr,
                B_D: tl.constexpr, B_O1: tl.constexpr, B_H2: tl.constexpr, DEPTH: tl.constexpr):
    """Layer 1 (O1, D) and layer 2 (D, H2) weights and momentum at `index` (zeros for layer 2 at depth 1)."""
    W1 = _load_matrix(w1_ptr + index * O1 * D, O1, D, B_O1, B_D)
    S1 = _load_matrix(s1_ptr + index * O1 * D, O1, D, B_O1, B_D)
    if DEPTH == 2:
        W2 = _load_matrix(w2_ptr + index * D * H2, D, H2, B_D, B_H2)
        S2 = _load_matrix(s2_ptr + index * D * H2, D, H2, B_D, B_H2)
    else:
        W2 = tl.zeros([B_D, B_H2], dtype=tl.float32)
        S2 = tl.zeros([B_D, B_H2], dtype=tl.float32)
    return W1, S1, W2, S2


@triton.jit
def _store_state(w1_ptr, s1_ptr, w2_ptr, s2_ptr, index, W1, S1, W2, S2, D: tl.constexpr, O1: tl.constexpr,
                 H2: tl.constexpr, B_D: tl.constexpr, B_O1: tl.constexpr, B_H2: tl.constexpr, DEPTH: tl.constexpr):
    _store_matrix(w1_ptr + index * O1 * D, W1, O1, D, B_O1, B_D)
    _store_matrix(s1_ptr + index * O1 * D, S1, O1, D, B_O1, B_D)
    if DEPTH == 2:
        _store_matrix(w2_ptr + index * D * H2, W2, D, H2, B_D, B_H2)
        _store_matrix(s2_ptr + index * D * H2, S2, D, H2, B_D, B_H2)


@triton.jit
def _chunk_rows(c, T, CHUNK: tl.constexpr, B_N: tl.constexpr):
    o_n = tl.arange(0, B_N)
    return (o_n < CHUNK) & (c * CHUNK + o_n < T)


@triton.jit
def _load_scores(p, m_n, CHUNK: tl.constexpr, B_N: tl.constexpr):
    o_n = tl.arange(0, B_N)
    return tl.load(p + o_n[:, None] * CHUNK + o_n[None, :], mask=m_n[:, None] & m_n[None, :], other=0.0)


@triton.jit
def _surprise_scale(squared_norm, bound):
    """s = min(1, c / ||u||) per token; the maximum only keeps the unused branch finite."""
    return tl.where(squared_norm > bound * bound, bound / tl.sqrt(tl.maximum(squared_norm, bound * bound)), 1.0)


@triton.jit
def _store_pass(k, v, W1, W2, bound, DEPTH: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                PREC: tl.constexpr, BOUNDED: tl.constexpr):
    """Errors at the chunk-start weights. Returns z1 (pre-activation), a1, carry, err1, err2, scale (n,).

    BOUNDED: err1, err2 and carry are scaled by s = min(1, bound / ||u||) (||u||^2 = sum over layers
    of ||err||^2 ||layer input||^2); the scale is not differentiated, and the backward applies it
    where err_L = out - v starts. Otherwise scale is 1.
    """
    z1 = _dot(k, tl.trans(W1), PREC)
    if DEPTH == 1:
        out = z1
    else:
        a1 = _act(z1, ACT)
        out = _dot(a1, tl.trans(W2), PREC)
    if RESIDUAL:
        out += k
    k_norm = tl.sum(k * k, axis=1)
    if DEPTH == 1:
        err1 = out - v
        scale = tl.full(k_norm.shape, 1.0, tl.float32)
        if BOUNDED:
            scale = _surprise_scale(tl.sum(err1 * err1, axis=1) * k_norm, bound)
            err1 = err1 * scale[:, None]
        return z1, z1, z1, err1, err1, scale
    err2 = out - v
    carry = _dot(err2, W2, PREC)
    err1 = carry * _act_grad(z1, ACT)
    scale = tl.full(k_norm.shape, 1.0, tl.float32)
    if BOUNDED:
        squared_norm = tl.sum(err1 * err1, axis=1) * k_norm + tl.sum(err2 * err2, axis=1) * tl.sum(a1 * a1, axis=1)
        scale = _surprise_scale(squared_norm, bound)
        err1 = err1 * scale[:, None]
        err2 = err2 * scale[:, None]
        carry = carry * scale[:, None]
    return z1, a1, carry, err1, err2, scale


@triton.jit
def _retrieve_layer(h, a, W, S, err, A, E, C, PREC: tl.constexpr):
    """Token retrieval through one layer: diag(A) h W^T + diag(E) h S^T - (C * h a^T) err."""
    gram = _dot(h, tl.trans(a), PREC)
    z = A[:, None] * _dot(h, tl.trans(W), PREC) + E[:, None] * _dot(h, tl.trans(S), PREC)
    return z - _dot(C * gram, err, PREC), gram


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def memory_scan_forward_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    rdec_ptr, scores_ptr, sdec_ptr, srows_ptr,
    w1_ptr, s1_ptr, w2_ptr, s2_ptr,
    w1_out, s1_out, w2_out, s2_out,
    w1_saved, s1_saved, w2_saved, s2_saved,
    T, D: tl.constexpr, O1: tl.constexpr, H2: tl.constexpr, CHUNK: tl.constexpr,
    NC, B_N: tl.constexpr, B_D: tl.constexpr, B_O1: tl.constexpr, B_H2: tl.constexpr,
    DEPTH: tl.constexpr, TOKEN: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    SAVE: tl.constexpr, PREC: tl.constexpr, BOUND, BOUNDED: tl.constexpr,
):
    """Grid (G,). Gates (G, NC, CHUNK[, CHUNK | 2 | 3]); states (G, d_out, d_in); saved (G, NC, d_out, d_in)."""
    i_g = tl.program_id(0).to(tl.int64)
    W1, S1, W2, S2 = _load_state(w1_ptr, s1_ptr, w2_ptr, s2_ptr, i_g, D, O1, H2, B_D, B_O1, B_H2, DEPTH)
    for c in range(NC):
        i_c = i_g * NC + c
        if SAVE:
            _store_state(w1_saved, s1_saved, w2_saved, s2_saved, i_c, W1, S1, W2, S2, D, O1, H2, B_D, B_O1, B_H2, DEPTH)
        m_n = _chunk_rows(c, T, CHUNK, B_N)
        p_tok = i_g * T * D + c * CHUNK * D
        q = _load_tokens(q_ptr + p_tok, m_n, D, B_N, B_D)
        k = _load_tokens(k_ptr + p_tok, m_n, D, B_N, B_D)
        v = _load_tokens(v_ptr + p_tok, m_n, D, B_N, B_D)
        z1, a1, carry, err1, err2, scale = _store_pass(k, v, W1, W2, BOUND, DEPTH, RESIDUAL, ACT, PREC, BOUNDED)
        if TOKEN:
            A, E = _load_pair(rdec_ptr + i_c * CHUNK * 2, m_n, B_N)
            C = _load_scores(scores_ptr + i_c * CHUNK * CHUNK, m_n, CHUNK, B_N)
            r1, gram1 = _retrieve_layer(q, k, W1, S1, err1, A, E, C, PREC)
            if DEPTH == 2:
                r2, gram2 = _retrieve_layer(_act(r1, ACT), a1, W2, S2, err2, A, E, C, PREC)
        else:
            r1 = _dot(q, tl.trans(W1), PREC)
            if DEPTH == 2:
                r2 = _dot(_act(r1, ACT), tl.trans(W2), PREC)
        if DEPTH == 1:
            y = r1
        else:
            y = r2
        if RESIDUAL:
            y += q
        _store_tokens(y_ptr + p_tok, y, m_n, D, B_N, B_D)

        cw, cm = _load_pair(srows_ptr + i_c * CHUNK * 2, m_n, B_N)
        keep_w = tl.load(sdec_ptr + i_c * 3)
        carry_s = tl.load(sdec_ptr + i_c * 3 + 1)
        keep_s = tl.load(sdec_ptr + i_c * 3 + 2)
        err1_t = tl.trans(err1)
        W1_next = keep_w * W1 + carry_s * S1 - _dot(err1_t, cw[:, None] * k, PREC)
        S1 = keep_s * S1 - _dot(err1_t, cm[:, None] * k, PREC)
        W1 = W1_next
        if DEPTH == 2:
            err2_t = tl.trans(err2)
            W2_next = keep_w * W2 + carry_s * S2 - _dot(err2_t, cw[:, None] * a1, PREC)
            S2 = keep_s * S2 - _dot(err2_t, cm[:, None] * a1, PREC)
            W2 = W2_next
    _store_state(w1_out, s1_out, w2_out, s2_out, i_g, W1, S1, W2, S2, D, O1, H2, B_D, B_O1, B_H2, DEPTH)


@triton.jit
def _retrieve_layer_backward(dz, h, a, W, S, err, A, E, C, gram, PREC: tl.constexpr):
    """Backward of `_retrieve_layer`. Returns dh, da, derr, dW, dS, dA, dE, dC (dC = d(C) only)."""
    dz_a = A[:, None] * dz
    dz_e = E[:, None] * dz
    dA = tl.sum(dz * _dot(h, tl.trans(W), PREC), axis=1)
    dE = tl.sum(dz * _dot(h, tl.trans(S), PREC), axis=1)
    dW = _dot(tl.trans(dz_a), h, PREC)
    dS = _dot(tl.trans(dz_e), h, PREC)
    dh = _dot(dz_a, W, PREC) + _dot(dz_e, S, PREC)
    minus_dscore = _dot(dz, tl.trans(err), PREC)  # (n, n): -d(C * gram)
    derr = -_dot(tl.trans(C * gram), dz, PREC)
    dC = -minus_dscore * gram
    dgram = -minus_dscore * C
    dh += _dot(dgram, a, PREC)
    da = _dot(tl.trans(dgram), h, PREC)
    return dh, da, derr, dW, dS, dA, dE, dC


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit
def memory_scan_backward_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    rdec_ptr, scores_ptr, sdec_ptr, srows_ptr,
    drdec_ptr, dscores_ptr, dsdec_ptr, dsrows_ptr,
    w1_saved, s1_saved, w2_saved, s2_saved,
    gw1_ptr, gs1_ptr, gw2_ptr, gs2_ptr,
    dw1_ptr, ds1_ptr, dw2_ptr, ds2_ptr,
    T, D: tl.constexpr, O1: tl.constexpr, H2: tl.constexpr, CHUNK: tl.constexpr,
    NC, B_N: tl.constexpr, B_D: tl.constexpr, B_O1: tl.constexpr, B_H2: tl.constexpr,
    DEPTH: tl.constexpr, TOKEN: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    PREC: tl.constexpr, BOUND, BOUNDED: tl.constexpr,
):
    """Grid (G,). g{w,s}{1,2}: gradients of the final state; d{w,s}{1,2}: those of the initial state (out)."""
    i_g = tl.program_id(0).to(tl.int64)
    dW1, dS1, dW2, dS2 = _load_state(gw1_ptr, gs1_ptr, gw2_ptr, gs2_ptr, i_g, D, O1, H2, B_D, B_O1, B_H2, DEPTH)
    for step in range(NC):
        c = NC - 1 - step
        i_c = i_g * NC + c
        m_n = _chunk_rows(c, T, CHUNK, B_N)
        p_tok = i_g * T * D + c * CHUNK * D
        W1, S1, W2, S2 = _load_state(w1_saved, s1_saved, w2_saved, s2_saved, i_c, D, O1, H2, B_D, B_O1, B_H2, DEPTH)
        q = _load_tokens(q_ptr + p_tok, m_n, D, B_N, B_D)
        k = _load_tokens(k_ptr + p_tok, m_n, D, B_N, B_D)
        v = _load_tokens(v_ptr + p_tok, m_n, D, B_N, B_D)
        dy = _load_tokens(dy_ptr + p_tok, m_n, D, B_N, B_D)
        z1, a1, carry, err1, err2, scale = _store_pass(k, v, W1, W2, BOUND, DEPTH, RESIDUAL, ACT, PREC, BOUNDED)

        # The state update: next = [A_n W + E_n S, P_n S] - err^T [c a, m a].
        cw, cm = _load_pair(srows_ptr + i_c * CHUNK * 2, m_n, B_N)
        keep_w = tl.load(sdec_ptr + i_c * 3)
        carry_s = tl.load(sdec_ptr + i_c * 3 + 1)
        keep_s = tl.load(sdec_ptr + i_c * 3 + 2)
        d_keep_w = tl.sum(tl.sum(dW1 * W1, axis=1), axis=0)
        d_carry_s = tl.sum(tl.sum(dW1 * S1, axis=1), axis=0)
        d_keep_s = tl.sum(tl.sum(dS1 * S1, axis=1), axis=0)
        g_w = _dot(err1, dW1, PREC)  # (n, d)
        g_s = _dot(err1, dS1, PREC)
        dk = -(cw[:, None] * g_w + cm[:, None] * g_s)
        dcw = -tl.sum(g_w * k, axis=1)
        dcm = -tl.sum(g_s * k, axis=1)
        derr1 = -_dot(cw[:, None] * k, tl.trans(dW1), PREC) - _dot(cm[:, None] * k, tl.trans(dS1), PREC)
        dW1_start = keep_w * dW1
        dS1_start = carry_s * dW1 + keep_s * dS1
        if DEPTH == 2:
            d_keep_w += tl.sum(tl.sum(dW2 * W2, axis=1), axis=0)
            d_carry_s += tl.sum(tl.sum(dW2 * S2, axis=1), axis=0)
            d_keep_s += tl.sum(tl.sum(dS2 * S2, axis=1), axis=0)
            g_w2 = _dot(err2, dW2, PREC)  # (n, hidden)
            g_s2 = _dot(err2, dS2, PREC)
            da1 = -(cw[:, None] * g_w2 + cm[:, None] * g_s2)
            dcw -= tl.sum(g_w2 * a1, axis=1)
            dcm -= tl.sum(g_s2 * a1, axis=1)
            derr2 = -_dot(cw[:, None] * a1, tl.trans(dW2), PREC) - _dot(cm[:, None] * a1, tl.trans(dS2), PREC)
            dW2_start = keep_w * dW2
            dS2_start = carry_s * dW2 + keep_s * dS2
        o_s = tl.arange(0, 4)
        d_sdec = tl.where(o_s == 0, d_keep_w, tl.where(o_s == 1, d_carry_s, d_keep_s))
        tl.store(dsdec_ptr + i_c * 3 + o_s, d_sdec, mask=o_s < 3)
        _store_pair(dsrows_ptr + i_c * CHUNK * 2, dcw, dcm, m_n, B_N)

        # The retrieval, layer DEPTH down to 1.
        if TOKEN:
            A, E = _load_pair(rdec_ptr + i_c * CHUNK * 2, m_n, B_N)
            C = _load_scores(scores_ptr + i_c * CHUNK * CHUNK, m_n, CHUNK, B_N)
            r1, gram1 = _retrieve_layer(q, k, W1, S1, err1, A, E, C, PREC)
            if DEPTH == 2:
                h1 = _act(r1, ACT)
                r2, gram2 = _retrieve_layer(h1, a1, W2, S2, err2, A, E, C, PREC)
                dh1, da1_r, derr2_r, dW2_r, dS2_r, dA, dE, dC = _retrieve_layer_backward(
                    dy, h1, a1, W2, S2, err2, A, E, C, gram2, PREC)
                da1 += da1_r
                derr2 += derr2_r
                dW2_start += dW2_r
                dS2_start += dS2_r
                dz1 = dh1 * _act_grad(r1, ACT)
                dq, dk_r, derr1_r, dW1_r, dS1_r, dA1, dE1, dC1 = _retrieve_layer_backward(
                    dz1, q, k, W1, S1, err1, A, E, C, gram1, PREC)
                dA += dA1
                dE += dE1
                dC += dC1
            else:
                dq, dk_r, derr1_r, dW1_r, dS1_r, dA, dE, dC = _retrieve_layer_backward(
                    dy, q, k, W1, S1, err1, A, E, C, gram1, PREC)
            dk += dk_r
            derr1 += derr1_r
            dW1_start += dW1_r
            dS1_start += dS1_r
            _store_pair(drdec_ptr + i_c * CHUNK * 2, dA, dE, m_n, B_N)
            o_n = tl.arange(0, B_N)
            tl.store(dscores_ptr + i_c * CHUNK * CHUNK + o_n[:, None] * CHUNK + o_n[None, :], dC,
                     mask=m_n[:, None] & m_n[None, :])
        else:
            r1 = _dot(q, tl.trans(W1), PREC)
            if DEPTH == 2:
                h1 = _act(r1, ACT)
                dW2_start += _dot(tl.trans(dy), h1, PREC)
                dz1 = _dot(dy, W2, PREC) * _act_grad(r1, ACT)
            else:
                dz1 = dy
            dW1_start += _dot(tl.trans(dz1), q, PREC)
            dq = _dot(dz1, W1, PREC)
        if RESIDUAL:
            dq += dy
        _store_tokens(dq_ptr + p_tok, dq, m_n, D, B_N, B_D)

        # The error recursion and the store pass (err_L = scale (M_W(k) - v), scale not differentiated).
        if DEPTH == 2:
            dcarry = derr1 * _act_grad(z1, ACT)
            dz1_err = derr1 * carry * _act_grad2(z1, ACT)
            derr2 += _dot(dcarry, tl.trans(W2), PREC)
            dW2_start += _dot(tl.trans(err2), dcarry, PREC)
            dout = derr2
            if BOUNDED:
                dout = dout * scale[:, None]
            dW2_start += _dot(tl.trans(dout), a1, PREC)
            da1 += _dot(dout, W2, PREC)
            dz1 = da1 * _act_grad(z1, ACT) + dz1_err
        else:
            dout = derr1
            if BOUNDED:
                dout = dout * scale[:, None]
            dz1 = dout
        dW1_start += _dot(tl.trans(dz1), k, PREC)
        dk += _dot(dz1, W1, PREC)
        if RESIDUAL:
            dk += dout
        _store_tokens(dk_ptr + p_tok, dk, m_n, D, B_N, B_D)
        _store_tokens(dv_ptr + p_tok, -dout, m_n, D, B_N, B_D)
        dW1 = dW1_start
        dS1 = dS1_start
        if DEPTH == 2:
            dW2 = dW2_start
            dS2 = dS2_start
    _store_state(dw1_ptr, ds1_ptr, dw2_ptr, ds2_ptr, i_g, dW1, dS1, dW2, dS2, D, O1, H2, B_D, B_O1, B_H2, DEPTH)
