"""Triton kernels of the EA operator (imported on first use; see triton_kernel.py for what they compute)."""

import triton
import triton.language as tl


@triton.jit
def corner(kv_ptr, row, w, valid, c, rows, heads, h, d, DIM: tl.constexpr):
    """Weighted key and value (BLOCK, DIM) of one bilinear corner."""
    off = ((c * rows + row) * 2 * heads + h) * DIM
    k = tl.load(kv_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    v = tl.load(kv_ptr + off[:, None] + heads * DIM + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return w[:, None] * k, w[:, None] * v


@triton.jit
def sample(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j, samples, rank, c, rows, heads, h, width,
           d, g, gmask, DIM: tl.constexpr):
    """Key, value (BLOCK, DIM), code (BLOCK, RANK_P), usability and corners of sample j of rows r."""
    code_bits = tl.load(base_ptr + r * samples + j, mask=rmask, other=-1)
    valid = code_bits >= 0
    code_bits = tl.where(valid, code_bits, 0)
    b = code_bits & 0x1FFFFFFF  # layout.py: bits 0-28 the row, bit 29 last column, bit 30 bottom row
    fx = tl.load(frac_ptr + (r * samples + j) * 2, mask=rmask, other=0.0)
    fy = tl.load(frac_ptr + (r * samples + j) * 2 + 1, mask=rmask, other=0.0)
    x1 = tl.where((code_bits & 0x20000000) != 0, b - (width - 1), b + 1)
    dy = tl.where((code_bits & 0x40000000) != 0, 0, width)
    k0, v0 = corner(kv_ptr, b, (1 - fx) * (1 - fy), valid, c, rows, heads, h, d, DIM)
    k1, v1 = corner(kv_ptr, x1, fx * (1 - fy), valid, c, rows, heads, h, d, DIM)
    k2, v2 = corner(kv_ptr, b + dy, (1 - fx) * fy, valid, c, rows, heads, h, d, DIM)
    k3, v3 = corner(kv_ptr, x1 + dy, fx * fy, valid, c, rows, heads, h, d, DIM)
    code = tl.load(code_ptr + (r * samples + j)[:, None] * rank + g[None, :], mask=valid[:, None] & gmask[None, :],
                   other=0.0).to(tl.float32)
    return k0 + k1 + k2 + k3, v0 + v1 + v2 + v3, code, valid, b, x1, dy, fx, fy


@triton.jit
def query(q_ptr, gk_ptr, null_ptr, r, rmask, c, rows, heads, h, rank, d, g, gmask, DIM: tl.constexpr):
    """Query (BLOCK, DIM), geometry query (BLOCK, RANK_P), null logit (BLOCK,) and geo_k (DIM, RANK_P)."""
    q = tl.load(q_ptr + (((c * rows + r) * heads + h) * DIM)[:, None] + d[None, :], mask=rmask[:, None],
                other=0.0).to(tl.float32)
    gk = tl.load(gk_ptr + (h * DIM + d)[:, None] * rank + g[None, :], mask=gmask[None, :], other=0.0)
    gk = gk.to(tl.float32)
    qg = tl.sum(q[:, :, None] * gk[None, :, :], axis=1)
    nk = tl.load(null_ptr + h * DIM + d).to(tl.float32)
    return q, qg, tl.sum(q * nk[None, :], axis=1), gk, nk


@triton.jit
def program_rows(rows, rank, DIM: tl.constexpr, RANK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's ids (row block, head, copy), its rows and their mask, and the head and code lanes."""
    pid, h, c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    d, g = tl.arange(0, DIM), tl.arange(0, RANK_P)
    return pid, h, c, r, r < rows, d, g, g < rank


@triton.jit
def forward_kernel(q_ptr, kv_ptr, code_ptr, gk_ptr, gv_ptr, null_ptr, base_ptr, frac_ptr, out_ptr, lse_ptr,
                   rows, heads, samples, rank, width,
                   DIM: tl.constexpr, RANK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    pid, h, c, r, rmask, d, g, gmask = program_rows(rows, rank, DIM, RANK_P, BLOCK_R)
    q, qg, nl, gk, nk = query(q_ptr, gk_ptr, null_ptr, r, rmask, c, rows, heads, h, rank, d, g, gmask, DIM)
    m, total = nl, tl.full([BLOCK_R], 1.0, tl.float32)  # the null token, value 0, starts the online softmax
    acc = tl.zeros([BLOCK_R, DIM], tl.float32)
    acc_g = tl.zeros([BLOCK_R, RANK_P], tl.float32)
    for j in range(samples):
        key, val, code, valid, b, x1, dy, fx, fy = sample(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j,
                                                          samples, rank, c, rows, heads, h, width, d, g,
                                                          gmask, DIM)
        logit = tl.where(valid, tl.sum(q * key, axis=1) + tl.sum(qg * code, axis=1), float("-inf"))
        m_new = tl.maximum(m, logit)
        alpha, p = tl.exp(m - m_new), tl.where(valid, tl.exp(logit - m_new), 0.0)
        total = total * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * val
        acc_g = acc_g * alpha[:, None] + p[:, None] * code
        m = m_new
    gv = tl.load(gv_ptr + (h * DIM + d)[:, None] * rank + g[None, :], mask=gmask[None, :], other=0.0)
    out = (acc + tl.sum(acc_g[:, None, :] * gv.to(tl.float32)[None, :, :], axis=2)) / total[:, None]
    at = (c * rows + r) * heads + h
    tl.store(out_ptr + (at * DIM)[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(lse_ptr + at, m + tl.log(total), mask=rmask)


@triton.jit
def scatter(dkv_ptr, row, w, valid, c, rows, heads, h, d, dk, dv, DIM: tl.constexpr):
    """Add w * (dk, dv) into one bilinear corner's key and value gradients."""
    off = ((c * rows + row) * 2 * heads + h) * DIM
    tl.atomic_add(dkv_ptr + off[:, None] + d[None, :], w[:, None] * dk, mask=valid[:, None])
    tl.atomic_add(dkv_ptr + off[:, None] + heads * DIM + d[None, :], w[:, None] * dv, mask=valid[:, None])


@triton.jit
def weight(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j, samples, rank, c, rows, heads, h, width, d, g,
           gmask, q, qg, lse, do, dg, DIM: tl.constexpr):
    """Sample j (as `sample` gives it), its softmax weight a and dL/da, recomputed for the backward pass."""
    key, val, code, valid, b, x1, dy, fx, fy = sample(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j, samples,
                                                      rank, c, rows, heads, h, width, d, g, gmask, DIM)
    logit = tl.sum(q * key, axis=1) + tl.sum(qg * code, axis=1)
    a = tl.where(valid, tl.exp(logit - lse), 0.0)
    da = tl.sum(do * val, axis=1) + tl.sum(dg * code, axis=1)
    return key, val, code, valid, b, x1, dy, fx, fy, a, da


@triton.jit
def backward_kernel(q_ptr, kv_ptr, code_ptr, gk_ptr, gv_ptr, null_ptr, base_ptr, frac_ptr, lse_ptr, dout_ptr,
                    dq_ptr, dkv_ptr, dcode_ptr, dgk_ptr, dgv_ptr, dnull_ptr,
                    rows, heads, samples, rank, width,
                    DIM: tl.constexpr, RANK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    pid, h, c, r, rmask, d, g, gmask = program_rows(rows, rank, DIM, RANK_P, BLOCK_R)
    q, qg, nl, gk, nk = query(q_ptr, gk_ptr, null_ptr, r, rmask, c, rows, heads, h, rank, d, g, gmask, DIM)
    at = (c * rows + r) * heads + h
    lse = tl.load(lse_ptr + at, mask=rmask, other=0.0)
    do = tl.load(dout_ptr + (at * DIM)[:, None] + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    gv = tl.load(gv_ptr + (h * DIM + d)[:, None] * rank + g[None, :], mask=gmask[None, :], other=0.0)
    gv = gv.to(tl.float32)
    dg = tl.sum(do[:, :, None] * gv[None, :, :], axis=1)  # dL/d(weighted code), (BLOCK, RANK_P)
    mean = tl.zeros([BLOCK_R], tl.float32)  # sum_j a_j dL/da_j, the softmax's correction term
    for j in range(samples):
        key, val, code, valid, b, x1, dy, fx, fy, a, da = weight(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j,
                                                                 samples, rank, c, rows, heads, h, width, d,
                                                                 g, gmask, q, qg, lse, do, dg, DIM)
        mean += a * da
    dq = tl.zeros([BLOCK_R, DIM], tl.float32)
    dqg = tl.zeros([BLOCK_R, RANK_P], tl.float32)
    acc_g = tl.zeros([BLOCK_R, RANK_P], tl.float32)
    for j in range(samples):
        key, val, code, valid, b, x1, dy, fx, fy, a, da = weight(kv_ptr, base_ptr, frac_ptr, code_ptr, r, rmask, j,
                                                                 samples, rank, c, rows, heads, h, width, d,
                                                                 g, gmask, q, qg, lse, do, dg, DIM)
        dl = a * (da - mean)
        dq += dl[:, None] * key
        dqg += dl[:, None] * code
        acc_g += a[:, None] * code
        dcode = dl[:, None] * qg + a[:, None] * dg
        tl.atomic_add(dcode_ptr + (r * samples + j)[:, None] * rank + g[None, :], dcode,
                      mask=valid[:, None] & gmask[None, :])
        dk, dv = dl[:, None] * q, a[:, None] * do
        scatter(dkv_ptr, b, (1 - fx) * (1 - fy), valid, c, rows, heads, h, d, dk, dv, DIM)
        scatter(dkv_ptr, x1, fx * (1 - fy), valid, c, rows, heads, h, d, dk, dv, DIM)
        scatter(dkv_ptr, b + dy, (1 - fx) * fy, valid, c, rows, heads, h, d, dk, dv, DIM)
        scatter(dkv_ptr, x1 + dy, fx * fy, valid, c, rows, heads, h, d, dk, dv, DIM)
    dnl = tl.where(rmask, -tl.exp(nl - lse) * mean, 0.0)
    dq += dnl[:, None] * nk[None, :] + tl.sum(dqg[:, None, :] * gk[None, :, :], axis=2)
    tl.store(dq_ptr + (at * DIM)[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rmask[:, None])
    # this program's share of the weight gradients, reduced over programs by the caller
    part = (c * tl.num_programs(0) + pid) * heads + h
    qm = tl.where(rmask[:, None], q, 0.0)
    wk = tl.sum(qm[:, :, None] * dqg[:, None, :], axis=0)  # (DIM, RANK_P)
    wv = tl.sum(do[:, :, None] * acc_g[:, None, :], axis=0)
    woff = (part * DIM + d)[:, None] * rank + g[None, :]
    tl.store(dgk_ptr + woff, wk, mask=gmask[None, :])
    tl.store(dgv_ptr + woff, wv, mask=gmask[None, :])
    tl.store(dnull_ptr + part * DIM + d, tl.sum(qm * dnl[:, None], axis=0))
