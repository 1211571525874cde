"""Every bad input of issue 12's list answered in one line: exit status 2, exactly one line on
stderr that names the offending input, and no traceback.

Each row builds its inputs in a fresh folder and runs the command line in-process; config values
(lr, batch size, epochs, method options) are checked by the config classes themselves.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
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
    code = main(argv)  # usage errors too return their exit code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert name.lower() in lines[0].lower(), err
    assert lines[0].startswith("promptalign "), err
    assert "Traceback" not in err and "weights_only" not in err and "still be loaded" not in err


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
    from promptalign.cli import _train_config, build_parser

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
    import json

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
