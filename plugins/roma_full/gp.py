"""RoMa's Gaussian-process matcher (checkpoint ``gps.16``): the posterior mean of a Fourier
embedding of image B's coordinates, given image A's features.

With query features x (image A), support features y (image B), a cosine kernel
K(u, v) = exp((cos(u, v) - 1) / T) (T = 0.2) and f = cos(8 pi * W [x_B, y_B] + b) the 512-d
embedding of B's cell centres, the posterior mean at A's cells is

    mu = K_xy (K_yy + sigma I)^-1 f,        sigma = 0.1.

The solve is real: it is never replaced by a softmax. ONNX and TensorRT have no inverse or solve
op, so the solve is either done outside the graph (``solve_exact``: Cholesky, the split export)
or inside it (``solve_iterative``: a fixed number of Newton-Schulz steps plus one refinement
step, or conjugate gradients). K_yy + sigma I is symmetric positive definite: K_yy is a
positive semi-definite kernel matrix (exp of a Gram matrix of unit vectors), so every eigenvalue
lies in [sigma, max row sum]; the iterations rely on that.

MatchAnything's RoMa runs the GP with ``no_cov=True``: only the mean is used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import centre_coords

GP_DIM = 512
TEMPERATURE = 0.2
SIGMA_NOISE = 0.1
COS_EPS = 1e-6
DEFAULT_CG_ITERS = 64
# rows per block of the GP's substitutions on CUDA (0: cuBLAS's triangular solves)
CHOLESKY_BLOCK = 128


def cosine_kernel(x: torch.Tensor, y: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """B x N x D, B x M x D -> B x N x M kernel exp((cos - 1) / T); eps added to the norm product."""
    c = x @ y.transpose(1, 2)  # MatMul, not Einsum (TensorRT supports Einsum only partly)
    norms = x.norm(dim=-1)[:, :, None] * y.norm(dim=-1)[:, None, :]
    return torch.exp((c / (norms + COS_EPS) - 1.0) / temperature)


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """B x D x h x w -> B x (h w) x D."""
    return x.flatten(2).transpose(1, 2)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The GP always runs in fp32 (as upstream, also under AMP); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def solve_exact(k_ss: torch.Tensor, rhs: torch.Tensor, float64: bool = False) -> torch.Tensor:
    """(K_yy + sigma I)^-1 rhs by Cholesky on the tensors' device (LU if Cholesky fails).

    ``k_ss``: B x M x M (noise already added), ``rhs``: B x M x D or 1 x M x D.
    """
    dtype = torch.float64 if float64 or k_ss.dtype == torch.float64 else torch.float32
    a = k_ss.to(dtype)
    b = rhs.to(dtype).expand(a.shape[0], -1, -1)
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        out = torch.cholesky_solve(b, chol)
    else:  # not numerically SPD (should not happen: eigenvalues >= sigma); LU still solves it
        # per matrix: batched CPU LU fails in some torch builds once set_num_threads was called
        out = torch.stack([torch.linalg.solve(a[i], b[i]) for i in range(a.shape[0])])
    return out.to(k_ss.dtype)


_SIDE_STREAMS: dict[int, list[torch.cuda.Stream]] = {}  # per CUDA device, made once


def side_streams(device: torch.device, count: int) -> list[torch.cuda.Stream]:
    """``count`` CUDA streams of ``device`` besides the current one, kept for the process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _SIDE_STREAMS.setdefault(index, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device=index))
    return streams[:count]


def cholesky_factor(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of each SPD matrix of the batch ``a``, the status not read back.

    On CUDA one factorisation per matrix: for a batch torch calls cuSOLVER's batched potrf, built
    for small matrices; at roma_plus's 1225 x 1225 (560, B = 2) it took 1.83 ms against 0.92 ms
    for two single ones (H200, session 13), with the same fp32 error against float64. A single
    potrf runs as one kernel that fills a fraction of the GPU (0.53 ms each, session 20's profile),
    so the matrices after the first are factorised on side streams, side by side with it (also
    inside a CUDA-graph capture: the streams fork from the current one and join it again). The
    outputs are allocated on the current stream, and it waits for the side streams before
    returning, so no tensor is used or freed across streams unordered.
    """
    n = int(a.shape[0]) if a.dim() == 3 else 1
    if not (a.is_cuda and n > 1):
        return torch.linalg.cholesky_ex(a)[0]
    if torch.compiler.is_compiling():
        return torch.stack([torch.linalg.cholesky_ex(a[i])[0] for i in range(n)])
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    info = torch.empty(n, dtype=torch.int32, device=a.device)
    main = torch.cuda.current_stream(a.device)
    sides = side_streams(a.device, n - 1)
    for stream in sides:
        stream.wait_stream(main)
    torch.linalg.cholesky_ex(a[0], out=(out[0], info[0]))
    for i, stream in enumerate(sides, start=1):
        with torch.cuda.stream(stream):
            torch.linalg.cholesky_ex(a[i], out=(out[i], info[i]))
    for stream in sides:
        main.wait_stream(stream)
    return out


def diagonal_block_inverses(chol: torch.Tensor, block: int) -> torch.Tensor:
    """The inverses of the ``block`` x ``block`` diagonal blocks of lower-triangular factors
    (B x M x M), as B x S x block x block (S = ceil(M / block)); the last block, where ``block`` does
    not divide M, is padded with the identity. One batched triangular solve for all of them."""
    n, m = int(chol.shape[0]), int(chol.shape[-1])
    steps, whole = -(-m // block), m // block
    chol = chol.contiguous()
    diag = chol.new_zeros(n, steps, block, block)
    # the whole blocks in one strided copy, then the last one (padded with the identity)
    diag[:, :whole] = chol.as_strided((n, whole, block, block), (m * m, (m + 1) * block, m, 1))
    if whole < steps:
        lo = whole * block
        diag[:, whole, : m - lo, : m - lo] = chol[:, lo:, lo:]
        diag[:, whole].diagonal(dim1=-2, dim2=-1)[:, m - lo:] = 1.0
    blocks = diag.reshape(n * steps, block, block)
    eye = torch.eye(block, dtype=chol.dtype, device=chol.device).expand(n * steps, block, block)
    # more than 8 blocks: torch takes cuBLAS's batched solve (its pointer arrays built on the GPU)
    return torch.linalg.solve_triangular(blocks, eye, upper=False).reshape(n, steps, block, block)


def blocked_substitutions(chol: torch.Tensor, rhs: torch.Tensor, block: int = CHOLESKY_BLOCK) -> torch.Tensor:
    """x with L L^T x = rhs for lower-triangular factors ``chol`` (B x M x M), by blocks of rows.

    Why: cuBLAS's triangular solves took 1.36 ms of a roma_plus pair on an H200 (M = 1225, 512
    right-hand sides, two matrices, both substitutions; session 20's profile), latency-bound in
    many small kernels. Here the diagonal blocks' inverses are computed together (one batched
    solve), and each substitution is a sequence of matrix products over the batch:

        forward   y_k = L_kk^-1 (b_k - sum_(j<k) L_kj y_j)        (the sum: updates of the rows below)
        backward  x_k = L_kk^-T (y_k - sum_(j>k) L_jk^T x_j)

    fp32 in and out: the caller keeps TF32 off (the GP's strict region). The same solution as
    the triangular solves to fp32 rounding (tested against float64).
    """
    n, m = int(chol.shape[0]), int(chol.shape[-1])
    inverses = diagonal_block_inverses(chol, block)
    edges = [min(m, k * block) for k in range(inverses.shape[1] + 1)]
    rest = at_least_fp32(rhs).expand(n, -1, -1).contiguous()  # updated in place: b minus what is known
    y = torch.empty_like(rest)
    for k in range(len(edges) - 1):  # forward: L y = b
        lo, hi = edges[k], edges[k + 1]
        w = hi - lo
        torch.bmm(inverses[:, k, :w, :w], rest[:, lo:hi], out=y[:, lo:hi])
        if hi < m:
            rest[:, hi:].baddbmm_(chol[:, hi:, lo:hi], y[:, lo:hi], alpha=-1.0)
    x = torch.empty_like(rest)
    for k in range(len(edges) - 2, -1, -1):  # backward: L^T x = y (y updated in place)
        lo, hi = edges[k], edges[k + 1]
        w = hi - lo
        if hi < m:
            y[:, lo:hi].baddbmm_(chol[:, hi:, lo:hi].mT, x[:, hi:], alpha=-1.0)
        torch.bmm(inverses[:, k, :w, :w].mT, y[:, lo:hi], out=x[:, lo:hi])
    return x


def solve_cholesky(k_ss: torch.Tensor, rhs: torch.Tensor, block: int = 0) -> torch.Tensor:
    """(K_yy + sigma I)^-1 rhs by Cholesky, without the host-side check of ``solve_exact``.

    For torch runs inside one graph (compiled, CUDA graphs): K_yy + sigma I is SPD by
    construction (eigenvalues >= sigma), so the factorisation's status is not read back.
    ``block`` > 0: on CUDA, matrices larger than it are solved by ``blocked_substitutions``.
    """
    a = at_least_fp32(k_ss)
    chol = cholesky_factor(a)
    if block > 0 and a.is_cuda and int(a.shape[-1]) > block:
        return blocked_substitutions(chol, rhs, block).to(k_ss.dtype)
    # L L^T x = rhs as two triangular solves (cuBLAS), not cholesky_solve: for a batch CUDA torch
    # takes that from MAGMA, which allocates while it runs and aborts inside a CUDA graph capture
    # (an AOTInductor package replayed as a CUDA graph died so on the H100)
    y = torch.linalg.solve_triangular(chol, at_least_fp32(rhs).expand(a.shape[0], -1, -1), upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True).to(k_ss.dtype)


def solve_cg(a: torch.Tensor, b: torch.Tensor, iters: int = DEFAULT_CG_ITERS) -> torch.Tensor:
    """Conjugate gradients with a fixed iteration count, one independent CG per column of b.

    Only matmuls, products, sums and divisions: exports as plain ONNX ops (unrolled). The
    squared-residual denominators are floored at 1e-30 so an exactly converged column stays
    finite (keep this in fp32: the floor underflows in fp16).
    """
    b = b.expand(a.shape[0], -1, -1)
    x = torch.zeros_like(b)
    r = b
    p = r
    rs = (r * r).sum(dim=1, keepdim=True)
    tiny = 1e-30
    for _ in range(iters):
        ap = a @ p
        step = rs / ((p * ap).sum(dim=1, keepdim=True)).clamp_min(tiny)
        x = x + step * p
        r = r - step * ap
        rs_new = (r * r).sum(dim=1, keepdim=True)
        p = r + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    return x


def newton_schulz_iters(m: int, sigma: float = SIGMA_NOISE) -> int:
    """Steps after which Newton-Schulz has converged for ANY M x M support matrix.

    Kernel entries are <= 1, so every eigenvalue lies in [sigma, M + sigma]. From
    X0 = 2 / (sigma + R) I the residual I - A X0 has norm rho <= 1 - 2 sigma / (sigma + R) and
    after k steps rho^(2^k); rho^(2^k) <= e^-17 (below fp32 resolution) needs
    2^k >= 8.5 (sigma + R) / sigma. Two steps of margin on top.
    """
    bound = m + sigma
    return int(math.ceil(math.log2(8.5 * (sigma + bound) / sigma))) + 2


def solve_newton_schulz(a: torch.Tensor, b: torch.Tensor, iters: int | None = None,
                        refine: int = 1, sigma: float = SIGMA_NOISE) -> torch.Tensor:
    """X <- X (2I - A X) from X0 = 2 / (sigma + R) I, R the largest row sum (Gershgorin bound),
    then ``x = X b`` and ``refine`` steps of iterative refinement ``x += X (b - A x)``.

    The spectrum of A lies in [sigma, R], so ||I - A X0|| < 1 and the iteration converges
    (quadratically once the residual is below 1) for every input; ``newton_schulz_iters`` gives
    a count that suffices for any features. Two M x M x M matmuls per step; only MatMul, Add,
    Mul, ReduceSum/Max: plain ONNX ops, unrolled. Keep it in fp32 (and TF32 off): with
    cond(A) up to ~1e4, 10-bit mantissas lose the solution.
    """
    m = int(a.shape[-1])  # static at export: the step count is fixed per graph size
    iters = newton_schulz_iters(m, sigma) if iters is None else iters
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    bound = a.abs().sum(dim=-1).amax(dim=-1)[:, None, None]  # B x 1 x 1
    x = eye * (2.0 / (sigma + bound))
    for _ in range(iters):
        # X (2I - A X) written as 2X - X (A X): no M x M constant per step in the exported graph
        x = 2.0 * x - x @ (a @ x)
    b = b.expand(a.shape[0], -1, -1)
    out = x @ b
    for _ in range(refine):
        out = out + x @ (b - a @ out)
    return out


METHODS = ("newton_schulz", "cg")


def solve_iterative(k_ss: torch.Tensor, rhs: torch.Tensor, method: str = "newton_schulz",
                    iters: int | None = None) -> torch.Tensor:
    """In-graph approximation of ``solve_exact``: "newton_schulz" (default) or "cg"."""
    if method == "newton_schulz":
        return solve_newton_schulz(k_ss, rhs, iters)
    if method == "cg":
        return solve_cg(k_ss, rhs, iters or DEFAULT_CG_ITERS)
    raise ValueError(f"unknown GP solver {method!r}: use one of {', '.join(METHODS)}")


class GaussianProcess(nn.Module):
    """``forward(f_q, f_s) -> B x 512 x h x w`` posterior mean (f_*: B x 512 x h x w projected feats)."""

    def __init__(self, dim: int = GP_DIM) -> None:
        super().__init__()
        self.pos_conv = nn.Conv2d(2, dim, 1, 1)

    def basis(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """1 x (h w) x 512 Fourier embedding of the support grid's cell centres."""
        ys = centre_coords(h, like)[:, None].expand(h, w)
        xs = centre_coords(w, like)[None, :].expand(h, w)
        coords = torch.stack((xs, ys), dim=0)[None]  # 1 x 2 x h x w, channel 0 = x
        return flat_tokens(torch.cos(8.0 * math.pi * self.pos_conv(coords)))

    def kernel_matrices(self, f_q: torch.Tensor, f_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K_xy B x N x M, K_yy + sigma I  B x M x M, basis 1 x M x 512)."""
        x, y = flat_tokens(at_least_fp32(f_q)), flat_tokens(at_least_fp32(f_s))
        k_qs = cosine_kernel(x, y)
        k_ss = self.support_matrix(f_s)
        return k_qs, k_ss, self.basis(f_s.shape[-2], f_s.shape[-1], k_ss)

    @staticmethod
    def support_matrix(f_s: torch.Tensor) -> torch.Tensor:
        """K_yy + sigma I for support features B x D x h x w.

        Upstream also adds sigma where the diagonal is exactly 0; with sigma added first the
        diagonal is >= sigma > 0, so that branch never fires and is left out.
        """
        y = flat_tokens(at_least_fp32(f_s))
        k = cosine_kernel(y, y)
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        return k + SIGMA_NOISE * eye

    @staticmethod
    def posterior(k_qs: torch.Tensor, alpha: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """K_xy alpha reshaped to B x 512 x h x w (h, w: the query grid)."""
        mu = k_qs @ alpha
        return mu.transpose(1, 2).reshape(mu.shape[0], mu.shape[2], h, w)

    def forward(self, f_q: torch.Tensor, f_s: torch.Tensor, solve: str = "exact",
                iters: int | None = None, block: int = 0) -> torch.Tensor:
        """``block``: the "cholesky" solve's rows per block of its substitutions on CUDA (0: cuBLAS's)."""
        k_qs, k_ss, basis = self.kernel_matrices(f_q, f_s)
        if solve == "exact":
            alpha = solve_exact(k_ss, basis)
        elif solve == "cholesky":
            alpha = solve_cholesky(k_ss, basis, block)
        elif solve == "iterative":
            alpha = solve_iterative(k_ss, basis, "newton_schulz", iters)
        else:
            alpha = solve_iterative(k_ss, basis, solve, iters)
        return self.posterior(k_qs, alpha, f_q.shape[-2], f_q.shape[-1])
