"""roma_full against upstream MatchAnything RoMa (deterministic weights, 224 x 224, fp32 CPU),
and the pieces whose correctness does not follow from that run alone (GP solvers, position grid).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matchrt.plugins.roma_full import gp as G
from matchrt.plugins.roma_full.decoder import classification_to_flow
from matchrt.plugins.roma_full.dinov2 import resize_pos_grid
from matchrt.plugins.roma_full.encoder import COARSE_SCALE

from roma_full_helpers import loaded_model, max_rel, reference, reference_images, reference_run


def test_coarse_outputs_match_upstream() -> None:
    ref, out = reference(), reference_run()
    cells = ref["s16_gm_cls_cell_index"]
    cls = out["gm_cls"].flatten(2).numpy()  # 2 x 4096 x 256
    assert max_rel(cls[:, :, cells], ref["s16_gm_cls_cells"]) < 1e-4
    cls64 = out["gm_cls"].double()
    assert max_rel(cls64.amax(1), ref["s16_gm_cls_max"]) < 1e-4
    assert max_rel(torch.logsumexp(cls64, 1), ref["s16_gm_cls_logsumexp"]) < 1e-4
    assert np.array_equal(out["gm_cls"].argmax(1).numpy(), ref["s16_gm_cls_argmax"])
    assert max_rel(out["gm_certainty"], ref["s16_gm_certainty"]) < 1e-3
    # the coarse warp before the scale-16 refiner, against upstream's cls_to_flow_refine
    assert max_rel(out["flow"], ref["s16_coarse_flow"]) < 1e-4
    assert torch.equal(out["certainty"], out["gm_certainty"])


def test_classification_to_flow_takes_the_local_mean_around_the_mode() -> None:
    logits = torch.full((1, 4096, 1, 3), -30.0)
    # cell 0: one anchor (row 10, col 20) dominates
    logits[0, 10 * 64 + 20, 0, 0] = 10.0
    # cell 1: equal mass on the mode and its right neighbour -> halfway between them
    logits[0, 5 * 64 + 7, 0, 1] = 10.0
    logits[0, 5 * 64 + 8, 0, 1] = 10.0 - 1e-4
    # cell 2: mode in the last anchor; the clamped neighbours repeat it, the flow stays there
    logits[0, 4095, 0, 2] = 10.0
    flow = classification_to_flow(logits)[0, :, 0]
    centre = lambda k: (2 * k + 1) / 64 - 1  # noqa: E731
    assert torch.allclose(flow[:, 0], torch.tensor([centre(20), centre(10)]), atol=1e-6)
    assert torch.allclose(flow[:, 1], torch.tensor([(centre(7) + centre(8)) / 2, centre(5)]), atol=1e-4)
    assert torch.allclose(flow[:, 2], torch.tensor([centre(63), centre(63)]), atol=1e-6)


@pytest.fixture(scope="module")
def gp_system() -> dict[str, torch.Tensor]:
    """The GP's linear system of the reference pair at 224 (N = 256 support tokens)."""
    model = loaded_model()
    with torch.no_grad():
        pyr_q, pyr_s = model.pyramids(*reference_images(), with_cnn=False)
        feat_q, feat_s = model.proj16(pyr_q[COARSE_SCALE]), model.proj16(pyr_s[COARSE_SCALE])
        k_qs, k_ss, basis = model.gp.kernel_matrices(feat_q, feat_s)
    return {"feat_q": feat_q, "feat_s": feat_s, "k_qs": k_qs, "k_ss": k_ss, "basis": basis}


def _decode(system: dict[str, torch.Tensor], alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    model = loaded_model()
    h, w = system["feat_q"].shape[-2:]
    with torch.no_grad():
        return model.decode(model.gp.posterior(system["k_qs"], alpha, h, w), system["feat_q"], system["feat_s"])


def test_exact_solve_solves_the_system(gp_system) -> None:
    k, f = gp_system["k_ss"], gp_system["basis"]
    alpha = G.solve_exact(k, f)
    alpha64 = G.solve_exact(k.double(), f.double())
    residual = (k.double() @ alpha64 - f.double()).abs().max()
    scale = k.double().abs().sum(-1).max() * alpha64.abs().max()  # ||K|| ||alpha||
    assert residual / scale < 1e-12, (residual, scale)
    assert max_rel(alpha, alpha64) < 1e-3  # fp32 Cholesky, cond(K_yy + 0.1 I) ~ 2.5e3 here
    # every eigenvalue of K_yy + sigma I is >= sigma (the kernel matrix is PSD), up to the fp32
    # rounding of its entries (~N * 6e-8)
    assert float(torch.linalg.eigvalsh(k.double()).min()) > G.SIGMA_NOISE - 1e-4


def test_in_graph_cholesky_solve_matches_the_exact_solve_for_a_batch(gp_system) -> None:
    """The compiled/packaged path's solve (two triangular solves, no status read-back) solves the
    same system as the exact one, for a batch of two matrices as the symmetric pass has."""
    k = torch.cat((gp_system["k_ss"], gp_system["k_ss"].transpose(-1, -2)))
    f = gp_system["basis"]
    alpha64 = G.solve_exact(k.double(), f.double())
    got = G.solve_cholesky(k, f)
    assert got.shape == alpha64.shape and got.dtype == k.dtype
    assert max_rel(got, alpha64) < 1e-3  # as fp32 Cholesky above
    assert max_rel(got, G.solve_exact(k, f)) < 1e-4


@pytest.mark.parametrize("block", [16, 100, 128, 256, 300])
def test_blocked_substitutions_solve_the_system_as_the_exact_solve(gp_system, block) -> None:
    """The blocked substitutions (CUDA's default for roma_plus) with whole, ragged and single blocks
    solve the reference system as well as the exact fp32 solve does: same error against float64."""
    k = torch.cat((gp_system["k_ss"], gp_system["k_ss"].transpose(-1, -2)))
    f = gp_system["basis"]
    alpha64 = G.solve_exact(k.double(), f.double())
    exact = G.solve_exact(k, f)
    got = G.blocked_substitutions(torch.linalg.cholesky(k), f, block)
    assert got.shape == alpha64.shape and got.dtype == k.dtype
    assert max_rel(got, alpha64) < 2 * max(max_rel(exact, alpha64), 1e-5)
    assert max_rel(got, exact) < 1e-4
    outputs, want = _decode(gp_system, got[:1]), _decode(gp_system, exact[:1])
    for name in want:
        assert max_rel(outputs[name], want[name]) < 1e-4, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the per-matrix factorisation is the CUDA path")
def test_cuda_factorises_a_batch_matrix_by_matrix_into_the_same_factors(gp_system) -> None:
    """On CUDA a batch is factorised one matrix at a time (faster than the batched potrf at this
    size); the factors are each matrix's, and the solve is the exact one's."""
    k = torch.cat((gp_system["k_ss"], gp_system["k_ss"].transpose(-1, -2))).cuda()
    f = gp_system["basis"].cuda()
    got = G.cholesky_factor(k)
    assert got.shape == k.shape and got.dtype == k.dtype
    assert torch.equal(got, got.tril())
    assert max_rel(got.double().cpu(), torch.linalg.cholesky(k.double()).cpu()) < 1e-3  # cond ~ 2.5e3, fp32
    assert max_rel(G.solve_cholesky(k, f).cpu(), G.solve_exact(k.double(), f.double()).cpu()) < 1e-3
    # the blocked solve on CUDA (as roma_plus runs it), inside a CUDA graph too: the unblocked solution
    blocked = G.solve_cholesky(k, f, block=64)
    assert max_rel(blocked.cpu(), G.solve_cholesky(k, f).cpu()) < 1e-4
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = G.solve_cholesky(k, f, block=64)
    graph.replay()
    assert max_rel(captured.cpu(), blocked.cpu()) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side streams are the CUDA path")
def test_cuda_factorises_the_matrices_side_by_side_into_each_matrix_s_own_factor(gp_system) -> None:
    """The matrices after the first are factorised on side streams: each factor is bit for bit the
    one a lone factorisation gives, eagerly and from a CUDA graph replayed on new inputs."""
    k = gp_system["k_ss"].cuda()
    batch = torch.cat((k, k.transpose(-1, -2), k * 0.5 + 0.05 * torch.eye(k.shape[-1], device="cuda")))
    alone = [torch.linalg.cholesky_ex(m)[0] for m in batch]
    got = G.cholesky_factor(batch)
    assert all(torch.equal(g, w) for g, w in zip(got, alone))
    static = batch.clone()
    G.cholesky_factor(static)  # side streams made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = G.cholesky_factor(static)
    static.copy_(batch.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(g, w) for g, w in zip(captured, alone[::-1]))


@pytest.mark.parametrize("method", ["newton_schulz", "cg"])
def test_iterative_solve_reaches_the_exact_outputs(gp_system, method) -> None:
    exact = _decode(gp_system, G.solve_exact(gp_system["k_ss"], gp_system["basis"], float64=True))
    it = _decode(gp_system, G.solve_iterative(gp_system["k_ss"], gp_system["basis"], method))
    ref = reference()
    for key, tol in (("gm_cls", 1e-4), ("gm_certainty", 1e-4), ("flow", 1e-4)):
        assert max_rel(it[key], exact[key]) < tol, key
    # and against upstream as the exact solve is
    assert max_rel(it["gm_certainty"], ref["s16_gm_certainty"]) < 1e-3
    assert max_rel(it["flow"], ref["s16_coarse_flow"]) < 1e-4


def test_newton_schulz_step_count_covers_the_worst_case_spectrum() -> None:
    # identical features: K = ones, eigenvalues sigma (N-1 times) and N + sigma (the bound)
    n = 400
    k = torch.ones(1, n, n) + G.SIGMA_NOISE * torch.eye(n)
    rhs = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.solve(k[0].double(), rhs[0].double())
    assert max_rel(G.solve_newton_schulz(k, rhs)[0], exact) < 1e-4
    assert max_rel(G.solve_newton_schulz(k, rhs, iters=G.newton_schulz_iters(n) - 6)[0], exact) > 1e-2


def _bilinear_half_pixel(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent reference: bilinear resize with half-pixel centres, edge-clamped, C x H x W."""
    c, h, w = grid.shape

    def axis(n_out: int, n_in: int):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = axis(out_h, h)
    x0, x1, wx = axis(out_w, w)
    top = grid[:, y0][:, :, x0] * (1 - wx) + grid[:, y0][:, :, x1] * wx
    bottom = grid[:, y1][:, :, x0] * (1 - wx) + grid[:, y1][:, :, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


@pytest.mark.parametrize("side", [224, 280, 518, 560, 868])
def test_position_grid_follows_the_token_grid(side: int) -> None:
    grid = torch.randn(1, 8, 37, 37, generator=torch.Generator().manual_seed(side))
    n = side // 14
    out = resize_pos_grid(grid, n, n)
    assert out.shape == (1, 8, n, n)
    # fp32 source coordinates (as torch and upstream compute them): ~1e-6 from the float64 formula
    assert max_rel(out[0], _bilinear_half_pixel(grid[0].double().numpy(), n, n)) < 1e-5
    if side == 518:  # the training size: the grid is used as it is
        assert torch.equal(out, grid)


def test_position_grid_resize_exports_with_the_size_of_the_input(tmp_path) -> None:
    """Exported at one size, the ONNX graph's Resize still targets H/14 x W/14 of its input."""
    import onnxruntime as ort

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grid = torch.nn.Parameter(torch.randn(1, 4, 37, 37))
            self.patch = torch.nn.Conv2d(3, 4, 14, 14)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.patch(x)
            return p + resize_pos_grid(self.grid, p.shape[-2], p.shape[-1])

    model = Tokens().eval()
    path = tmp_path / "tokens.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 224, 224),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {2: "h", 3: "w"}}, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for side in (224, 560):
        x = torch.rand(1, 3, side, side)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == want.shape and max_rel(got, want) < 1e-5


def test_inputs_are_not_imagenet_normalised() -> None:
    """MatchAnything runs RoMa with norm_img=False: the encoder sees [0, 1] RGB unchanged."""
    model = loaded_model()
    image0, image1 = reference_images()
    captured = {}

    def keep_input(module, args, output) -> None:
        captured["x"] = args[0]

    handle = model.encoder.dinov2.patch_embed.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            model.pyramids(image0, image1, with_cnn=False)
    finally:
        handle.remove()
    assert torch.equal(captured["x"], torch.cat((image0, image1)))
