"""Property tests of the spectral and optimisation methods (TSV, Iso-C/CTS, WUDI, OptMerge, SWUDI/ASWUDI).

Golden outputs of the reference implementations are checked through the CLI in tests/test_golden.py; here
the methods are checked on random tensors against their definitions and against literal (m x m, autograd,
full_matrices=True) re-statements of the reference code on small sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from omnimerge.errors import MethodParameterError
from omnimerge.methods import LowRank, TensorContext, get_method
from omnimerge.methods.spectral import (
    SvdOptions,
    iso_cts_sizes,
    randomized_svd,
    truncated_svd,
)
from omnimerge.methods.wudi import (
    OptMergeAutoPass,
    WudiProblem,
    optimise,
    optmerge_merge,
    optmerge_problem,
    problem_from_task_vectors,
    reference_loss,
    wudi_merge,
)

torch.set_num_threads(1)


def ctx_for(name: str = "model.language_model.layers.0.mlp.up_proj.weight", **kw) -> TensorContext:
    logs: list[str] = []
    c = TensorContext(name=name, component="language_model", log=logs.append, **kw)
    c.info["logs"] = logs
    return c


def run(method: str, tvs, ctx=None, **params):
    meth = get_method(method)
    kw = meth.resolve(params, [{}] * len(tvs))
    ctx = ctx or ctx_for(num_models=len(tvs))
    base = torch.zeros_like(tvs[0])
    return meth.fn(base, [t.clone() for t in tvs], ctx, **kw)


def dense_tvs(T: int, m: int, n: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g, dtype=dtype) * 0.01 for _ in range(T)]


def lora_factors(T: int, m: int, n: int, k: int, seed: int = 0, dtype=torch.float64) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    return [
        LowRank(
            torch.randn(m, k, generator=g, dtype=dtype) * 0.1,
            torch.randn(k, n, generator=g, dtype=dtype) * 0.1,
            2.0,
        )
        for _ in range(T)
    ]


# --- literal re-statements of the reference code (small sizes only) ----------------------------------------


def ref_wudi(tvs, steps, lr):
    vectors = torch.stack(tvs)
    M = torch.nn.Parameter(vectors.sum(0))
    opt = torch.optim.Adam([M], lr=lr)
    norms = vectors.reshape(len(tvs), -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = torch.matmul(M.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = (inner.square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return M.detach()


def ref_optmerge(tvs, variant, steps, lr):
    vectors = torch.stack(tvs)
    N, m, n = vectors.shape
    k = min(m, n)
    r = int(k / N) if variant == "lora" else max(1, k // N)
    avg = vectors.mean(0)
    lows, tgts = [], []
    for v in vectors:
        _, s, vh = torch.linalg.svd(v, full_matrices=True)
        src = v if variant == "lora" else v - avg
        u2, s2, v2 = torch.linalg.svd(src, full_matrices=False)
        S = torch.zeros(m, n, dtype=v.dtype)
        s_masked = s.clone()
        s_masked[r:] = 0
        vh_masked = vh.clone()
        vh_masked[r:] = 0
        S[:k, :k] = torch.diag(s_masked)
        lows.append(S @ vh_masked)
        t = u2[:, :r] @ torch.diag(s2[:r]) @ v2[:r]
        tgts.append(t if variant == "lora" else t + avg)
    low, tgt = torch.stack(lows), torch.stack(tgts)
    M = torch.nn.Parameter(avg.clone() if variant == "lora" else vectors.sum(0))
    opt = torch.optim.SGD([M], lr=lr, momentum=0.9) if variant == "lora" else torch.optim.Adam([M], lr=lr)
    norms = vectors.reshape(N, -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = torch.matmul(M.unsqueeze(0) - tgt, low.transpose(1, 2))
        loss = (inner.square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return M.detach()


def ref_spectral(tvs, f_rule, init="sum"):
    v = torch.stack(tvs)
    inv = 1.0 / v.reshape(len(tvs), -1).norm(dim=-1).square()
    B = torch.einsum("nab,nac->nbc", v, v)
    C = torch.einsum("n,nbc->bc", inv, B)
    D = torch.einsum("n,nac->ac", inv, torch.einsum("nab,nbc->nac", v, B))
    lam, V = torch.linalg.eigh(C)
    lam = lam.clamp(min=1e-8)
    f = f_rule(lam)
    theta0 = v.sum(0) if init == "sum" else v.mean(0)
    return theta0 - ((theta0 @ V) * f) @ V.T + ((D @ V) * (f / lam)) @ V.T


# --- Iso-C / Iso-CTS / TSV ---------------------------------------------------------------------------------


def test_iso_c_flat_spectrum_and_mean():
    tvs = dense_tvs(3, 30, 20)
    out = run("iso_c", tvs, scaling=1.0)
    s = torch.linalg.svdvals(out)
    mean_s = torch.linalg.svdvals(sum(tvs)).mean()
    assert torch.allclose(s, torch.full_like(s, float(mean_s)), rtol=1e-10)


def test_iso_cts_flat_spectrum_and_sizes():
    tvs = dense_tvs(3, 24, 20, seed=1)
    out = run("iso_cts", tvs, scaling=1.0)
    s = torch.linalg.svdvals(out)
    assert float(s.max() - s.min()) < 1e-10 * float(s.max())
    # FusionBench's rank rules (k_c then the task-specific total rounded to a multiple of T)
    assert iso_cts_sizes(32, 3, 0.8) == (26, 2)
    assert iso_cts_sizes(20, 3, 0.8) == (17, 1)
    assert iso_cts_sizes(25, 2, 0.8) == (21, 2)  # Python round: 2.5 -> 2
    kc, d = iso_cts_sizes(32, 3, 0.0)  # the reference would overflow (k_c = -1): floored
    assert kc >= 0 and kc + 3 * d == 32


def test_tsv_single_expert_is_truncation():
    (tv,) = dense_tvs(1, 20, 16, seed=2)
    full = run("tsv", [tv], scaling=1.0)
    assert torch.allclose(full, tv, atol=1e-12)
    out = run("tsv", [tv], scaling=0.5, rank_fraction=0.25)
    u, s, vh = torch.linalg.svd(tv, full_matrices=False)
    assert torch.allclose(out, 0.5 * (u[:, :4] * s[:4]) @ vh[:4], atol=1e-12)


def test_tsv_matches_padded_reference():
    tvs = dense_tvs(3, 20, 16, seed=3)
    r = 16 // 3
    sum_u = torch.zeros(20, 16, dtype=torch.float64)
    sum_s = torch.zeros(16, dtype=torch.float64)
    sum_v = torch.zeros(16, 16, dtype=torch.float64)
    for i, tv in enumerate(tvs):
        u, s, v = torch.linalg.svd(tv, full_matrices=False)
        sum_u[:, i * r : (i + 1) * r] = u[:, :r]
        sum_s[i * r : (i + 1) * r] = s[:r]
        sum_v[i * r : (i + 1) * r] = v[:r]
    uu, _, vu = torch.linalg.svd(sum_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sum_v, full_matrices=False)
    ref = torch.linalg.multi_dot([uu, vu, torch.diag(sum_s), uv, vv])
    assert torch.allclose(run("tsv", tvs, scaling=1.0), ref, atol=1e-12)


def test_lowrank_path_equals_dense_path():
    T, m, n, k = 3, 30, 24, 8  # rank budget int(24 / 3) = 8 = LoRA rank
    fs = lora_factors(T, m, n, k)
    tvs = [f.dense() for f in fs]
    for method in ("tsv", "optmerge"):
        params = {"variant": "lora", "steps": 20} if method == "optmerge" else {}
        dense = run(method, tvs, **params)
        low = run(method, tvs, ctx_for(num_models=T, factors=fs), **params)
        assert torch.allclose(low, dense, rtol=1e-8, atol=1e-10), method
    # the factor SVD equals the dense truncated SVD
    u, s, vh = fs[0].svd()
    ud, sd, vhd = truncated_svd(tvs[0], k)
    assert torch.allclose(s, sd, rtol=1e-10)
    assert torch.allclose((u * s) @ vh, (ud * sd) @ vhd, atol=1e-12)
    # optmerge full variant (centred targets from combined factors) agrees too
    dense = run("optmerge", tvs, variant="full", steps=5)
    low = run("optmerge", tvs, ctx_for(num_models=T, factors=fs), variant="full", steps=5)
    assert torch.allclose(low, dense, rtol=1e-7, atol=1e-10)


def test_iso_c_lowrank_path_keeps_span():
    T, m, n, k = 3, 30, 24, 2
    fs = lora_factors(T, m, n, k, seed=4)
    tvs = [f.dense() for f in fs]
    out = run("iso_c", tvs, ctx_for(num_models=T, factors=fs), scaling=1.0)
    s_sum = torch.linalg.svdvals(sum(tvs))
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s[: T * k], torch.full((T * k,), float(s_sum.sum() / 24), dtype=s.dtype))
    assert float(s[T * k :].abs().max()) < 1e-12
    # Iso-CTS: the adapters lie in the common space, so the residuals vanish and it reduces to the same
    cts = run("iso_cts", tvs, ctx_for(num_models=T, factors=fs), scaling=1.0)
    assert torch.allclose(cts, out, atol=1e-12)


def test_randomized_svd_close_to_exact():
    g = torch.Generator().manual_seed(5)
    m, n, r = 300, 200, 10
    low = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    x = low + 1e-3 * torch.randn(m, n, generator=g)
    ue, se, vhe = truncated_svd(x, r)
    ur, sr, vhr = truncated_svd(x, r, SvdOptions("randomized", 10, 2), g)
    assert torch.allclose(sr, se, rtol=1e-4)
    err = ((ur * sr) @ vhr - (ue * se) @ vhe).norm() / ((ue * se) @ vhe).norm()
    assert float(err) < 1e-4
    u, s, vh = randomized_svd(x, 20, 1, g)
    assert u.shape == (m, 20) and vh.shape == (20, n)
    tvs = [
        1e-3 * torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
        + 1e-6 * torch.randn(m, n, generator=g)
        for _ in range(2)
    ]
    a = run("tsv", tvs, rank_fraction=0.05, svd="exact")
    b = run("tsv", tvs, rank_fraction=0.05, svd="randomized")
    assert float((a - b).norm() / a.norm()) < 1e-3


# --- WUDI / OptMerge ---------------------------------------------------------------------------------------


def test_efficient_loss_and_gradient_equal_reference():
    tvs = dense_tvs(3, 6, 40, seed=6)  # T m = 18 < n / 2: factor form
    norms = [float(t.square().sum()) for t in tvs]
    M = torch.randn(6, 40, dtype=torch.float64) * 0.01
    for problem in (problem_from_task_vectors(tvs, norms), _gram(tvs, norms)):
        ref = reference_loss(M, tvs, tvs, norms)
        assert math.isclose(problem.loss(M), ref, rel_tol=1e-10)
        Mp = M.clone().requires_grad_(True)
        loss = sum(((Mp - t) @ t.T).square().sum() / nn for t, nn in zip(tvs, norms, strict=True))
        loss.backward()
        assert torch.allclose(problem.grad(M)[0], Mp.grad, rtol=1e-10, atol=1e-14)
    assert problem_from_task_vectors(tvs, norms).form == "factor"
    # OptMerge: the n x r factor form equals the literal loss with m x n targets/projectors
    c = ctx_for(num_models=3)
    for variant in ("lora", "full"):
        problem, targets, P, kept = optmerge_problem(tvs, c, variant, keep_dense=True)
        assert math.isclose(problem.loss(M), reference_loss(M, targets, P, kept), rel_tol=1e-10)


def _gram(tvs, norms) -> WudiProblem:
    C = sum(t.T @ t / nn for t, nn in zip(tvs, norms, strict=True))
    D = sum(t @ (t.T @ t) / nn for t, nn in zip(tvs, norms, strict=True))
    const = sum(float((t @ t.T).square().sum()) / nn for t, nn in zip(tvs, norms, strict=True))
    return WudiProblem(C=C, D=D, const=const)


@pytest.mark.parametrize("shape", [(12, 10), (6, 40)])
def test_wudi_trajectory_equals_autograd_reference(shape):
    tvs = dense_tvs(3, *shape, seed=7, dtype=torch.float32)
    out, _ = wudi_merge([t.clone() for t in tvs], steps=40, lr=1e-4)
    ref = ref_wudi(tvs, 40, 1e-4)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant,lr", [("lora", 1e-1), ("full", 1e-4)])
@pytest.mark.parametrize("shape", [(12, 10), (6, 40)])
def test_optmerge_trajectory_equals_autograd_reference(variant, lr, shape):
    tvs = dense_tvs(3, *shape, seed=8)
    out, _ = optmerge_merge([t.clone() for t in tvs], ctx_for(num_models=3), variant, steps=40, lr=lr)
    ref = ref_optmerge(tvs, variant, 40, lr)
    assert torch.allclose(out, ref, rtol=1e-8, atol=1e-12)


def test_losses_decrease():
    tvs = dense_tvs(4, 16, 12, seed=9)
    _, hist = wudi_merge([t.clone() for t in tvs], steps=50, lr=1e-4, record_loss=True)
    assert (
        len(hist) == 51
        and hist[-1] < hist[0]
        and all(b <= a * (1 + 1e-9) for a, b in zip(hist, hist[1:], strict=False))
    )
    for variant, lr in (("lora", 0.5), ("full", 1e-4)):
        _, hist = optmerge_merge(
            [t.clone() for t in tvs], ctx_for(num_models=4), variant, steps=50, lr=lr, record_loss=True
        )
        assert hist[-1] < 0.9 * hist[0], variant


def test_factor_and_gram_forms_same_trajectory():
    tvs = dense_tvs(2, 6, 30, seed=10)
    norms = [float(t.square().sum()) for t in tvs]
    fac = problem_from_task_vectors(tvs, norms)
    assert fac.form == "factor"
    a, _ = optimise(sum(tvs).clone(), fac, optimizer="adam", lr=1e-4, steps=30)
    b, _ = optimise(sum(tvs).clone(), _gram(tvs, norms), optimizer="adam", lr=1e-4, steps=30)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_optmerge_fp16_loop_close_to_fp32():
    tvs = dense_tvs(3, 16, 12, seed=11, dtype=torch.float32)
    a = run("optmerge", tvs, variant="lora", steps=30, lr=0.5)
    b = run("optmerge", tvs, variant="lora", steps=30, lr=0.5, compute_dtype="float16")
    assert b.dtype == torch.float32
    assert float((a - b).norm() / a.norm()) < 1e-2


def test_variant_defaults_and_auto_pass():
    T, m, n = 3, 40, 32
    fs = lora_factors(T, m, n, 2, seed=12)
    lora_tvs = [f.dense() + 1e-9 * torch.randn(m, n, dtype=torch.float64) for f in fs]
    full_tvs = dense_tvs(T, m, n, seed=13)
    gp = get_method("optmerge").global_pass
    assert isinstance(gp, OptMergeAutoPass)
    assert gp.needed({"variant": "auto"}) and not gp.needed({"variant": "full"})
    for tvs, factors, expect in ((lora_tvs, fs, "lora"), (lora_tvs, None, "lora"), (full_tvs, None, "full")):
        state = gp.init(T, {"variant": "auto"})
        for layer in range(3):
            c = ctx_for(
                f"model.language_model.layers.{layer}.mlp.up_proj.weight", num_models=T, factors=factors
            )
            gp.update(0, state, tvs, c)
        stats = gp.result(state)
        assert stats["variant"] == expect
        c = ctx_for(num_models=T, factors=factors, stats=stats)
        out = run("optmerge", tvs, c, steps=3)
        assert any(f"auto -> {expect}" in msg for msg in c.info["logs"])
        explicit = run("optmerge", tvs, ctx_for(num_models=T, factors=factors), variant=expect, steps=3)
        assert torch.allclose(out, explicit, rtol=1e-10, atol=1e-14)
    # null scaling -> the variant's default (lora 1.0, full 0.1)
    a = run("optmerge", full_tvs, variant="full", steps=2)
    b = run("optmerge", full_tvs, variant="full", steps=2, scaling=0.1)
    assert torch.equal(a, b)


def test_parameters_out_of_range_rejected():
    meth = get_method("optmerge")
    with pytest.raises(MethodParameterError, match="steps"):
        meth.resolve({"steps": -1}, [{}, {}])
    with pytest.raises(MethodParameterError, match="lr"):
        meth.resolve({"lr": 0.0}, [{}, {}])
    with pytest.raises(MethodParameterError, match="variant"):
        meth.resolve({"variant": "qlora"}, [{}, {}])
    with pytest.raises(MethodParameterError, match="steps"):
        get_method("wudi").resolve({"steps": 1.5}, [{}, {}])
    with pytest.raises(MethodParameterError, match="common_space_fraction"):
        get_method("iso_cts").resolve({"common_space_fraction": 1.5}, [{}, {}])
    with pytest.raises(MethodParameterError, match="svd"):
        get_method("tsv").resolve({"svd": "lanczos"}, [{}, {}])
    assert meth.resolve({"scaling": None, "lr": None}, [{}, {}])["scaling"] is None


def test_half_precision_inputs_run_in_float32():
    tvs = [t.to(torch.bfloat16) for t in dense_tvs(3, 16, 12, seed=19)]
    for method in ("tsv", "iso_c", "iso_cts", "wudi", "optmerge", "swudi", "aswudi"):
        params = {"steps": 3} if method in ("wudi", "optmerge") else {}
        out = run(method, tvs, **params)
        ref = run(method, [t.float() for t in tvs], **params)
        assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-4), method


def test_non_matrix_and_zero_task_vectors():
    g = torch.Generator().manual_seed(14)
    vecs = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3)]
    for method in ("tsv", "iso_c", "iso_cts", "wudi", "optmerge", "swudi", "aswudi"):
        out = run(method, vecs, scaling=0.5)
        assert torch.allclose(out, 0.5 * sum(vecs) / 3), method
    heads = dense_tvs(3, 10, 8, seed=18)
    for method in ("tsv", "iso_c", "wudi", "optmerge", "swudi"):
        out = run(method, heads, ctx_for("lm_head.weight", num_models=3), scaling=1.0)
        assert torch.allclose(out, sum(heads) / 3), method
    tvs = dense_tvs(2, 10, 8, seed=15)
    tvs.append(torch.zeros(10, 8, dtype=torch.float64))
    for method in ("wudi", "optmerge", "swudi", "aswudi"):
        out = run(method, tvs, steps=5) if method in ("wudi", "optmerge") else run(method, tvs)
        assert torch.isfinite(out).all(), method


# --- SWUDI / ASWUDI ----------------------------------------------------------------------------------------


def test_swudi_matches_reference_closed_form():
    for shape in ((12, 10), (4, 30)):  # eigh of C / SVD of the stacked task vectors (T m <= n / 2)
        tvs = dense_tvs(3, *shape, seed=16)
        n = shape[1]
        K = max(1, int((n * 0.65 + 0.999) // 1))

        def rule(lam, K=K, n=n):
            f = 1.0 - torch.exp(-lam * 300.0)
            f[: n - K] = 0.0
            return f

        out = run("swudi", tvs, scaling=1.0)
        assert torch.allclose(out, ref_spectral(tvs, rule), rtol=1e-7, atol=1e-10), shape
        out = run("swudi", tvs, scaling=1.0, truncate_rank_ratio=None, init="mean")
        ref = ref_spectral(tvs, lambda lam: 1.0 - torch.exp(-lam * 300.0), init="mean")
        assert torch.allclose(out, ref, rtol=1e-7, atol=1e-10), shape


def test_aswudi_matches_reference_closed_form():
    tvs = dense_tvs(3, 12, 10, seed=17)
    v = torch.stack(tvs)
    inv = 1.0 / v.reshape(3, -1).norm(dim=-1).square()
    C = torch.einsum("n,nbc->bc", inv, torch.einsum("nab,nac->nbc", v, v))
    lam = torch.linalg.eigvalsh(C).clamp(min=1e-8).flip(0).sqrt()
    K = math.ceil(float(lam.sum() ** 2 / (lam**2).sum()))
    c = ctx_for(num_models=3)
    out = run("aswudi", tvs, c, scaling=1.0)
    assert c.info["aswudi_rank"] == K

    def rule(lam_asc):
        f = torch.zeros_like(lam_asc)
        f[10 - K :] = 1.0
        return f

    assert torch.allclose(out, ref_spectral(tvs, rule), rtol=1e-7, atol=1e-10)


def test_thin_svd_of_wide_and_tall_matrices() -> None:
    from omnimerge.methods.spectral import thin_svd

    g = torch.Generator().manual_seed(3)
    for shape in ((40, 90), (90, 40), (50, 50)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        u, s, vh = thin_svd(x)
        k = min(shape)
        assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
        torch.testing.assert_close((u * s) @ vh, x)
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=x.dtype))
        torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=x.dtype))
        torch.testing.assert_close(s, torch.linalg.svdvals(x))


# --- CART and SVC ----------------------------------------------------------------------------------------------


def test_cart_with_two_experts_is_weight_averaging() -> None:
    """Two centred task vectors are +-(tau_1 - tau_2)/2: their truncations cancel, leaving the mean."""
    g = torch.Generator().manual_seed(3)
    tvs = [torch.randn(24, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    out = run("cart", tvs, scaling=2.0, rank_ratio=0.25)
    torch.testing.assert_close(out, (tvs[0] + tvs[1]) / 2, rtol=0, atol=1e-12)


def test_cart_adds_the_rank_k_parts_of_the_centred_vectors() -> None:
    g = torch.Generator().manual_seed(4)
    tvs = [torch.randn(20, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    mean = sum(tvs) / 3
    want = mean.clone()
    k = max(1, int(0.2 * 12))  # 2
    for tv in tvs:
        u, s, vh = torch.linalg.svd(tv - mean)
        want += 1.5 * (u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    torch.testing.assert_close(run("cart", tvs, scaling=1.5, rank_ratio=0.2), want, rtol=1e-10, atol=1e-12)
    # a tiny ratio still keeps rank 1; non-matrix parameters get the mean
    assert torch.linalg.matrix_rank(run("cart", tvs, scaling=1.0, rank_ratio=1e-6) - mean) <= 3
    vecs = [t[0].clone() for t in tvs]
    torch.testing.assert_close(run("cart", vecs, ctx=ctx_for("model.norm.weight", num_models=3)),
                               sum(vecs) / 3, rtol=0, atol=1e-12)


def test_svc_single_expert_and_disjoint_experts_closed_forms() -> None:
    g = torch.Generator().manual_seed(5)
    tau = torch.randn(16, 10, generator=g, dtype=torch.float64)
    # T = 1: s_r = lambda for every direction, gamma = 1 / max(alpha, lambda)
    torch.testing.assert_close(run("svc", [tau], scaling=0.3, alpha=0.1), tau, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(run("svc", [tau], scaling=0.3, alpha=1.0), 0.3 * tau, rtol=1e-10, atol=1e-12)
    # experts in disjoint diagonal blocks: each singular direction belongs to one task (s = lambda) and is
    # orthogonal to the others (s = 0, floored at alpha): gamma = T / (lambda + (T - 1) alpha) everywhere
    tvs = [torch.zeros(12, 12, dtype=torch.float64) for _ in range(3)]
    for i, tv in enumerate(tvs):
        tv[4 * i: 4 * i + 4, 4 * i: 4 * i + 4] = torch.randn(4, 4, generator=g, dtype=torch.float64)
    lam, alpha = 0.5, 0.2
    gamma = 3 / (lam + 2 * alpha)
    torch.testing.assert_close(run("svc", tvs, scaling=lam, alpha=alpha), gamma * lam * sum(tvs),
                               rtol=1e-9, atol=1e-12)
