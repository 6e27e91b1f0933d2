"""The ``mlaan`` command end to end: train on synthetic and Fashion-MNIST subsets, config precedence,
eval/export round trip, help texts, and one-line errors (exit 2) that leave the output folder alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlaan
from mlaan import data
from mlaan.cli import main

SMALL = ["--train-samples", "256", "--batch-size", "64", "--max-steps", "3", "--arch", "resnet20", "-K", "4"]
SYNTH = ["--dataset", "synthetic", "--synthetic-test-size", "128", *SMALL]


# The command-line reference: the README's, or docs/CLI.md when the README links to it instead.
CLI_REFERENCE = [Path(__file__).resolve().parents[1] / name for name in ("README.md", "docs/CLI.md")]


def cli_reference(marker: str) -> str:
    """The text of the first file of :data:`CLI_REFERENCE` that holds ``marker`` (a table's heading, say)."""
    texts = [path.read_text() for path in CLI_REFERENCE if path.exists()]
    found = [text for text in texts if marker in text]
    assert found, f"no file of {[str(p) for p in CLI_REFERENCE]} holds {marker!r}"
    return found[0]


def mlaan_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny synthetic run shared by the eval/export tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SYNTH, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def fashion_root(tmp_path):
    """Debian's Fashion-MNIST when installed (the default lookup), else small IDX files in its format."""
    if data.SYSTEM_FASHION_MNIST.is_dir():
        return str(data.SYSTEM_FASHION_MNIST)
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, n in (("train", 300), ("t10k", 100)):
        data.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return str(tmp_path)


# ------------------------------------------------------------------------------------------------- train
def test_train_synthetic_end_to_end(trained):
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["dataset"]["name"] == "synthetic"
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["peak_memory_bytes"] > 0
    assert summary["wall_time_seconds"] > 0 and summary["config"]["arch"] == "resnet20"
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 1
    assert (trained / "last.pt").is_file() and (trained / "best.pt").is_file()


def test_train_fashion_mnist_subset(tmp_path, capsys, fashion_root):
    out = tmp_path / "fm"
    code, stdout, _ = mlaan_cli(
        capsys, "train", "--data-root", fashion_root, *SMALL, "--test-samples", "100", "--output-dir", out
    )
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["dataset"]["in_channels"] == 1 and summary["dataset"]["train_size"] == 256
    assert summary["config"]["method"] == "dgl+mlaan" and summary["config"]["dataset"] == "fashion-mnist"
    assert "test accuracy" in stdout and "peak memory" in stdout and str(out) in stdout


def test_config_file_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\narch: resnet20\nlocal_modules: 2\nmethod: dgl\nbatch_size: 16\n"
                   "lr: 0.01\nepochs: 3\ntrain_samples: 64\nsynthetic_test_size: 32\nmax_steps: 2\n")
    out = tmp_path / "run"
    code, _, _ = mlaan_cli(capsys, "train", "--config", cfg, "--batch-size", "32", "--output-dir", out)
    assert code == 0
    resolved = json.loads((out / "metrics.json").read_text())["config"]
    assert resolved["batch_size"] == 32  # the flag beats the file
    assert (resolved["lr"], resolved["epochs"], resolved["local_modules"], resolved["method"]) == (0.01, 3, 2, "dgl")
    assert resolved["window"] == mlaan.LocalOptions().window  # untouched: the default


def test_resume_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *SYNTH, "--method", "dgl", "--epochs", "2", "--output-dir", out]
    assert mlaan_cli(capsys, *args)[0] == 0
    code, stdout, _ = mlaan_cli(capsys, "train", "--output-dir", out, "--resume", "--max-steps", "5")
    assert code == 0, stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 5 and summary["config"]["method"] == "dgl"  # config came from the checkpoint


def test_grad_checkpointing_flag_and_changing_it_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *SYNTH, "--method", "dgl+mlaan", "--epochs", "2", "--grad-checkpointing", "--output-dir", out]
    assert mlaan_cli(capsys, *args)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["grad_checkpointing"] is True
    # recomputing or not does not change what a run computes, so a resume may switch it
    code, stdout, err = mlaan_cli(capsys, "train", "--output-dir", out, "--resume", "--no-grad-checkpointing",
                                  "--max-steps", "4")
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["grad_checkpointing"] is False


def test_image_size_resizes_the_batches_of_a_registered_arch(tmp_path, capsys):
    """`--image-size` was recorded but ignored for the built-in ResNets (a newcomer's test): the same losses with
    and without it."""
    import torch.nn.functional as F

    net = mlaan.models.create("resnet20", image_size=16).eval()
    x = torch.randn(2, 3, 32, 32)
    small = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    with pytest.warns(UserWarning, match="resnet20 was built for 16x16 images but got a batch of 32x32"):
        torch.testing.assert_close(net(x), net(small))
    assert not mlaan.models.create("resnet20").resize_inputs  # by default, any size is taken as it comes

    losses = {}
    for name, extra in (("own", []), ("16", ["--image-size", "16"])):
        code, _, err = mlaan_cli(capsys, "train", *SYNTH, "--max-steps", "1", "--output-dir", tmp_path / name, *extra)
        assert code == 0, err
        summary = json.loads((tmp_path / name / "metrics.json").read_text())
        losses[name] = summary["test_loss"]
    assert summary["config"]["image_size"] == 16 and losses["16"] != losses["own"]


# ------------------------------------------------------------------------------------------ eval / export
def test_eval_and_export_round_trip(trained, tmp_path, capsys):
    code, stdout, _ = mlaan_cli(capsys, "eval", "--checkpoint", trained / "last.pt", "--json")
    assert code == 0
    report = json.loads(stdout)
    summary = json.loads((trained / "metrics.json").read_text())
    assert report["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert report["test_error"] == pytest.approx(1 - report["test_accuracy"]) and report["test_images"] == 128

    out = tmp_path / "model.pt"
    code, stdout, _ = mlaan_cli(capsys, "export", "--checkpoint", trained / "last.pt", "--out", out)
    assert code == 0 and "model.pt" in stdout
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["data_options"] == {"synthetic_train_size": 2048, "synthetic_test_size": 128,
                                    "synthetic_image_size": 32}
    table = cli_reference("`export` writes").split("`export` writes")[1]
    table = table.split("It loads into")[0]
    assert [key for key in meta if f"`{key}`" not in table] == []  # docs/CLI.md's table of the fields says each
    state = torch.load(out, weights_only=True)
    assert all(k.startswith("blocks.") for k in state)  # the plain backbone: no aux nets, no EMA twins
    net = mlaan.models.create(meta["arch"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                              image_size=meta["image_size"])
    net.load_state_dict(state)
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    local = mlaan.create_local_model("resnet20", method="dgl+mlaan", num_local_modules=4, num_classes=10)
    local.load_state_dict(ckpt["model"])
    x = torch.randn(4, 3, 32, 32)
    net.eval(), local.eval()
    torch.testing.assert_close(net(x), local(x))

    code, stdout, _ = mlaan_cli(capsys, "eval", "--checkpoint", out, "--json")
    assert code == 0 and json.loads(stdout)["test_accuracy"] == pytest.approx(report["test_accuracy"])
    code, stdout, _ = mlaan_cli(capsys, "eval", "--checkpoint", out)
    assert code == 0 and "accuracy" in stdout and "error" in stdout


def test_eval_refuses_a_data_set_the_network_cannot_take_before_reading_or_downloading_it(trained, tmp_path, capsys,
                                                                                           monkeypatch):
    """A 10-class network with `--dataset cifar100 --download` downloaded CIFAR-100 first, then refused it."""
    read = []
    monkeypatch.setattr(data, "build_datasets", lambda *args, **kwargs: read.append(args))  # nothing to download
    checkpoint = trained / "last.pt"
    fits = "data sets it can take: cifar10, svhn, stl10, imagenet, synthetic"
    for dataset, has in (("cifar100", "100 classes of 3-channel"), ("fashion-mnist", "10 classes of 1-channel")):
        code, _, err = mlaan_cli(capsys, "eval", "--checkpoint", checkpoint, "--dataset", dataset, "--download",
                                 "--data-root", tmp_path / "dl")
        assert code == 2 and err == (f"mlaan: error: checkpoint {checkpoint} was trained for 10 classes of 3-channel "
                                     f"images, but {dataset} has {has} images; {fits}\n")
    assert read == [] and not (tmp_path / "dl").exists()


def test_eval_and_export_take_a_run_folder_for_its_last_pt(trained, tmp_path, capsys):
    code, stdout, err = mlaan_cli(capsys, "eval", "--checkpoint", trained, "--json")
    assert code == 0 and f"mlaan: using {trained / 'last.pt'}\n" in err
    assert json.loads(stdout)["checkpoint"] == str(trained / "last.pt")  # stdout is the JSON alone
    code, stdout, err = mlaan_cli(capsys, "export", "--checkpoint", trained, "--out", tmp_path / "model.pt")
    assert code == 0 and err == f"mlaan: using {trained / 'last.pt'}\n", err
    assert json.loads((tmp_path / "model.json").read_text())["step"] == 3  # last.pt's


def test_eval_takes_a_thread_count(trained, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, stdout, err = mlaan_cli(capsys, "eval", "--checkpoint", trained / "last.pt", "--threads", "1", "--json")
        assert code == 0 and torch.get_num_threads() == 1, err
    finally:
        torch.set_num_threads(threads)
    code, _, err = mlaan_cli(capsys, "eval", "--checkpoint", trained / "last.pt", "--threads", "0")
    assert code == 2 and err.strip().startswith("mlaan: error: threads must be 1 to ") and err.strip().endswith("got 0")


def test_export_replaces_an_earlier_export_and_nothing_else(trained, tmp_path, capsys):
    """A newcomer's `export --out R/last.pt` replaced the training checkpoint, `--out R/metrics.pt` the run's
    metrics.json; both exited 0."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    for out, why in ((run / "last.pt", "exists and is not an earlier mlaan export"),
                     (run / "metrics.pt", "metrics.json exists and is not an mlaan export description"),
                     (run, "is a folder; give a file name"),
                     (tmp_path / "model.json", "ends in .json")):
        code, _, err = mlaan_cli(capsys, "export", "--checkpoint", run / "last.pt", "--out", out)
        assert code == 2 and err.startswith("mlaan: error: --out ") and why in err and "Traceback" not in err, err
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    assert not (tmp_path / "model.json").exists()

    out = tmp_path / "model.pt"
    for checkpoint in ("best.pt", "last.pt"):  # an earlier export is replaced, as a user re-exporting expects
        code, _, err = mlaan_cli(capsys, "export", "--checkpoint", run / checkpoint, "--out", out)
        assert code == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["step"] == torch.load(run / "last.pt")["step"]


# ---------------------------------------------------------------------------------------------------- help
def _all_commands() -> list[list[str]]:
    """Every subcommand path of the parser (contributed ones and nested ones included)."""
    import argparse

    from mlaan.cli import build_parser

    def walk(parser, prefix):
        yield prefix
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*prefix, name])

    return list(walk(build_parser(), []))


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: " ".join(c) or "mlaan")
def test_help_lists_datasets_archs_methods(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    if command == ["download"]:  # its --dataset names what it can fetch, nothing it would refuse
        assert "stl10" in text and "imagenet" not in text and "resnet32" not in text
        return
    if command == ["export"]:  # the model is the checkpoint's: no list to choose from
        assert "imagenet" not in text and "dgl+mlaan" not in text
        return
    for name in [*data.available_datasets(), *mlaan.models.available(), *mlaan.available_methods(),
                 "torchvision:NAME", "timm:NAME"]:
        assert name in text, name


def test_python_dash_m_and_console_script():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    module = subprocess.run([sys.executable, "-m", "mlaan", "--help"], capture_output=True, text=True, env=env)
    assert module.returncode == 0 and "fashion-mnist" in module.stdout and "dgl+mlaan" in module.stdout
    script = Path(sys.executable).parent / "mlaan"
    if script.exists():
        console = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env)
        assert console.returncode == 0 and console.stdout == module.stdout


def test_the_readme_options_table_names_every_train_flag():
    """The CLI reference's table of `mlaan train` options (docs/CLI.md) is written by hand; a newcomer found seven
    flags missing."""
    import argparse
    import re

    from mlaan.cli import build_parser

    readme = cli_reference("| group | options |")
    start = readme.index("| group | options |")
    table = readme[start:readme.index("\n\n", start)]
    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    flags = {f for a in train._actions for f in a.option_strings
             if f.startswith("--") and not f.startswith("--no-") and f not in ("--help", "--config")}
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", table))
    assert not missing, f"the CLI reference's options table lacks {missing}"


HELP_WITHOUT_TORCH = """
import sys
import mlaan.cli
parser = mlaan.cli.build_parser()
for command in ([], ["train"], ["eval"], ["export"], ["download"]):
    try:
        parser.parse_args([*command, "--help"])
    except SystemExit as exit_info:
        assert exit_info.code == 0, command
heavy = sorted(name for name in ("torch", "torchvision", "mlaan.bench.memory") if name in sys.modules)
assert not heavy, f"building and printing the help imported {heavy}"
"""


def test_help_is_built_without_importing_torch():
    """``mlaan --help`` and the own subcommands' help come from torch-free declarations (option dataclasses, the
    method, data-set and architecture registries), so they answer in a fraction of a second."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    for name in ["dgl+mlaan", "fashion-mnist", "resnet110", "--infopro-task", "--synthetic-image-size", "bench"]:
        assert name in result.stdout, name


# ----------------------------------------------------------------------------------------------- bad input
BAD = [
    (["--dataset", "mnist-x"], ["'mnist-x'", "fashion-mnist", "cifar10", "synthetic"]),
    (["--arch", "resnet33"], ["'resnet33'", "resnet32", "resnet110"]),
    (["--method", "dgl+foo"], ["'dgl+foo'", "dgl+mlaan", "infopro"]),
    (["-K", "99"], ["99", "allowed 1 to 10"]),
    (["-K", "0"], ["local_modules=0", "allowed 1 to 10"]),
    (["--method", "bp", "-K", "4"], ["bp", "must be 1"]),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], ["cifar10", "/nonexistent/cifar", "--download"]),
    (["--config", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml", "does not exist"]),
    (["--epochs", "many"], ["--epochs", "'many'"]),
    (["--no-such-flag"], ["--no-such-flag"]),
]


@pytest.mark.parametrize(("flags", "words"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(trained, capsys, flags, words):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    try:
        code = main(["train", *SYNTH, "--output-dir", str(trained), *flags])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlaan"), err
    assert "error:" in lines[0] and "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


@pytest.mark.parametrize(("rank", "local_rank", "line"), [
    ("0", "0", "mlaan: error: unknown method 'dgl+foo'"),
    ("1", "1", None),  # the same flags and files as local rank 0 of its machine, which says it
    ("3", "0", "mlaan: error: rank 3: unknown method 'dgl+foo'"),  # another machine's first process: its files
])
def test_bad_input_under_torchrun_is_said_once_a_machine(trained, capsys, monkeypatch, rank, local_rank, line):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    code, _, err = mlaan_cli(capsys, "train", *SYNTH, "--output-dir", trained, "--method", "dgl+foo")
    assert code == 2
    assert err.startswith(line) if line else err == ""


@pytest.mark.parametrize(("local_rank", "said"), [("0", True), ("1", False)])
def test_a_flag_argparse_refuses_under_torchrun_is_said_once_a_machine(capsys, monkeypatch, local_rank, said):
    for name, value in {"WORLD_SIZE": "2", "RANK": local_rank, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--epochs", "many"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ("invalid int value: 'many'" in err) == said and (err == "") != said


def test_an_error_of_one_process_under_torchrun_is_said_by_it(capsys, monkeypatch):
    """A rank that alone fails to write its shard was silent while rank 0 died of the lost connection."""
    import mlaan.training
    from mlaan.training.safety import OutputWriteError

    class Trainer:
        def fit(self):
            raise OutputWriteError("could not write runs/x/shards/rank1.pt: disk full")

        def close(self):
            pass

    monkeypatch.setattr(mlaan.training, "make_trainer", lambda *args, **kwargs: Trainer())
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = mlaan_cli(capsys, "train", *SYNTH)
    assert code == 2 and err == "mlaan: error: rank 1: could not write runs/x/shards/rank1.pt: disk full\n"


def test_used_output_dir_and_bad_checkpoints(trained, tmp_path, capsys):
    code, _, err = mlaan_cli(capsys, "train", *SYNTH, "--output-dir", trained)
    assert code == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    code, _, err = mlaan_cli(capsys, "train", "--output-dir", trained, "--resume", "-K", "2")
    assert code == 2 and "local_modules=4" in err and "--local-modules 2" in err
    code, _, err = mlaan_cli(capsys, "eval", "--checkpoint", tmp_path / "none.pt")
    assert code == 2 and err.count("\n") == 1 and "none.pt does not exist" in err
    code, _, err = mlaan_cli(capsys, "eval", "--checkpoint", "")  # an unset variable: not "checkpoint . is a folder"
    assert code == 2 and err == "mlaan: error: the checkpoint path is empty: give a checkpoint file (last.pt, " \
                                "best.pt) or a run folder\n"
    code, _, err = mlaan_cli(capsys, "export", "--checkpoint", trained / "metrics.json", "--out", tmp_path / "m.pt")
    assert code == 2 and "not a readable checkpoint" in err
    code, _, err = mlaan_cli(capsys, "eval", "--checkpoint", trained / "last.pt", "--dataset", "cifar100",
                             "--data-root", tmp_path)
    assert code == 2 and "cifar100" in err


def test_bad_input_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mlaan", "train", "--arch", "nope", "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "'nope'" in proc.stderr
    assert not (tmp_path / "o").exists()
