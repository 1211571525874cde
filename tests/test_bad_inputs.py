"""Every bad input answered in one line: exit status 2, exactly one line on
stderr that names the offending input, and no traceback; and the inputs that used to lose data
silently (classes dropped, images ignored, 16-bit images saturated, a BOM in a path), tested on
the result.

Each row builds its inputs in a fresh folder and runs the command line in-process; config values
(lr, batch size, epochs, method options) are checked by the config classes themselves.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from promptalign.cli import main


def _noise(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(
        torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
    ).save(path)


def _folder(root: Path) -> Path:
    """A tiny ImageFolder with train/ and test/: 2 classes, 2 + 1 images each."""
    for label, c in enumerate(("circle", "square")):
        for i in range(2):
            _noise(root / "train" / c / f"{i}.png", 10 * label + i)
        _noise(root / "test" / c / "0.png", 100 + label)
    return root


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--out",
        str(out),
        "--method",
        "coop",
        "--dataset",
        str(data),
        "--arch",
        "tiny-shapes",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "--shots",
        "2",
        "optim.epochs=1",
        "optim.batch_size=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A trained run (zero-shot: no training steps) for the predict rows."""
    t = tmp_path_factory.mktemp("run")
    data = _folder(t / "data")
    assert (
        main(
            [
                "train",
                "--out",
                str(t / "run"),
                "--method",
                "zeroshot",
                "--dataset",
                str(data),
                "--arch",
                "tiny-shapes",
                "--device",
                "cpu",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    return t / "run"


# ----------------------------------------------------------------------------- the rows
class NotATensor:
    """A pickled object a weights-only load refuses."""


def row_weights_file_not_weights_only(t: Path):
    torch.save({"w": NotATensor()}, t / "evil.pt")
    return (
        [
            "train",
            "--out",
            str(t / "run"),
            "--method",
            "coop",
            "--dataset",
            str(_folder(t / "d")),
            "--arch",
            "pa-tiny-vit",
            "--weights",
            str(t / "evil.pt"),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ],
        "evil.pt",
    )


def row_weights_file_missing(t: Path):
    return (
        _train(_folder(t / "d"), t / "run", "--weights", str(t / "nowhere.safetensors")),
        "nowhere.safetensors",
    )


def row_workers_negative(t: Path):
    return _train(_folder(t / "d"), t / "run") + ["--workers", "-1"], "--workers"


def row_shots_zero(t: Path):
    return _train(_folder(t / "d"), t / "run") + ["--shots", "0"], "--shots"


def row_unknown_preset(t: Path):
    return _train(_folder(t / "d"), t / "run", "--preset", "fastest"), "fastest"


def row_unknown_method(t: Path):
    return [
        "train",
        "--out",
        str(t / "run"),
        "--method",
        "coopp",
        "--dataset",
        str(_folder(t / "d")),
    ], "coopp"


def row_cuda_without_gpu(t: Path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return _train(_folder(t / "d"), t / "run") + ["--device", "cuda"], "--device cuda"


def row_out_is_a_file(t: Path):
    (t / "taken").write_text("x")
    return _train(_folder(t / "d"), t / "taken"), "--out"


def row_out_is_the_dataset_folder(t: Path):
    data = _folder(t / "d")
    return _train(data, data), "dataset folder"


def row_out_inside_the_dataset_folder(t: Path):
    data = _folder(t / "d")
    return _train(data, data / "train" / "run"), "dataset folder"


def row_out_read_only(t: Path):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; the simulated EACCES row covers the message")
    (t / "ro").mkdir()
    (t / "ro").chmod(0o555)
    return _train(_folder(t / "d"), t / "ro" / "run"), "permission denied"


def row_out_write_denied_midway(t: Path, monkeypatch):
    _refuse_writes(monkeypatch, errno.EACCES, "Permission denied")
    return _train(_folder(t / "d"), t / "run"), "Permission denied"


def row_disk_full(t: Path, monkeypatch):
    _refuse_writes(monkeypatch, errno.ENOSPC, "No space left on device")
    return _train(_folder(t / "d"), t / "run"), "No space left on device"


def row_predict_topk_negative(t: Path, run_dir):
    return ["predict", str(run_dir), str(run_dir), "--topk", "-1"], "--topk"


def row_predict_topk_zero(t: Path, run_dir):
    return ["predict", str(run_dir), str(run_dir), "--topk", "0"], "--topk"


def row_predict_empty_folder(t: Path, run_dir):
    (t / "empty").mkdir()
    return ["predict", str(run_dir), str(t / "empty")], "empty"


def row_predict_only_unreadable_images(t: Path, run_dir):
    (t / "bad.png").write_bytes(b"not a png")
    return ["predict", str(run_dir), str(t / "bad.png")], "bad.png"


def row_csv_duplicate_paths_conflicting_labels(t: Path):
    for n in ("a", "b"):
        _noise(t / "d" / f"{n}.png", 1)
    (t / "d" / "list.csv").write_text("a.png,0,cat\nb.png,1,dog\na.png,1,dog\n")
    return _train(t / "d" / "list.csv", t / "run"), "rows 1 and 3"


def row_csv_label_out_of_range(t: Path):
    for n in ("a", "b"):
        _noise(t / "d" / f"{n}.png", 1)
    (t / "d" / "list.csv").write_text("path,label\na.png,0\nb.png,7\n")
    return _train(t / "d" / "list.csv", t / "run"), "list.csv:3: label 7"


def row_csv_without_split_file(t: Path):
    for n in ("a", "b"):
        _noise(t / "d" / f"{n}.png", 1)
    (t / "d" / "list.csv").write_text("a.png,0,cat\nb.png,1,dog\n")
    return _train(t / "d" / "list.csv", t / "run"), "--split-file"


def row_out_is_the_csv_folder(t: Path):
    _noise(t / "d" / "a.png", 1)
    (t / "d" / "list.csv").write_text("a.png,0,cat\n")
    return _train(t / "d" / "list.csv", t / "d"), "is the dataset folder"


def row_corrupt_image_names_the_cli_setting(t: Path):
    data = _folder(t / "d")
    (data / "train" / "circle" / "0.png").write_bytes(b"broken")
    return _train(data, t / "run"), "data.skip_corrupt=true"


def row_benchmark_typo(t: Path):
    return (
        [
            "benchmark",
            "base2new",
            "--methods",
            "coop",
            "zeroshot",
            "--datasets",
            "synthetic_shapes",
            "--seeds",
            "1",
            "2",
            "--data-root",
            str(t / "data"),
            "--out",
            str(t / "b"),
            "optim.lrr=0.1",
        ],
        "optim.lrr",
    )


def row_benchmark_fewshot_zero_shots(t: Path):
    return (
        [
            "benchmark",
            "fewshot",
            "--methods",
            "coop",
            "--datasets",
            "synthetic_shapes",
            "--shots",
            "0",
            "--seeds",
            "1",
            "--data-root",
            str(t / "data"),
            "--out",
            str(t / "b"),
        ],
        "--shots 0",
    )


# config-value rows: validated in the config classes
def row_lr_negative(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim.lr=-1"), "optim.lr"


def row_batch_size_zero(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim.batch_size=0"), "optim.batch_size"


def row_crop_scale_reversed(t: Path):
    return _train(_folder(t / "d"), t / "run", "data.crop_scale=[0.9,0.5]"), "data.crop_scale"


def row_optim_not_a_section(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim=3"), "optim"


def row_unknown_method_option(t: Path):
    return _train(_folder(t / "d"), t / "run", "method.options.n_ctxx=4"), "n_ctxx"


def row_npt_unknown_base_method(t: Path):
    args = _train(_folder(t / "d"), t / "run", "method.options.base=mapel")
    args[args.index("coop")] = "npt"
    return args, "method.options.base: unknown method 'mapel'"


def row_epochs_negative(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim.epochs=-5"), "optim.epochs"


# ---------------------------------------------------------------------- YAML, sizes, encodings
def _alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of flow YAML whose aliases expand to 10**levels values."""
    flow = "[&a0 [x, x, x, x, x, x, x, x, x, x], " + ", ".join(["*a0"] * 9) + "]"
    for level in range(1, levels):  # each level: 10 references to the one below
        flow = f"[&a{level} {flow}, " + ", ".join([f"*a{level}"] * 9) + "]"
    return flow


def row_yaml_alias_bomb_in_a_config_value(t: Path):
    """A 9-level bomb inside data.dataset: it used to hang (quadratic error formatting) or run out
    of memory; now it is refused before anything is expanded."""
    (t / "bomb.yaml").write_text(f"data:\n  dataset: {_alias_bomb()}\n")
    return ["train", "--out", str(t / "run"), "--config", str(t / "bomb.yaml")], "bomb.yaml"


def row_yaml_alias_bomb_in_an_override(t: Path):
    return _train(_folder(t / "d"), t / "run", f"data.crop_scale={_alias_bomb()}"), "aliases"


def row_yaml_nested_too_deep(t: Path):
    (t / "deep.yaml").write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    return ["train", "--out", str(t / "run"), "--config", str(t / "deep.yaml")], "deep.yaml"


def row_a_huge_override_value_is_quoted_briefly(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim.lr=" + "9(" * 50_000), "optim.lr"


def row_non_finite_number(t: Path):
    return _train(_folder(t / "d"), t / "run", "optim.lr=.nan"), "finite"


def row_csv_in_latin1(t: Path):
    for n in ("a", "b"):
        _noise(t / "d" / f"caf{n}.png", 1)
    (t / "d" / "list.csv").write_bytes("caf\u00e9.png,0,caf\u00e9\nb.png,1,dog\n".encode("latin-1"))
    args = _train(t / "d" / "list.csv", t / "run")
    return args, "list.csv: not UTF-8 text (byte 0xe9 at offset 3, line 1); re-save"


def row_split_file_in_latin1(t: Path):
    data = _folder(t / "d")
    (t / "split.json").write_bytes('{"train": [["\u00e9", 0, "x"]]}'.encode("latin-1"))
    args = _train(data, t / "run", "--split-file", str(t / "split.json"))
    return args, "split.json: not UTF-8 text (byte 0xe9 at offset 13, line 1); re-save"


def row_csv_with_a_nul_byte(t: Path):
    _noise(t / "d" / "a.png", 1)
    (t / "d" / "list.csv").write_bytes(b"a.png,0,cat\nb\x00.png,1,dog\n")
    return _train(t / "d" / "list.csv", t / "run"), "list.csv:2"


def row_csv_label_of_many_digits(t: Path):
    _noise(t / "d" / "a.png", 1)
    (t / "d" / "list.csv").write_text("a.png,0,cat\nb.png," + "7" * 5000 + ",dog\n")
    return _train(t / "d" / "list.csv", t / "run"), "list.csv:2"


def row_train_offline_without_arch(t: Path, monkeypatch):
    """No network: one short probe, then the advice, instead of the hub's minute of retries."""
    import promptalign.backbone.loading as loading

    monkeypatch.setattr(loading, "_cached_pretrained", lambda cfg, cache_dir: None)
    monkeypatch.setattr(loading, "_unreachable", lambda host, port=443: "Name or service not known")
    monkeypatch.setattr(loading, "_download_host", lambda cfg: "huggingface.co")
    args = _train(_folder(t / "d"), t / "run")
    i = args.index("--arch")
    del args[i : i + 2]
    return args, "--arch tiny-shapes-v3"


def row_image_over_the_pixel_limit(t: Path):
    return _train(_folder(t / "d"), t / "run", "data.max_image_pixels=100"), "data.max_image_pixels"


def row_unreadable_test_image_found_before_training(t: Path):
    data = _folder(t / "d")
    (data / "test" / "square" / "0.png").write_bytes(b"broken")
    return _train(data, t / "run"), "test/square/0.png"


def row_class_without_training_images(t: Path):
    data = _folder(t / "d")
    _noise(data / "test" / "triangle" / "0.png", 7)  # in test/ only
    return _train(data, t / "run"), "'triangle'"


def row_resume_a_run_that_never_started(t: Path):
    (t / "run").mkdir()
    (t / "run" / "metrics.jsonl").write_text("")
    return ["train", "--resume", "--out", str(t / "run")], "without --resume"


def row_eval_a_run_with_an_empty_config(t: Path, run_dir):
    import shutil

    shutil.copytree(run_dir, t / "run")
    (t / "run" / "config.yaml").write_text("")
    return ["eval", str(t / "run"), "--device", "cpu"], "config.yaml is empty"


def row_eval_override_that_changes_results(t: Path, run_dir):
    return ["eval", str(run_dir), "--device", "cpu", "optim.lr=1"], "optim.lr"


def row_explain_topk_zero(t: Path, run_dir):
    _noise(t / "a.png", 1)
    return ["explain", str(run_dir), str(t / "a.png"), "--topk", "0"], "--topk"


def row_explain_topk_negative(t: Path, run_dir):
    _noise(t / "a.png", 1)
    return ["explain", str(run_dir), str(t / "a.png"), "--topk", "-1"], "--topk"


def row_explain_embeddings_max_images_zero(t: Path, run_dir):
    return ["explain", str(run_dir), "--embeddings", "--max-images", "0"], "--max-images"


def row_predict_duplicate_classes(t: Path, run_dir):
    _noise(t / "a.png", 1)
    return [
        "predict",
        str(run_dir),
        str(t / "a.png"),
        "--classes",
        "red circle,red circle",
    ], "red circle"


def row_predict_no_class_in_classes(t: Path, run_dir):
    _noise(t / "a.png", 1)
    return ["predict", str(run_dir), str(t / "a.png"), "--classes", ",,"], "--classes"


def row_predict_list_file_in_latin1(t: Path, run_dir):
    (t / "list.txt").write_bytes("caf\u00e9.png\n".encode("latin-1"))
    return ["predict", str(run_dir), str(t / "list.txt")], "list.txt: not UTF-8"


def _refuse_writes(monkeypatch, code: int, reason: str) -> None:
    import promptalign.io

    def refuse(path, write):
        raise OSError(code, reason, str(path))

    monkeypatch.setattr(promptalign.io, "atomic_write", refuse)


ROWS = [
    row_weights_file_not_weights_only,
    row_weights_file_missing,
    row_workers_negative,
    row_shots_zero,
    row_unknown_preset,
    row_unknown_method,
    row_cuda_without_gpu,
    row_out_is_a_file,
    row_out_is_the_dataset_folder,
    row_out_inside_the_dataset_folder,
    row_out_read_only,
    row_out_write_denied_midway,
    row_disk_full,
    row_predict_topk_negative,
    row_predict_topk_zero,
    row_predict_empty_folder,
    row_predict_only_unreadable_images,
    row_csv_duplicate_paths_conflicting_labels,
    row_csv_label_out_of_range,
    row_csv_without_split_file,
    row_out_is_the_csv_folder,
    row_corrupt_image_names_the_cli_setting,
    row_benchmark_typo,
    row_benchmark_fewshot_zero_shots,
    row_lr_negative,
    row_batch_size_zero,
    row_crop_scale_reversed,
    row_optim_not_a_section,
    row_unknown_method_option,
    row_npt_unknown_base_method,
    row_epochs_negative,
    row_yaml_alias_bomb_in_a_config_value,
    row_yaml_alias_bomb_in_an_override,
    row_yaml_nested_too_deep,
    row_a_huge_override_value_is_quoted_briefly,
    row_non_finite_number,
    row_csv_in_latin1,
    row_split_file_in_latin1,
    row_csv_with_a_nul_byte,
    row_csv_label_of_many_digits,
    row_train_offline_without_arch,
    row_image_over_the_pixel_limit,
    row_unreadable_test_image_found_before_training,
    row_class_without_training_images,
    row_resume_a_run_that_never_started,
    row_eval_a_run_with_an_empty_config,
    row_eval_override_that_changes_results,
    row_explain_topk_zero,
    row_explain_topk_negative,
    row_explain_embeddings_max_images_zero,
    row_predict_duplicate_classes,
    row_predict_no_class_in_classes,
    row_predict_list_file_in_latin1,
]


def _id(row) -> str:
    fn = row.values[0] if hasattr(row, "values") else row
    return fn.__name__[len("row_") :]


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_bad_input_is_one_line_exit_2(row, tmp_path, capsys, monkeypatch, request):
    import inspect

    wants = inspect.signature(row).parameters
    kwargs = {}
    if "monkeypatch" in wants:
        kwargs["monkeypatch"] = monkeypatch
    if "run_dir" in wants:
        kwargs["run_dir"] = request.getfixturevalue("run_dir")
    argv, name = row(tmp_path, **kwargs)
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)  # usage errors too return their exit code
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert name.lower() in lines[0].lower(), err
    assert lines[0].startswith("promptalign "), err
    assert "Traceback" not in err and "weights_only" not in err and "still be loaded" not in err
    assert len(lines[0]) <= 2200, len(lines[0])  # a bounded prefix of any value
    assert seconds < 60, seconds  # no hang (the quadratic formatter took minutes on 80 kB)


# ----------------------------------------------------------------------------- not errors
def test_predict_header_matches_the_real_k_and_a_bad_image_does_not_abort(
    run_dir, tmp_path, capsys
):
    _noise(tmp_path / "imgs" / "ok.png", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    _noise(tmp_path / "imgs" / "z.png", 4)
    assert main(["predict", str(run_dir), str(tmp_path / "imgs"), "--topk", "5"]) == 0
    cap = capsys.readouterr()
    out = cap.out.splitlines()
    assert out[0].split() == ["image", "top-2"]  # 2 classes: k is 2, whatever --topk asked
    body = "\n".join(out[2:])
    assert (
        "ok.png" in body and "z.png" in body and "broken.png" in body and "unreadable image" in body
    )
    expected = (
        f"promptalign predict: warning: 1 of 3 image(s) unreadable, reported in their rows "
        f"(first: {tmp_path / 'imgs' / 'broken.png'})"
    )
    assert cap.err.strip().splitlines() == [expected]


def test_list_into_a_closed_pipe_is_quiet():
    """`promptalign list backbones | head -1` must not print a BrokenPipeError."""
    proc = subprocess.run(
        f"{sys.executable} -m promptalign.cli list backbones | head -1",
        shell=True,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": "src"},
    )
    assert proc.stdout.strip() and "Error" not in proc.stderr and "Traceback" not in proc.stderr


def test_broken_pipe_in_process_returns_quietly(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list", "backbones"]) == 0
    assert capsys.readouterr().err == ""


def test_redirected_stderr_gets_no_progress_bar(tmp_path, capsys):
    """stderr that is not a terminal gets no carriage-return progress output (the bar is switched
    off when stderr is not a TTY; the command line never forces it on)."""
    argv = [a for a in _train(_folder(tmp_path / "d"), tmp_path / "run") if a != "--no-progress"]
    assert main(argv) == 0
    assert "\r" not in capsys.readouterr().err


def test_split_file_flag_sets_data_split_file(tmp_path):
    from promptalign.cli import build_parser
    from promptalign.cli.runs import train_config as _train_config

    args = build_parser().parse_args(
        [
            "train",
            "--out",
            "x",
            "--method",
            "coop",
            "--dataset",
            "l.csv",
            "--split-file",
            "split.json",
        ]
    )
    assert _train_config(args).data.split_file == "split.json"


def test_csv_with_split_file_trains_through_the_cli(tmp_path, capsys):
    rows, split = [], {"train": [], "val": [], "test": []}
    for label, c in enumerate(("cat", "dog")):
        for i in range(3):
            _noise(tmp_path / f"{c}{i}.png", 10 * label + i)
            rows.append(f"{c}{i}.png,{label},{c}")
            split["train" if i < 2 else "test"].append([f"{c}{i}.png", label, c])
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert (
        main(
            _train(
                tmp_path / "list.csv",
                tmp_path / "out" / "run",
                "--split-file",
                str(tmp_path / "split.json"),
            )
        )
        == 0
    )
    assert "on 2 images" in capsys.readouterr().out


# ------------------------------------------------------------------- data that used to be lost
def _classes_folder(root: Path, classes: tuple[str, ...], per_class: int = 1) -> Path:
    """An evaluation-only ImageFolder: class folders of images."""
    for label, c in enumerate(classes):
        for i in range(per_class):
            _noise(root / c / f"{i}.png", 200 + 10 * label + i)
    return root


def _zeroshot(data: Path, out: Path, *extra: str) -> list[str]:
    args = _train(data, out, *extra)
    args[args.index("coop")] = "zeroshot"
    return args


def test_eval_on_another_dataset_uses_all_its_classes(tmp_path, capsys):
    own = tmp_path / "own"
    for label, c in enumerate(("a", "b", "c", "d")):
        _noise(own / "train" / c / "0.png", label)
        _noise(own / "test" / c / "0.png", 50 + label)
    run = tmp_path / "run"
    assert main(_zeroshot(own, run, "--subsample", "base")) == 0
    other = _classes_folder(tmp_path / "other", ("w", "x", "y", "z", "v", "u"))
    capsys.readouterr()
    assert main(["eval", str(run), "--device", "cpu", "--json"]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert (mine["subsample"], mine["num_classes"], mine["n"]) == ("base", 2, 2)
    assert main(["eval", str(run), "--device", "cpu", "--json", "--dataset", str(other)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["subsample"], res["num_classes"], res["n"]) == ("all", 6, 6)
    argv = ["eval", str(run), "--device", "cpu", "--dataset", str(other), "--subsample", "base"]
    assert main(argv) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert header.split() == [
        "dataset",
        "base",
        "classes",
        "images",
        "accuracy",
        "macro-F1",
        "skipped",
    ]
    assert row.split()[1:3] == ["3", "3"]  # base: the first half of the six classes
    from promptalign.explain import embed_dataset

    emb = embed_dataset(run, dataset=str(other), projection="pca", device="cpu")
    assert len(emb.classnames) == 6 and emb.coords.shape[1] == 6  # explain's map too


def test_imagefolder_classes_are_the_union_over_splits_and_nested_images_are_read(tmp_path, caplog):
    from promptalign.data import load_custom_dataset

    data = _folder(tmp_path / "d")
    _noise(data / "test" / "triangle" / "0.png", 7)  # a class in test/ only
    _noise(data / "train" / "circle" / "more" / "deep.png", 8)  # nested in a class folder
    _noise(data / "test" / "stray.png", 9)  # in no class folder
    with caplog.at_level("WARNING"):
        ds = load_custom_dataset(data, shots=None)
    assert ds.classnames == ["circle", "square", "triangle"]
    assert [r.path for r in ds.test if r.classname == "triangle"] == ["test/triangle/0.png"]
    assert "train/circle/more/deep.png" in [r.path for r in ds.train if r.label == 0]
    assert "stray.png" in caplog.text and "no class folder" in caplog.text
    # a zero-shot run (nothing learned) evaluates the test-only class too
    assert main(_zeroshot(data, tmp_path / "run")) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["classnames"] == ["circle", "square", "triangle"] and info["metrics"]["n"] == 3


def test_bom_is_not_part_of_the_first_path_or_key(tmp_path):
    from promptalign.config import load_yaml
    from promptalign.data import load_custom_dataset

    for i in range(2):
        _noise(tmp_path / f"img{i}.png", i)
    bom = b"\xef\xbb\xbf"
    (tmp_path / "list.csv").write_bytes(bom + b"img0.png,0,cat\r\nimg1.png,1,dog\r\n")
    ds = load_custom_dataset(tmp_path / "list.csv")
    assert [r.path for r in ds.test] == ["img0.png", "img1.png"]
    split = {"train": [["img0.png", 0, "cat"]], "val": [], "test": [["img1.png", 1, "dog"]]}
    (tmp_path / "split.json").write_bytes(bom + json.dumps(split).encode())
    ds = load_custom_dataset(tmp_path / "list.csv", split_file=tmp_path / "split.json")
    assert [r.path for r in ds.train] == ["img0.png"]
    (tmp_path / "c.yaml").write_bytes(bom + b"optim:\n  lr: 0.5\n")
    assert load_yaml(tmp_path / "c.yaml").optim.lr == 0.5


def test_unreadable_images_are_found_before_training_or_skipped_and_counted(tmp_path, caplog):
    data = _folder(tmp_path / "d")
    (data / "test" / "square" / "0.png").write_bytes(b"broken")
    out = tmp_path / "run"
    assert main(_train(data, out)) == 2
    assert not out.exists()  # refused before the run started: no folder, no training steps
    with caplog.at_level("WARNING"):
        assert main(_train(data, out, "data.skip_corrupt=true")) == 0
    assert "1 of 6 image(s) cannot be read" in caplog.text
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert (metrics["skipped"], metrics["n"]) == (1, 1)


def test_eval_and_resume_accept_skip_corrupt(tmp_path, capsys):
    data = _folder(tmp_path / "d")
    out = tmp_path / "run"
    assert main(_train(data, out)) == 0
    (data / "test" / "square" / "0.png").write_bytes(b"broken")  # damaged after training
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 2
    assert "data.skip_corrupt=true" in capsys.readouterr().err
    assert main(["eval", str(out), "--device", "cpu", "--json", "data.skip_corrupt=true"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1
    # a run whose final evaluation failed gets its metrics by resuming with the setting
    (out / "run.json").unlink()
    assert main(["train", "--resume", "--out", str(out), "data.skip_corrupt=true"]) == 0
    assert json.loads((out / "run.json").read_text())["metrics"]["skipped"] == 1
    assert "skip_corrupt: true" in (out / "config.yaml").read_text()


def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path):
    data = _folder(tmp_path / "d")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(data / "train" / "circle" / "0.png")
    out = tmp_path / "run"
    assert main(_train(data, out, "data.max_image_pixels=500", "data.skip_corrupt=true")) == 0
    metrics = json.loads((out / "run.json").read_text())["metrics"]
    assert metrics["skipped_train_images"] == 1 and metrics["skipped"] == 0
    assert "max_image_pixels: 500" in (out / "config.yaml").read_text()


def test_predict_reports_an_image_over_the_pixel_limit_in_its_row(run_dir, tmp_path, capsys):
    _noise(tmp_path / "small.png", 1)  # 400 pixels
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    argv = ["predict", str(run_dir), str(tmp_path / "small.png"), str(tmp_path / "big.png")]
    assert main([*argv, "--max-image-pixels", "500", "--json"]) == 0
    cap = capsys.readouterr()
    rows = json.loads(cap.out)
    assert "top" in rows[0]
    assert "1,600 pixels, over the limit of 500 (data.max_image_pixels" in rows[1]["error"]
    assert len(cap.err.strip().splitlines()) == 1 and "1 of 2 image(s) unreadable" in cap.err


def test_shots_beyond_the_data_are_logged(tmp_path, caplog):
    data = _folder(tmp_path / "d")
    args = _train(data, tmp_path / "run")
    args[args.index("--shots") + 1] = "100000"
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "100000 shots per class asked" in caplog.text
    assert "training uses 4 images" in caplog.text


def test_a_clamped_prompt_depth_is_said_once_and_recorded(tmp_path, caplog):
    import yaml

    data = _folder(tmp_path / "d")
    out = tmp_path / "run"
    args = _train(data, out)
    args[args.index("coop")] = "align"
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    notes = [r for r in caplog.records if "is deeper than the tower" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in notes]  # the 3-layer text tower, once
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["method"]["options"]["depth"] == 3  # the depth used, not the published 9
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert "is deeper than the tower" not in caplog.text


def test_the_library_checks_its_own_arguments(run_dir, tmp_path):
    from promptalign.data import DatasetError
    from promptalign.engine import predict
    from promptalign.explain import ExplainError, embed_dataset, explain

    _noise(tmp_path / "a.png", 1)
    img = [tmp_path / "a.png"]
    with pytest.raises(DatasetError, match=r"\['red circle'\] given more than once"):
        predict(run_dir, img, classnames=["red circle", "red circle"], device="cpu")
    with pytest.raises(DatasetError, match="no class names"):
        predict(run_dir, img, classnames=[], device="cpu")
    with pytest.raises(DatasetError, match="topk 0 must be an integer >= 1"):
        predict(run_dir, img, topk=0, device="cpu")
    with pytest.raises(ExplainError, match="topk 0 must be"):
        explain(run_dir, img, topk=0, device="cpu")
    with pytest.raises(ExplainError, match="topk -1 must be"):
        explain(run_dir, img, topk=-1, classes=["circle"], device="cpu")
    with pytest.raises(ExplainError, match="max_images 0 must be"):
        embed_dataset(run_dir, max_images=0, device="cpu")
    only = explain(run_dir, img, topk=0, classes=["square"], device="cpu")
    assert [c.name for c in only.images[0].classes] == ["square"]


def test_error_lines_are_linear_and_bounded():
    from promptalign.cli.common import MAX_MESSAGE
    from promptalign.cli.common import one_line as _one_line

    for text in ("a" * 200_000, "[x, " * 50_000, "ab (cd " * 30_000, "word " * 40_000):
        start = time.perf_counter()
        line = _one_line(text)
        assert time.perf_counter() - start < 0.5
        assert len(line) <= MAX_MESSAGE + 60 and "\n" not in line
    advice = "bad file (\n  weights_only=False is unsafe ). Use weights_only=False; ok\x1b[31m"
    assert _one_line(advice) == "bad file (). ok"


def test_yaml_aliases_are_limited_before_expansion():
    from promptalign.config import ConfigError, safe_load_yaml

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="would expand the document"):
        safe_load_yaml(_alias_bomb(12), "bomb")
    with pytest.raises(ConfigError, match="refers to itself"):
        safe_load_yaml("&a [*a]", "loop")
    assert time.perf_counter() - start < 2
    assert safe_load_yaml("a: &x [1, 2]\nb: *x", "ok") == {"a": [1, 2], "b": [1, 2]}


def test_an_unreachable_host_is_found_after_one_short_try():
    from promptalign.backbone.loading import PROBE_TIMEOUT_S, _unreachable

    start = time.perf_counter()
    assert _unreachable("promptalign-test.invalid") is not None  # .invalid never resolves
    assert time.perf_counter() - start < PROBE_TIMEOUT_S + 2
