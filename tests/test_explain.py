"""`promptalign explain`: recomputed plans, heat maps, decoded words, score decomposition, CLI."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import promptalign
from promptalign.cli import main
from promptalign.engine import evaluate_run
from promptalign.explain import (
    ExplainError,
    decode_tokens,
    explain_images,
    project_2d,
)
from promptalign.methods import create_method
from promptalign.methods.explainable import plan_entropy_ratio

from conftest import assert_rel_close, images_for, small_config
from data_fixtures import make_json_dataset

CLASSES = ["red circle", "blue square", "green zorbluxian", "tree"]
ALIGN_FORMS = {
    "paper": {},
    "released": {"form": "released", "token_window": "prompt0", "tol": 1e-2, "domain": "kernel"},
}


@pytest.fixture(scope="module")
def shapes() -> promptalign.Backbone:
    return promptalign.load_backbone("tiny-shapes")


def _method(name, bb, **opts):
    torch.manual_seed(0)
    return create_method(name, bb, CLASSES, **{**small_config(name), **opts}).eval()


def _close(a: float, b: float, scale: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(abs(scale), 1.0)


@pytest.mark.parametrize("form", sorted(ALIGN_FORMS))
def test_align_plans_have_the_right_marginals_and_rebuild_the_logits(shapes, form):
    m = _method("align", shapes, n_sets=3, **ALIGN_FORMS[form])
    x = images_for(shapes, 2, seed=3)
    ex = explain_images(m, x, topk=len(CLASSES))
    with torch.no_grad():
        logits = m.logits(x)
    scale = float(logits.abs().max())
    tol = m.config.tol
    for b, im in enumerate(ex.images):
        assert [c.index for c in im.classes] == logits[b].argsort(descending=True).tolist()
        for c in im.classes:
            assert _close(c.logit, float(logits[b, c.index]), scale), (
                c.logit,
                float(logits[b, c.index]),
            )
            # prompt level: rows exactly 1/M, columns 1/N within the Sinkhorn tolerance
            M, N = c.prompt_plan.shape
            assert M == N == 3
            np.testing.assert_allclose(c.prompt_plan.sum(1), 1 / M, atol=1e-6)
            assert np.abs(c.prompt_plan.sum(0) - 1 / N).sum() <= tol + 1e-6
            # decomposition: the per-pair terms add up to the logit
            total = c.logit_global.sum() + c.logit_token.sum() + c.logit_extra
            assert _close(total, c.logit, scale)
            if form == "released":
                assert np.all(c.logit_token == 0)
            # token level: rows 1/J, real columns 1/L_k, padding columns carry nothing
            J = c.token_plans.shape[2]
            np.testing.assert_allclose(c.token_plans.sum(-1), 1 / J, atol=1e-6)
            mask = m.class_features()["mask"][c.index].numpy()  # [N, L]
            cols = c.token_plans.sum(-2)  # [M, N, L]
            for n in range(N):
                L_n = int(mask[n].sum())
                assert np.all(cols[:, n, ~mask[n]] == 0)
                assert np.all(np.abs(cols[:, n, mask[n]] - 1 / L_n).sum(-1) <= tol + 1e-6)
            assert 0.5 - 1e-6 <= c.entropy["prompt"] <= 1 + 1e-6
            assert c.entropy["token"].shape == (M, N)


def test_token_plans_match_the_ot_module_token_distance(shapes):
    """The token plans the head recomputes for explain give the token distance hierarchical_ot
    itself computes."""
    from promptalign.ot import hierarchical_ot

    m = _method("align", shapes, n_sets=2)
    x = images_for(shapes, 2, seed=4)
    with torch.no_grad():
        f = m.explain_features(x)
        idx = torch.arange(len(CLASSES))
        mine = f.head.plans(f, idx)
        ref = hierarchical_ot(
            f.image_global, f.image_tokens, f.text_global, f.text_tokens, f.text_mask, **f.options
        )
    assert_rel_close(mine["token_term"], ref.token_distance, 1e-5)
    assert_rel_close(mine["plan"], ref.prompt_plan, 1e-5)
    assert_rel_close(mine["logits"], f.logit_scale * ref.score, 1e-5)


def test_explain_runs_the_method_forward_once_and_its_head_gives_the_plans(shapes, monkeypatch):
    """The plans come from the head and the features of the forward the logits come from: one
    pass of the visual prompts per explained batch, no second forward."""
    m = _method("align", shapes, n_sets=2, tau_token=0.3)  # an unbalanced token level too
    passes = []
    visual = m.prompts.visual
    monkeypatch.setattr(m.prompts, "visual", lambda: passes.append(1) or visual())
    x = images_for(shapes, 2, seed=9)
    ex = explain_images(m, x, topk=2)
    assert len(passes) == 1
    with torch.no_grad():
        logits = m.logits(x)
    for b, im in enumerate(ex.images):
        for c in im.classes:
            assert _close(c.logit, float(logits[b, c.index]), float(logits.abs().max()))
            M, N = c.prompt_plan.shape  # balanced token plans would move mass 1 each
            assert c.token_plans.sum() < M * N  # relaxed: less mass moves
    assert ex.options["tau_token"] == 0.3


def test_heat_maps_cover_the_image_grid_and_hold_the_transported_mass(shapes):
    m = _method("align", shapes, n_sets=2)
    ex = explain_images(m, images_for(shapes, 1, seed=5), topk=2)
    grid = shapes.clip.visual.grid_size
    assert ex.images[0].grid == tuple(grid) == (6, 6)
    G = grid[0] * grid[1]
    for c in ex.images[0].classes:
        M, N, J, L = c.token_plans.shape
        assert c.heat.shape == (M, N, L, *grid)
        assert J == G + m.config.n_ctx  # patches + visual prompt tokens
        # each text token's heat map holds exactly what its plan column sends to the patches ...
        patch_mass = c.token_plans[:, :, :G, :].sum(2)  # visual prompts sit after the patches
        np.testing.assert_allclose(c.heat.sum((-2, -1)), patch_mass, atol=1e-7)
        # ... which with the prompt-token mass is the column's whole mass
        np.testing.assert_allclose(
            c.heat.sum((-2, -1)) + c.prompt_token_mass, c.token_plans.sum(2), atol=1e-7
        )
        # all maps of a pair together: the G patch rows, 1/J each
        np.testing.assert_allclose(c.heat.sum((2, 3, 4)), G / J, atol=1e-6)
        for n in range(N):  # word masses regroup the same token masses
            np.testing.assert_allclose(
                c.word_mass[n].sum(-1), c.token_plans[:, n].sum((-2, -1)), atol=1e-6
            )
            # mass x cosine per word adds up to the transported similarity <T_hat, S> = 1 - distance
            np.testing.assert_allclose(
                (c.word_mass[n] * c.word_cosine[n]).sum(-1), 1 - c.token_term[:, n], atol=1e-5
            )


def test_decoded_words_match_the_prompt_text(shapes):
    m = _method("align", shapes, n_sets=2)
    ex = explain_images(m, images_for(shapes, 1), classes=["green zorbluxian"], topk=0)
    (c,) = ex.images[0].classes
    first, other = c.tokens
    assert first.words == [
        "<sos>",
        "[ctx1]",
        "[ctx2]",
        "of",
        "a",
        "green",
        "zorbluxian",
        ".",
        "<eot>",
    ]
    assert other.words == ["<sos>", "[ctx1]", "[ctx2]", "green", "zorbluxian", ".", "<eot>"]
    pieces = [
        t for t, w in zip(first.tokens, first.word_of_token) if first.words[w] == "zorbluxian"
    ]
    assert (
        len(pieces) > 1 and "".join(pieces) == "zorbluxian"
    )  # a rare word: several pieces, one word
    assert first.kinds[:3] == ["special", "context", "context"] and first.kinds[-1] == "special"


def test_decode_tokens_groups_word_pieces():
    tok = promptalign.load_backbone("tiny-shapes").tokenizer
    ids = tok("X checkerboarded triangle!")[0]
    ids = ids[: int(ids.argmax()) + 1].tolist()
    labels = decode_tokens(tok, ids, [i == 1 for i in range(len(ids))])
    assert labels.words == ["<sos>", "[ctx1]", "checkerboarded", "triangle", "!", "<eot>"]
    assert len(labels.tokens) > len(labels.words)


def test_plot_plans_and_logits(shapes):
    m = _method("plot", shapes)
    x = images_for(shapes, 2, seed=6)
    ex = explain_images(m, x, topk=3)
    with torch.no_grad():
        logits = m.logits(x)
    scale = float(logits.abs().max())
    for b, im in enumerate(ex.images):
        for c in im.classes:
            assert _close(c.logit, float(logits[b, c.index]), scale)
            M, N = c.prompt_plan.shape
            np.testing.assert_allclose(c.prompt_plan.sum(1), 1 / M, atol=1e-6)
            assert np.abs(c.prompt_plan.sum(0) - 1 / N).sum() <= m.config.tol + 1e-6
            assert c.heat is None and c.patch_cosine.shape == (M, N, 6, 6)
            assert np.all(c.logit_token == 0) and _close(c.logit_global.sum(), c.logit, scale)


def test_single_prompt_methods_get_patch_cosines_with_the_class_feature(shapes):
    m = _method("coop", shapes, n_ctx=4)
    x = images_for(shapes, 2, seed=7)
    ex = explain_images(m, x, classes=["tree"], topk=1)
    assert ex.scorer == "cosine" and ex.panels == "cosine"
    assert "forward_image" not in vars(m.backbone)  # the recording wrapper is gone
    with torch.no_grad():
        tokens = F.normalize(
            shapes.forward_image(x, return_tokens=True).tokens, dim=-1
        )  # [B, G, D]
        text = m.class_features()  # [K, D]
        logits = m.logits(x)
    for b, im in enumerate(ex.images):
        assert im.classes[-1].name == "tree"
        for c in im.classes:
            want = (tokens[b] @ text[c.index]).reshape(6, 6)
            np.testing.assert_allclose(c.patch_cosine[0, 0], want.numpy(), atol=1e-5)
            assert c.logit == pytest.approx(float(logits[b, c.index]))
            assert c.prompt_plan is None and c.heat is None


@pytest.mark.parametrize("name", promptalign.list_methods())
def test_every_method_can_be_explained(shapes, name):
    """Registry-driven: OT methods through their hook, the rest through their image-tower tokens."""
    m = _method(name, shapes)
    x = images_for(shapes, 1, seed=8)
    ex = explain_images(m, x, topk=2)
    with torch.no_grad():
        logits = m.logits(x)
    assert "forward_image" not in vars(m.backbone)
    for c in ex.images[0].classes:
        assert _close(c.logit, float(logits[0, c.index]), float(logits.abs().max()))
        assert c.patch_cosine.shape[-2:] == (6, 6) and np.isfinite(c.patch_cosine).all()
        assert (c.prompt_plan is not None) == hasattr(m, "explain_features")


def test_bad_requests_are_explain_errors(shapes):
    coop = _method("coop", shapes, n_ctx=4)
    x = images_for(shapes, 1)
    with pytest.raises(ExplainError, match="no transport plans.*--panels cosine"):
        explain_images(coop, x, panels="ot")
    with pytest.raises(ExplainError, match=r"unknown class\(es\) \['dragon'\].*red circle"):
        explain_images(coop, x, classes=["dragon"])
    # an OT method can still be shown as patch cosines
    ex = explain_images(_method("align", shapes, n_sets=2), x, panels="cosine")
    assert ex.panels == "cosine" and ex.images[0].classes[0].prompt_plan is None


def test_plan_entropy_ratio_reference_points():
    u = torch.full((4, 4), 1 / 16)
    perm = torch.eye(4) / 4
    assert float(plan_entropy_ratio(u)) == pytest.approx(1.0)
    assert float(plan_entropy_ratio(perm)) == pytest.approx(0.5)
    padded = torch.zeros(4, 6)
    padded[:, :4] = u  # zero padding columns do not count
    assert float(plan_entropy_ratio(padded)) == pytest.approx(1.0)
    assert float(plan_entropy_ratio(torch.ones(1, 1))) == 1.0


@pytest.mark.parametrize("name,key", [("align", "ot_prompt_entropy"), ("plot", "ot_entropy")])
def test_training_step_logs_the_prompt_plan_entropy(shapes, name, key):
    m = _method(name, shapes, **({"n_sets": 2} if name == "align" else {})).train()
    out = m.training_step((images_for(shapes, 2), torch.tensor([0, 1])))
    assert out[key].dim() == 0 and 0.5 - 1e-6 <= float(out[key]) <= 1 + 1e-6
    if name == "align":  # the token level too: mean over every (image, class, m, n) plan
        tok = out["ot_token_entropy"]
        assert tok.dim() == 0 and 0.5 - 1e-6 <= float(tok) < 1.0


def test_projection_falls_back_to_pca_without_scikit_learn(monkeypatch):
    x = np.random.default_rng(0).normal(size=(30, 8))
    x[:15] += 5.0  # two clusters
    pytest.importorskip("sklearn")
    xy, used = project_2d(x, "auto", seed=0)
    assert used == "tsne" and xy.shape == (30, 2)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    xy, used = project_2d(x, "auto")
    assert used == "pca" and xy.shape == (30, 2)
    assert abs(xy[:15, 0].mean() - xy[15:, 0].mean()) > 5.0  # first component separates them
    with pytest.raises(ExplainError, match="scikit-learn"):
        project_2d(x, "tsne")


# --------------------------------------------------------------------------- CLI on trained runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    make_json_dataset(root / "data", "oxford_pets")
    out = {}
    for name in ("align", "plot", "coop"):
        opts = [f"method.options.{k}={json.dumps(v)}" for k, v in small_config(name).items()]
        run = root / name
        argv = [
            "train",
            "--method",
            name,
            "--dataset",
            "oxford_pets",
            "--data-root",
            str(root / "data"),
            "--shots",
            "1",
            "--seed",
            "1",
            "--out",
            str(run),
            "--arch",
            "tiny-shapes",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            "optim.epochs=1",
            "optim.batch_size=4",
            "optim.eval_batch_size=8",
            *opts,
        ]
        assert main(argv) == 0
        out[name] = run
    images = sorted((root / "data" / "oxford_pets" / "images").rglob("*_test_*.jpg"))[:2]
    return root, out, images


@pytest.mark.parametrize(
    "name,keys",
    [
        ("align", {"ot_prompt_entropy", "ot_token_entropy"}),
        ("plot", {"ot_entropy"}),
        ("coop", set()),
    ],
)
def test_plan_entropies_are_logged_in_training_and_evaluation(runs, name, keys, capsys):
    _, run, _ = runs
    lines = [json.loads(ln) for ln in (run[name] / "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    assert steps and all(keys <= ln.keys() for ln in steps)
    final = json.loads((run[name] / "run.json").read_text())["metrics"]
    diag = final.get("diagnostics", {})
    assert keys <= diag.keys()
    for k in keys:  # image means of ratios in [floor, 1]
        assert 0.5 - 1e-6 <= diag[k] <= 1 + 1e-6, (k, diag[k])
    capsys.readouterr()
    assert main(["eval", str(run[name]), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert ("ot_" in printed) == bool(keys)
    again = evaluate_run(run[name], device="cpu")  # re-evaluation reports the same means
    for k in keys:
        assert again["diagnostics"][k] == pytest.approx(diag[k], rel=1e-5)


@pytest.mark.parametrize("name", ["align", "plot", "coop"])
def test_cli_writes_png_and_json(runs, name, tmp_path, capsys):
    _, run, images = runs
    capsys.readouterr()
    assert (
        main(
            [
                "explain",
                str(run[name]),
                *map(str, images),
                "--classes",
                "beagle",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for im in images:
        png, js = tmp_path / f"{im.stem}.png", tmp_path / f"{im.stem}.json"
        with Image.open(png) as pic:
            assert pic.format == "PNG" and pic.width > 300 and pic.height > 300
        data = json.loads(js.read_text())
        assert data["method"] == name and data["image"]["path"] == str(im)
        classes = data["image"]["classes"]
        assert classes[-1]["name"] == "beagle" or "beagle" in [
            t["label"] for t in data["image"]["top"]
        ]
        assert str(im) in printed
        if name == "align":
            c = classes[0]
            assert np.asarray(c["heat"]).shape[-2:] == (6, 6)
            assert c["tokens"][0]["words"][-1] == "<eot>"
            assert (
                data["entropy"]["prompt_entropy_ratio"] > 0
                and "token_entropy_ratio" in data["entropy"]
            )
            assert "prompt plan entropy" in printed
        elif name == "plot":
            assert np.asarray(classes[0]["prompt_plan"]).shape == (4, 4)
        else:
            assert classes[0]["prompt_plan"] is None
            assert np.asarray(classes[0]["patch_cosine"]).shape == (1, 1, 6, 6)


def test_cli_bad_inputs_exit_2_with_one_line(runs, tmp_path, capsys):
    _, run, images = runs
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    cases = [
        (["explain", str(run["align"]), str(not_image)], "is not an image"),
        (["explain", str(run["align"]), str(tmp_path / "missing.jpg")], "does not exist"),
        (["explain", str(run["align"]), str(images[0]), "--classes", "dragon"], "unknown class"),
        (["explain", str(run["coop"]), str(images[0]), "--panels", "ot"], "no transport plans"),
    ]
    for argv, msg in cases:
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            msg in err
            and len(err.splitlines()) == 1
            and err.startswith("promptalign explain: error:")
        )


def test_cli_embeddings_png_and_csv(runs, tmp_path):
    _, run, _ = runs
    assert (
        main(
            [
                "explain",
                str(run["align"]),
                "--embeddings",
                "--dataset",
                "oxford_pets",
                "--projection",
                "pca",
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "embeddings.png") as pic:
        assert pic.format == "PNG"
    rows = list(csv.reader((tmp_path / "embeddings.csv").open()))
    assert rows[0] == ["image", "label", "class", "set", "x", "y"]
    n_test = 5 * 2  # oxford_pets fixture: 5 classes x 2 test images
    sets = {r[3] for r in rows[1:]}
    assert len(rows) - 1 == 4 * n_test and sets == {"0", "1", "2", "3"}  # ALIGN's 4 visual sets
    assert {r[2] for r in rows[1:]} == {
        "abyssinian",
        "american bulldog",
        "beagle",
        "bengal",
        "boxer",
    }
