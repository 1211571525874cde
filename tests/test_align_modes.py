"""ALIGN's prompt sets: per-set initialisation phrases, set distances, the modes view of
``explain`` and the modes benchmark script."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptalign
from promptalign.benchmark import config_fingerprint, job_config, make_jobs
from promptalign.cli import main
from promptalign.config import ConfigError
from promptalign.explain import (
    ExplainError,
    explain_images,
    mean_pairwise_distance,
    set_maps,
)
from promptalign.methods import create_method
from promptalign.methods.explainable import plan_entropy_ratio
from promptalign.ot import hierarchical_ot
from promptalign.viz import draw_modes

from conftest import images_for, small_config

CLASSES = ["red circle", "blue square", "green triangle", "tree"]
PHRASES = "a photo of a\ta nice photo of\ta large picture of"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes() -> promptalign.Backbone:
    return promptalign.load_backbone("tiny-shapes")


def _align(bb, **opts):
    torch.manual_seed(0)
    return create_method("align", bb, CLASSES, **{**small_config("align"), **opts}).eval()


# --------------------------------------------------------------------------- initialisation
def test_default_init_is_the_released_one(shapes):
    m = _align(shapes, n_sets=3)
    ref = shapes.embed_tokens(shapes.tokenize(["a photo"]))[0, 1:3]
    torch.testing.assert_close(m.prompts.ctx[0], ref)  # set 0 from "a photo of a"
    assert m.suffixes == ["of a", "", ""]  # "of a" stays literal, sets 1.. have no words
    assert m.prompts.ctx[1:].std() < 0.03  # N(0, 0.02)


def test_one_phrase_per_set_as_the_released_ctx_init(shapes):
    plain = _align(shapes, n_sets=4)
    m = _align(shapes, n_sets=4, ctx_init=PHRASES)
    assert m.config.phrases() == ["a photo of a", "a nice photo of", "a large picture of"]
    assert m.suffixes == ["of a", "photo of", "picture of", ""]
    for i, words in enumerate(["a photo", "a nice", "a large"]):
        ref = shapes.embed_tokens(shapes.tokenize([words]))[0, 1:3]
        torch.testing.assert_close(m.prompts.ctx[i], ref)
    # the set without a phrase and every deeper prompt keep the random draw of the default
    assert torch.equal(m.prompts.ctx[3], plain.prompts.ctx[3])
    assert torch.equal(m.prompts.deep_ctx, plain.prompts.deep_ctx)
    # each set's prompt renders its phrase's remaining words before the class name
    tok = shapes.tokenizer
    texts = [tok.decode(t[t > 0].tolist()) for t in m.tokens[:, 1]]
    assert "x x of a blue square" in texts[0] and "x x photo of blue square" in texts[1]
    assert "x x picture of blue square" in texts[2] and "x x blue square" in texts[3]
    assert torch.equal(m.name_end, plain.name_end)  # the released token window follows set 0
    x = images_for(shapes, 2)
    with torch.no_grad():
        assert torch.isfinite(m.logits(x)).all()


@pytest.mark.parametrize(
    "ctx_init,message",
    [
        ("a photo of a\ta b c\ta b c\ta b c\ta b c", "5 tab-separated phrases for n_sets=4"),
        ("a photo of a\t\ta b c", "empty phrase"),
    ],
)
def test_bad_phrase_lists_name_ctx_init(shapes, ctx_init, message):
    with pytest.raises(ConfigError, match=f"ctx_init: .*{re.escape(message)}"):
        _align(shapes, n_sets=4, ctx_init=ctx_init)


# --------------------------------------------------------------------------- distances and maps
def test_mean_pairwise_distance_reference_points():
    e = torch.eye(3)
    assert float(mean_pairwise_distance(e)) == pytest.approx(1.0)  # orthogonal sets
    assert float(mean_pairwise_distance(torch.ones(4, 5) * 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(mean_pairwise_distance(torch.randn(1, 7))) == 0.0  # one set
    x = torch.randn(2, 5, 4, 8)
    z = torch.nn.functional.normalize(x, dim=-1)
    pairs = [1 - (z[..., i, :] * z[..., j, :]).sum(-1) for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(mean_pairwise_distance(x), torch.stack(pairs).mean(0))


def test_token_match_maps_come_from_the_ot_modules_plans(shapes):
    m = _align(shapes, n_sets=3, ctx_init=PHRASES)
    x = images_for(shapes, 1, seed=4)
    ex = explain_images(m, x, topk=2)
    feats = m.explain_features(x)
    grid = ex.images[0].grid
    J = feats.image_tokens.shape[2]
    patch_idx = [j for j in range(J) if j not in range(J)[feats.prompt_slice]]
    res = hierarchical_ot(
        feats.image_global,
        feats.image_tokens,
        feats.text_global,
        feats.text_tokens,
        feats.text_mask,
        plans=True,
        **feats.options,
    )
    for c in ex.images[0].classes:
        tp = res.token_plan[0, c.index][:, :, patch_idx]  # [M, N, G, L]
        ts = res.token_sim[0, c.index][:, :, patch_idx]
        want = (tp * ts).sum(-1) / tp.sum(-1)  # mass-weighted cosine per patch
        np.testing.assert_allclose(c.patch_match.reshape(*want.shape), want.numpy(), atol=1e-5)
        maps, kind = set_maps(c)
        assert kind == "token match" and maps.shape == (3, *grid)
        w = c.prompt_plan / c.prompt_plan.sum(1, keepdims=True)
        np.testing.assert_allclose(maps[1], np.tensordot(w[1], c.patch_match[1], 1), rtol=1e-6)
        # the set distances of the explanation are those of the features
        torch.testing.assert_close(
            torch.tensor(ex.images[0].image_set_distance),
            mean_pairwise_distance(feats.image_global[0]),
        )
        assert c.text_set_distance == pytest.approx(
            float(mean_pairwise_distance(feats.text_global[c.index])), abs=1e-6
        )


def test_modes_figure_and_its_caption_state_the_plan_entropy(shapes, tmp_path):
    m = _align(shapes, n_sets=3)
    ex = explain_images(m, images_for(shapes, 1, seed=2), topk=2, modes=True)
    im = ex.images[0]
    for c in im.classes:
        ratio = float(plan_entropy_ratio(torch.tensor(c.prompt_plan, dtype=torch.float64)))
        caption = im.modes_caption(c)
        assert f"prompt plan entropy {ratio:.5f} of uniform" in caption
        assert f"image {im.image_set_distance:.2e}" in caption
    png = draw_modes(im, tmp_path / "modes.png", method="align")
    with Image.open(png) as pic:
        assert pic.format == "PNG" and pic.width > 600 and pic.height > 300


def test_modes_of_plot_use_patch_cosines_and_one_prompt_methods_are_refused(shapes, tmp_path):
    torch.manual_seed(0)
    plot = create_method("plot", shapes, CLASSES, **small_config("plot")).eval()
    ex = explain_images(plot, images_for(shapes, 1), topk=1, modes=True)
    c = ex.images[0].classes[0]
    maps, kind = set_maps(c)
    assert (
        kind == "patch cosine"
        and maps.shape[0] == plot.explain_features(images_for(shapes, 1)).image_global.shape[1]
    )
    assert draw_modes(ex.images[0], tmp_path / "plot.png").is_file()
    torch.manual_seed(0)
    coop = create_method("coop", shapes, CLASSES, **small_config("coop")).eval()
    with pytest.raises(ExplainError, match="one prompt per modality") as err:
        explain_images(coop, images_for(shapes, 1), modes=True)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Untrained (0-epoch) ALIGN and CoOp runs saved by ``promptalign train``."""
    from data_fixtures import make_json_dataset

    root = tmp_path_factory.mktemp("modes")
    make_json_dataset(root / "data", "oxford_pets")
    out = {}
    for name, extra in (("align", ["method.options.n_sets=2"]), ("coop", [])):
        opts = [f"method.options.{k}={json.dumps(v)}" for k, v in small_config(name).items()]
        run = root / name
        argv = ["train", "--method", name, "--dataset", "oxford_pets", "--data-root"]
        argv += [str(root / "data"), "--shots", "1", "--out", str(run), "--arch", "tiny-shapes"]
        argv += ["--device", "cpu", "--workers", "0", "--no-progress", "optim.epochs=0"]
        assert main([*argv, "optim.eval_batch_size=8", *opts, *extra]) == 0
        out[name] = run
    images = sorted((root / "data" / "oxford_pets" / "images").rglob("*_test_*.jpg"))[:1]
    return out, images


def test_cli_modes_writes_the_view_and_refuses_one_prompt_methods(runs, tmp_path, capsys):
    run, images = runs
    capsys.readouterr()
    argv = ["explain", str(run["align"]), str(images[0]), "--modes", "--topk", "1"]
    assert main([*argv, "--out", str(tmp_path), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    png = tmp_path / f"{images[0].stem}-modes.png"
    with Image.open(png) as pic:
        assert pic.format == "PNG"
    data = json.loads((tmp_path / f"{images[0].stem}-modes.json").read_text())
    c = data["image"]["classes"][0]
    assert np.asarray(c["patch_match"]).shape == (2, 2, 6, 6)
    ratio = float(plan_entropy_ratio(torch.tensor(c["prompt_plan"], dtype=torch.float64)))
    assert f"modes: {c['name']} (p=" in printed and f"entropy {ratio:.5f} of uniform" in printed
    assert main(["explain", str(run["coop"]), str(images[0]), "--modes", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("promptalign explain: error:") and len(err.splitlines()) == 1
    assert "one prompt per modality" in err


# --------------------------------------------------------------------------- benchmark script
def _script():
    spec = importlib.util.spec_from_file_location(
        "align_modes", ROOT / "benchmarks" / "align_modes.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["align_modes"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_m4_released_short_cell_is_the_readme_align_job():
    """The script's M = 4, released-init, short-schedule jobs have the fingerprints of the
    README's short base-to-new table (its command's overrides), so they are shared."""
    mod = _script()
    readme = [
        "run.device=cpu",
        "backbone.arch=tiny-shapes-v3",
        "backbone.weights=null",
        "data.workers=0",
        "optim.epochs=10",
        "optim.batch_size=32",
        "optim.eval_batch_size=256",
    ]
    job = make_jobs("base2new", ["align"], ["synthetic_colour_shapes"], [1])[0]
    fp = {
        name: config_fingerprint(job_config(job, overrides, "bench-data"))
        for name, overrides in {
            "readme": readme,
            "released": mod.cell_overrides(4, "short", "released"),
            "phrases": mod.cell_overrides(4, "short", "phrases"),
            "m1 phrases": mod.cell_overrides(1, "short", "phrases"),
            "m1 released": mod.cell_overrides(1, "short", "released"),
        }.items()
    }
    assert fp["readme"] == fp["released"] != fp["phrases"]
    assert fp["m1 phrases"] == fp["m1 released"]  # one set: one init, one job


def test_script_table_resumes_from_its_job_folders(tmp_path):
    mod = _script()
    argv = ["--out", str(tmp_path / "b"), "--data-root", str(tmp_path / "data"), "--seeds", "1"]
    argv += ["--sets", "2", "--schedules", "short", "--inits", "released"]
    argv += ["--override", "optim.epochs=0"]  # evaluation only: the table, not the training
    assert mod.main(argv) == 0
    md = (tmp_path / "b" / "align-modes.md").read_text()
    assert md.startswith("```bash\npython benchmarks/align_modes.py --out")
    assert "| 2 | short | released | 1 |" in md
    (row,) = [json.loads(ln) for ln in (tmp_path / "b" / "align-modes.jsonl").open()]
    assert row["sets"] == 2 and row["seeds"] == [1]
    assert 0.5 <= row["mean"]["prompt_entropy"] <= 1 + 1e-6
    assert row["mean"]["text_distance"] > 0 and row["mean"]["image_distance"] >= 0
    (job,) = row["per_seed"]
    assert job["sets"] == [2, 2] and job["n_images"] == 288 and job["n_classes"] == 24
    files = [Path(job["job_dir"]) / f for f in ("result.json", "modes.json")]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert mod.main(argv) == 0  # everything from the job folder, nothing run again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (tmp_path / "b" / "align-modes.md").read_text() == md
