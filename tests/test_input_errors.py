"""One line, not a traceback (issue 15.5): a download without network, a batch of one that BatchNorm cannot
train on, running out of memory; and defaults that fit every architecture and method (issue 15.6)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mlaan
from mlaan import models
from mlaan.cli import main
from mlaan.engine import LocalModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYNTH = ["--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "16", "--device", "cpu"]


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The error line; anything else on stderr is a progress bar (tqdm), never a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("mlaan: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("dataset,config", [("cifar10", "cifar10_resnet32_dgl_mlaan.yaml"),
                                            ("svhn", "svhn_resnet32_dgl.yaml")])
def test_paper_config_without_network_is_one_line(no_network, tmp_path, capsys, dataset, config):
    root = tmp_path / "data"
    code, _, err = run_cli(capsys, "train", "--config", CONFIGS / config, "--data-root", root, "--max-steps", 2,
                           "--output-dir", tmp_path / "run")
    line = one_error_line(err)
    assert code == 2
    assert dataset in line and str(root) in line and f"mlaan download --dataset {dataset}" in line
    assert not (tmp_path / "run").exists() and not root.exists()  # nor an empty data root that looks like one


def test_download_command_without_network_is_one_line(no_network, tmp_path, capsys):
    code, _, err = run_cli(capsys, "download", "--dataset", "cifar100", "--data-root", tmp_path / "d")
    assert code == 2 and "cifar100" in one_error_line(err) and "could not be downloaded" in err


def test_fashion_mnist_download_without_network_is_one_line(no_network, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mlaan.data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    code, _, err = run_cli(capsys, "download", "--dataset", "fashion-mnist", "--data-root", tmp_path / "d")
    assert code == 2 and "fashion-mnist" in one_error_line(err) and str(tmp_path / "d") in err


def test_batch_of_one_with_a_1x1_map_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet18", "-K", "2", "--method", "dgl",
                           "--batch-size", "1", "--max-steps", "1", "--output-dir", out)
    line = one_error_line(err)
    assert code == 2 and "--batch-size 1" in line and "BatchNorm" in line and "1x1" in line
    assert not out.exists()


def test_a_training_set_of_one_image_is_refused_for_the_same_reason(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SYNTH, "--train-samples", "1", "--arch", "resnet18", "-K", "2",
                           "--batch-size", "8", "--max-steps", "1", "--output-dir", tmp_path / "run")
    assert code == 2 and "a training set of 1 image" in one_error_line(err)


def test_batch_of_one_still_trains_where_every_map_is_larger(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "--method", "bp",
                           "--batch-size", "1", "--max-steps", "2", "--output-dir", tmp_path / "run")
    assert code == 0, err


def test_single_value_batchnorms_leaves_the_model_as_it_was():
    model = mlaan.create_local_model("resnet18", method="dgl+mlaan", num_local_modules=3, image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = model.single_value_batchnorms()
    modules = dict(model.named_modules())
    assert found and all(isinstance(modules[name], torch.nn.BatchNorm2d) for name in found)
    assert "backbone.blocks.8.bn2" in found  # layer4's last BatchNorm, on a 1x1 map at 32 pixels
    assert torch.equal(rng, torch.get_rng_state()) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def oom(self, images, targets):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(LocalModel, "train_step", oom)
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "8",
                           "--max-steps", "1", "--output-dir", tmp_path / "run")
    line = one_error_line(err)
    assert code == 1 and "out of memory" in line and "--batch-size" in line and "--grad-checkpointing" in line


# ------------------------------------------------------------------------------------------ 15.6 defaults
@pytest.mark.parametrize("arch", models.available())
def test_every_arch_has_a_default_k_that_fits_every_method(arch):
    units = models.create(arch).num_residual_blocks + 1
    k = models.default_local_modules(arch)
    assert 2 <= k <= units
    for method in ("dgl+mlaan", "infopro", "auglocal+mlm"):
        assert mlaan.engine.local_model.default_num_local_modules(arch, method) == k
    assert mlaan.engine.local_model.default_num_local_modules(arch, "bp") == 1


def test_paper_k_where_the_paper_has_one():
    assert models.default_local_modules("resnet32") == 16 and models.default_local_modules("resnet110") == 55


@pytest.mark.parametrize("method", ["bp", "dgl", "infopro+mlaan"])
def test_create_local_model_without_k(method):
    model = mlaan.create_local_model("resnet32", method=method)
    assert len(model.local_modules) == (1 if method == "bp" else 16)


def test_create_local_model_without_k_on_a_small_arch():
    model = mlaan.create_local_model("resnet20", method="dgl")
    assert len(model.local_modules) == models.default_local_modules("resnet20")


def test_train_resnet20_without_k(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "--batch-size", "16", "--max-steps", "1",
                           "--output-dir", out)
    assert code == 0, err
    import json

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["config"]["local_modules"] == models.default_local_modules("resnet20")


# ------------------------------------------------------------------------- found by a newcomer's test
@pytest.mark.parametrize("flag,values,why", [("--infopro-lambda-task", ("-1", "0"), "must be non-negative weights"),
                                             ("--infopro-lambda-recon", ("5", "-0.5"), "must be non-negative weights"),
                                             ("--infopro-lambda-recon", ("5", "nan"), "must be a finite number")])
def test_infopro_weights_must_be_finite_and_non_negative(tmp_path, capsys, flag, values, why):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *SYNTH, "--method", "infopro", "--arch", "resnet20", "-K", "2",
                           flag, *values, "--output-dir", out)
    line = one_error_line(err)
    assert code == 2 and why in line and flag[2:].replace("-", "_") in line
    assert not out.exists()


def test_a_missing_imagenet_root_does_not_suggest_a_download(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "imagenet", "--data-root", tmp_path / "nope", "--device",
                           "cpu", "--output-dir", tmp_path / "run")
    line = one_error_line(err)
    assert code == 2 and "does not exist" in line and "--download" not in line and "train/ and val/" in line


def test_download_says_when_it_found_an_installed_copy_instead(tmp_path, capsys):
    """`mlaan download --data-root DIR` answered "ready in /usr/share/…" and left DIR empty, without a word."""
    from mlaan import data

    if not data.SYSTEM_FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (no network here to download into DIR)")
    code, out, _ = run_cli(capsys, "download", "--data-root", tmp_path / "dl")
    assert code == 0 and f"found before {tmp_path / 'dl'}: nothing was downloaded" in out
    code, out, _ = run_cli(capsys, "download", "--data-root", data.SYSTEM_FASHION_MNIST.parent)
    assert code == 0 and out.strip() == f"fashion-mnist: ready in {data.SYSTEM_FASHION_MNIST}"


def test_a_config_that_names_an_option_twice_or_is_a_folder_is_refused(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("batch_size: 64\nbatch-size: 16\n")
    for config, why in ((twice, "sets batch_size twice ('batch_size' and 'batch-size'); keep one"),
                        (tmp_path, "is a folder; give a YAML file")):
        code, _, err = run_cli(capsys, "train", "--config", config, "--output-dir", tmp_path / "run")
        assert code == 2 and why in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_folder_and_torchs_weights_only_advice(tmp_path, capsys):
    """A folder was "does not exist"; a damaged file quoted torch's advice to load it with weights_only=False.
    (A folder holding last.pt stands for that file: test_cli.)"""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run")
    inside = tmp_path / "run" / "best.pt"
    assert code == 2 and f"{tmp_path / 'run'} holds no last.pt: give a checkpoint in it ({inside})" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", garbage)
    line = one_error_line(err)
    assert code == 2 and "is not a readable checkpoint" in line and "weights_only" not in line, line


def test_a_warm_up_longer_than_the_run_is_warned_of(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16",
                           "--epochs", "1", "--warmup-epochs", "3", "--max-steps", "1", "--output-dir", tmp_path / "r")
    assert code == 0 and "warning: warmup_epochs=3 is longer than epochs=1 (6 of 2 steps)" in err


@pytest.mark.parametrize("epochs,warned", [(1, True), (2, False)])
def test_a_warm_up_as_long_as_the_run_is_warned_of_once(tmp_path, capsys, epochs, warned):
    """`--epochs 1` with the default --warmup-epochs 1 ends at the peak learning rate: the decay never runs."""
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16",
                           "--epochs", epochs, "--max-steps", "1", "--output-dir", tmp_path / "r")
    line = ("mlaan: warning: warmup_epochs=1 is as long as epochs=1 (2 of 2 steps): the learning rate reaches --lr 0.1 "
            "at the last step and the cosine decay never runs (lower --warmup-epochs)\n")
    assert code == 0 and err.count("warmup_epochs") == int(warned) and (line in err) == warned, err


def test_precise_bn_on_more_images_than_the_training_set_says_how_many_it_used(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16",
                           "--precise-bn", "50", "--max-steps", "1", "--output-dir", tmp_path)
    training_images = int(SYNTH[SYNTH.index("--synthetic-train-size") + 1])
    assert code == 0 and (f"warning: --precise-bn 50 asks for 800 training images; the training set has "
                          f"{training_images}, and precise BN uses them all") in err
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", tmp_path / "last.pt", "--json")
    assert code == 0 and json.loads(out)["precise_bn_images"] == training_images


def test_an_option_the_method_does_not_read_is_warned_of_with_its_reader(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: dgl\nlam_depth: 2\naux_width: 8\n")
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16",
                           "--config", config, "--temperature", "0.5", "--window", "3", "--max-steps", "1",
                           "--output-dir", tmp_path / "run")
    assert code == 0 and ("warning: not used by --method dgl as configured, ignored: aux_width (--config): read "
                          "only with aux_head=mlp, this run has aux_head=linear; lam_depth (--config): read "
                          "by LAM's aux nets (+lam, +mlaan); --temperature: an option of method infopro (only with "
                          "infopro_task=contrastive); --window: read by MLM's cascade (+mlm, +mlaan)\n") in err


@pytest.mark.parametrize("args,env,warned", [
    (["--rescale-schedule"], {}, "--rescale-schedule: read only with --resume, this is a new run"),
    (["--sync-bn"], {}, "--sync-bn: read only by a run of several processes (torchrun), this is one process"),
    (["--sync-bn"], {"WORLD_SIZE": "2", "RANK": "0"}, None),
    (["--sync-bn"], {"WORLD_SIZE": "2"}, "--sync-bn: read only by a run of several processes"),  # no RANK: one
    (["--sync-bn"], {"WORLD_SIZE": "", "RANK": "0"}, "--sync-bn: read only by a run of several processes"),
])
def test_an_option_this_invocation_does_not_read_is_warned_of(capsys, monkeypatch, args, env, warned):
    """Breaker findings: --rescale-schedule on a new run and --sync-bn in one process were taken without a word."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "train", *args, "--print-config")
    assert code == 0
    if warned is None:
        assert "warning" not in err, err
    else:
        assert err.startswith(f"mlaan: warning: not used by this run, ignored: {warned}") and err.count("\n") == 1


@pytest.mark.parametrize("args,ignored", [
    (["--method", "dgl", "--aux-head", "mlp", "--aux-width", "8"], None),
    (["--method", "infopro", "--aux-width", "8"], "--aux-width"),  # aux_head defaults to linear
    (["--method", "infopro", "--infopro-task", "contrastive", "--temperature", "0.5"], None),
    (["--method", "infopro", "--temperature", "0.5"], "--temperature"),
    (["--method", "infopro+mlaan", "--infopro-task", "ce", "--temperature", "0.5"], "--temperature"),
    # run options too (breaker finding: --betas with the default --opt sgd passed without a word)
    (["--betas", "0.8", "0.9"], "--betas"),
    (["--opt", "adamw", "--betas", "0.8", "0.9"], None),
    (["--opt", "adamw", "--momentum", "0.5"], "--momentum"),
])
def test_an_option_read_only_with_some_value_of_another_is_warned_of_without_it(tmp_path, capsys, args, ignored):
    code, out, err = run_cli(capsys, "train", *args, "--print-config")  # resolves and warns, trains nothing
    assert code == 0
    if ignored is None:
        assert "warning: not used" not in err
    else:
        assert f"ignored: {ignored}: read only with " in err


def test_the_api_warns_of_an_option_its_other_options_make_unread():
    with pytest.warns(UserWarning, match=r"does not read aux_width=64 \(read only with aux_head=mlp, this run has "
                                         r"aux_head=linear\)"):
        mlaan.create_local_model("resnet20", "dgl", 2, num_classes=10, aux_width=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlaan.create_local_model("resnet20", "dgl", 2, num_classes=10, aux_width=64, aux_head="mlp")
        mlaan.create_local_model("resnet20", "infopro", 2, num_classes=10, temperature=0.2,
                                 infopro_task="contrastive")


@pytest.mark.parametrize("command,why", [
    (["train", "--resume", ""], "--resume '' is empty"),
    (["export", "--checkpoint", "x.pt", "--out", ""], "--out is empty"),
])
def test_an_empty_path_is_called_empty(tmp_path, capsys, command, why):
    code, _, err = run_cli(capsys, *command)
    assert code == 2 and why in one_error_line(err)


def test_a_config_that_names_the_same_key_twice_is_refused(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("batch_size: 16\nbatch_size: 8\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--output-dir", tmp_path / "run")
    assert code == 2 and "key 'batch_size' appears twice" in one_error_line(err)


# ---------------------------------------------------------- K's range, names' case, silent resizing
@pytest.mark.parametrize("k", [0, -2, 11])
def test_an_out_of_range_k_names_the_allowed_range_on_the_cli(tmp_path, capsys, k):
    """`-K 0` said "local_modules must be at least 1", without the upper bound that the Python API names."""
    code, _, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", k, "--output-dir", tmp_path / "run")
    line = one_error_line(err)
    assert code == 2 and f"local_modules={k} is out of range for resnet20: allowed 1 to 10 (9 blocks after" in line
    assert not (tmp_path / "run").exists()


def test_the_config_and_the_api_check_k_with_the_same_words():
    from mlaan.training.config import TrainConfig

    tail = "=0 is out of range for resnet20: allowed 1 to 10 (9 blocks after the stem + the stem's module)"
    with pytest.raises(ValueError, match=re.escape(f"local_modules{tail}")):
        TrainConfig(arch="resnet20", local_modules=0).resolve()
    with pytest.raises(ValueError, match=re.escape(f"num_local_modules{tail}")):
        mlaan.create_local_model("resnet20", method="dgl", num_local_modules=0)
    with pytest.raises(ValueError, match="method 'bp' trains end to end: local_modules must be 1, got 0"):
        TrainConfig(arch="resnet20", method="bp", local_modules=0).resolve()


def test_print_config_refuses_an_out_of_range_k_too(capsys):
    code, out, err = run_cli(capsys, "train", "--arch", "torchvision:resnet18", "-K", "10", "--print-config")
    assert code == 2 and not out
    assert "local_modules=10 is out of range for torchvision:resnet18: allowed 1 to 9" in one_error_line(err)


def test_registered_arch_names_ignore_case_like_method_names(capsys):
    assert models.check_arch("ResNet20") == "resnet20" and models.check_arch(" RESNET110 ") == "resnet110"
    assert models.create("ResNet20").name == "resnet20"
    assert models.defaults("ResNet18") == models.defaults("resnet18")
    assert models.default_local_modules("ResNet32") == 16
    assert len(mlaan.create_local_model("ResNet20", method="DGL", num_local_modules=2).local_modules) == 2
    code, out, err = run_cli(capsys, "train", *SYNTH, "--arch", "ResNet20", "--method", "DGL", "-K", "2",
                             "--print-config")
    assert code == 0, err
    assert "\narch: resnet20\n" in out and "\n# output_dir: runs/synthetic-resnet20-dgl-K2   # unset" in out


def test_library_names_are_spelled_as_the_library_takes_them():
    """torchvision's get_model ignores case (so does mlaan, recording its lower-case name); timm's names are
    case-sensitive (refused, the right spelling suggested)."""
    assert models.check_arch("TorchVision:ResNet18") == "torchvision:resnet18"
    assert models.create("torchvision:VGG11_BN", image_size=32).name == "torchvision:vgg11_bn"
    pytest.importorskip("timm")
    assert models.check_arch("TIMM:resnet18") == "timm:resnet18"
    with pytest.raises(ValueError, match=r"unknown or unsupported timm model 'ResNet18'.*closest supported: resnet18"):
        models.check_arch("timm:ResNet18")


def test_registering_a_name_that_differs_only_in_case_is_refused():
    with pytest.raises(ValueError, match="architecture name 'ResNet20' clashes with the registered 'resnet20'"):
        models.register("ResNet20", lambda **kw: models.create("resnet20", **kw))
    assert models.check_arch("ResNet20") == "resnet20"


def _no_resize_warning(recorded) -> None:
    resized = [str(w.message) for w in recorded if "resized" in str(w.message)]
    assert not resized, resized


def test_resizing_a_batch_is_warned_of_once_per_model(recwarn):
    net = models.create("resnet20", image_size=16).eval()
    with pytest.warns(UserWarning, match=r"resnet20 was built for 16x16 images but got a batch of 32x24: batches "
                                         r"are resized to 16x16 \(bilinear; said once\)"):
        net(torch.randn(2, 3, 32, 24))
    recwarn.clear()
    net(torch.randn(2, 3, 32, 32))  # once per model
    net(torch.randn(2, 3, 16, 16))  # no resize
    models.create("resnet20").eval()(torch.randn(2, 3, 24, 24))  # no image_size: any size as it comes
    _no_resize_warning(recwarn)
    local = mlaan.create_local_model("resnet20", method="dgl", num_local_modules=2, image_size=16)
    with pytest.warns(UserWarning, match="resnet20 was built for 16x16 images but got a batch of 32x32"):
        local.train_step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))


def test_the_cli_resizes_for_image_size_without_warning_and_says_so(tmp_path, capsys, recwarn):
    """`--image-size` asks for the resize (its help says so): the banner says it, no warning; nor does `mlaan eval`
    on the run's own data set."""
    code, out, err = run_cli(capsys, "train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16",
                             "--image-size", "16", "--max-steps", "1", "--output-dir", tmp_path)
    assert code == 0, err
    assert "(32 train / 16 test images, from generated, resized to 16x16)" in out
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "last.pt", "--modules")
    assert code == 0, err
    _no_resize_warning(recwarn)


def test_fashion_mnist_is_padded_to_32_not_resized(tmp_path, capsys, recwarn, monkeypatch):
    """Its 28x28 images are padded to 32x32 by the data transform: the model never resizes them."""
    from mlaan import data

    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("t10k", 16)):
        data.write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path)  # found before any data root: not the real one
    code, out, err = run_cli(capsys, "train", "--data-root", tmp_path, "--arch", "resnet20", "-K", "2", "--batch-size",
                             "16", "--max-steps", "1", "--device", "cpu", "--output-dir", tmp_path / "r")
    assert code == 0, err
    assert "on fashion-mnist (32 train / 16 test images" in out and "resized" not in out
    _no_resize_warning(recwarn)


def test_the_cli_prints_mlaan_s_own_python_warnings_as_its_warning_lines():
    from mlaan import cli

    python_format = warnings.formatwarning
    inside = str(Path(mlaan.__file__).resolve().parent / "models" / "backbone.py")
    with cli._warnings_as_cli_lines():
        assert warnings.formatwarning("batches are resized", UserWarning, inside, 70) == (
            "mlaan: warning: batches are resized\n")
        assert "UserWarning: deprecated" in warnings.formatwarning("deprecated", UserWarning, "/elsewhere/lib.py", 3)
    assert warnings.formatwarning is python_format


def test_resume_does_not_compare_a_run_option_the_run_does_not_read(tmp_path, capsys):
    """An sgd run resumed with other --betas (AdamW's) was refused as if they changed it; --momentum still is."""
    args = ["train", *SYNTH, "--arch", "resnet20", "-K", "2", "--batch-size", "16", "--output-dir", tmp_path]
    assert run_cli(capsys, *args, "--max-steps", "1")[0] == 0
    code, _, err = run_cli(capsys, *args, "--resume", "--betas", "0.5", "0.6", "--max-steps", "2")
    assert code == 0 and "--betas: read only with opt=adamw, this run has opt=sgd" in err
    code, _, err = run_cli(capsys, *args, "--resume", "--momentum", "0.5", "--max-steps", "3")
    assert code == 2 and "momentum: 0.9 in the run, 0.5 given" in err
