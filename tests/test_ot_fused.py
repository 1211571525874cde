"""The fused token-level OT (GEMM + Triton Sinkhorn kernel) against the torch reference path.

CPU: the kernel runs in Triton's interpreter (TRITON_INTERPRET=1) in one subprocess
(tests/ot_fused_check.py) whose figures the tests below assert on; it avoids the constructs the
Triton 3.6 interpreter rejects, so it passes with the Tritons of torch 2.11 and 2.14.
GPU (``-m gpu``): the same checks compiled on CUDA, plus realistic shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptalign.ot import fused, hierarchical_ot

CHECK = Path(__file__).with_name("ot_fused_check.py")
FORMS_DTYPES = [(f, d) for f in ("paper", "released") for d in ("float32", "bfloat16", "float16")]


def _run_check(device: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, str(CHECK), "--device", device],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interp() -> dict:
    return _run_check("cpu")


def _assert_matches(res: dict) -> None:
    for form, dtype in FORMS_DTYPES:
        key = f"{form}_{dtype}"
        assert res[f"{key}_backend"] == "fused"
        # same input values on both paths (exact products, fp32 sums): 1e-5 for every dtype
        for what in ("distance", "similarity", "score"):
            assert res[f"{key}_{what}"] <= 1e-5, (key, what, res[f"{key}_{what}"])
        assert res[f"{key}_iters_equal"], key
        # the kernel's plan entropy (relative to uniform) is the torch path's ot.plan_entropy_ratio
        assert res[f"{key}_entropy"] <= 1e-5, (key, res[f"{key}_entropy"])
        assert 0.5 < res[f"{key}_entropy_value"] < 1.0, (
            key
        )  # random costs: neither floor nor uniform


def _assert_gradients(res: dict) -> None:
    for name in ("image_global", "image_tokens", "text_global", "text_tokens"):
        assert res[f"grad_{name}_scale"] > 0, name
        assert res[f"grad_{name}"] <= 1e-5 * res[f"grad_{name}_scale"], (name, res[f"grad_{name}"])
        assert res[f"grad_{name}_chunk1"] <= 1e-6 * res[f"grad_{name}_scale"], name  # chunking


def _assert_early_and_invariance(res: dict) -> None:
    assert res["early_score"] <= 1e-5
    assert res["early_mean_iter"][0] == res["early_mean_iter"][1]
    assert res["early_max_iter"][0] == res["early_max_iter"][1] < 60  # stopped early
    # only one-token problems (trivially exact columns) converge in 2 iterations
    assert res["few_converged"] < 0.2 and res["few_max_iter"] == 2
    assert res["chunk_score"] <= 1e-6 and res["chunk_distance"] <= 1e-6
    assert res["subset_score"] <= 1e-6


def test_kernel_matches_torch_path_all_dtypes_both_forms(interp):
    _assert_matches(interp)


def test_kernel_envelope_gradients_match_torch_autograd(interp):
    _assert_gradients(interp)


def test_kernel_early_stop_chunk_and_batch_invariance(interp):
    _assert_early_and_invariance(interp)


def test_forced_fused_is_refused_where_it_cannot_serve(monkeypatch):
    g = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(*s, generator=g) for s in [(1, 2, 4), (1, 2, 5, 4), (2, 2, 4), (2, 2, 3, 4)]
    ]
    if not fused.available():
        with pytest.raises(ValueError, match="backend='fused' cannot run here.*Triton"):
            hierarchical_ot(*feats, backend="fused")
    # pretend the kernel is available: the argument checks come before any launch
    monkeypatch.setattr(fused, "available", lambda: True)
    monkeypatch.setattr(fused, "interpreted", lambda: True)
    with pytest.raises(ValueError, match="eps_token >= 0.03"):
        hierarchical_ot(*feats, backend="fused", eps=0.1, eps_token=0.01, domain="kernel")
    with pytest.raises(ValueError, match="domain='log'"):
        hierarchical_ot(*feats, backend="fused", domain="log")
    grads = [x.clone().requires_grad_(True) for x in feats]
    with pytest.raises(ValueError, match="grad='unrolled'"):
        hierarchical_ot(*grads, backend="fused", grad="unrolled")


def test_chunk_size_follows_the_buffer_budget():
    per_class = 64 * 4 * 198 * 4 * 12 * 4  # fp32 similarity bytes per class at B=64, M=N=4, L=12
    assert fused.chunk_classes(64, 4, 4, 198, 12, 7 * per_class) == 7
    assert fused.chunk_classes(64, 4, 4, 198, 12, 1) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_matches_torch_path():
    res = _run_check("cuda")
    _assert_matches(res)
    _assert_gradients(res)
    _assert_early_and_invariance(res)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_kernel_matches_torch_path_at_vit_b16_shapes(dtype):
    """J = 198, L = 12 ragged, D = 512: scores and gradients as the torch path, 1e-5."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    B, M, J, D, K, N, L = 4, 4, 198, 512, 50, 4, 12
    shapes = [(B, M, D), (B, M, J, D), (K, N, D), (K, N, L, D)]
    lengths = torch.randint(4, L + 1, (K, N), generator=g).cuda()
    base = [torch.randn(*s, generator=g).cuda().to(dtype) for s in shapes]
    out = {}
    for be in ("torch", "fused"):
        feats = [x.clone().requires_grad_(True) for x in base]
        res = hierarchical_ot(
            *feats, text_lengths=lengths, backend=be, domain="kernel", tol=0.0, max_iter=30
        )
        res.score.sum().backward()
        out[be] = (res.score.detach(), [x.grad.float() for x in feats], res.token_stats.max_iter)
    torch.testing.assert_close(out["fused"][0], out["torch"][0], rtol=0, atol=1e-5)
    rel = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[
        dtype
    ]  # grads in dtype
    for gf, gt in zip(out["fused"][1], out["torch"][1]):
        assert (gf - gt).abs().max() <= rel * gt.abs().max()
