"""A method is one file: a toy method with one option, dropped into the methods folder of a temporary copy of
the package (and, separately, installed through the ``mlaan.methods`` entry-point group), reaches the API,
``mlaan train --<its-option>``, a YAML key, ``metrics.json`` and ``--resume``'s comparison; the API and the CLI
refuse a bad value with the same message."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mlaan

# The "Adding a method" example of docs/API.md, verbatim (tests/test_docs.py runs the page's copy).
TOY_METHOD = '''\
"""Smoothed DGL: an auxiliary classifier trained with label-smoothed cross-entropy."""

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from mlaan.engine.methods import AuxContext, LocalMethod, register


@dataclass
class SmoothOptions:
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the aux loss, in [0, 1)"})

    def __post_init__(self):
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")


class SmoothedLoss(nn.Module):
    def __init__(self, channels: int, num_classes: int, smoothing: float):
        super().__init__()
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.smoothing = smoothing

    def forward(self, features, images, targets):
        return F.cross_entropy(self.classifier(features), targets, label_smoothing=self.smoothing)

    def logits(self, features):
        return self.classifier(features)


@register
class Smooth(LocalMethod):
    name = "smooth"
    description = "auxiliary classifier + label-smoothed cross-entropy"
    Options = SmoothOptions

    def make_head(self, ctx: AuxContext) -> nn.Module:
        return SmoothedLoss(ctx.feature_shape[0], ctx.num_classes, ctx.options.smoothing)
'''

API_CHECK = """
import mlaan
model = mlaan.create_local_model("resnet20", method="smooth+mlaan", num_local_modules=3, smoothing=0.25)
assert model.options.smoothing == 0.25 and model.independent_heads[0].smoothing == 0.25
assert model.cascade_heads["1"].head.smoothing == 0.25, "behind the LAM trunk too"
assert "smooth+mlm" in mlaan.available_methods()
try:
    mlaan.create_local_model("resnet20", method="smooth", num_local_modules=3, smoothing=1.5)
except ValueError as err:
    print("API:", err)
"""

TINY = ["--dataset", "synthetic", "--synthetic-train-size", "64", "--synthetic-test-size", "32", "--arch",
        "resnet20", "-K", "3", "--batch-size", "32", "--epochs", "1", "--device", "cpu"]


def _run(args: list[str], src: Path, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    paths = [str(src)] + ([str(extra_path)] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_example_is_the_one_the_docs_show():
    api_doc = Path(__file__).resolve().parents[1] / "docs" / "API.md"
    assert TOY_METHOD in api_doc.read_text(), "docs/API.md's 'Adding a method' example and this copy differ"


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """``src/`` of a copy of mlaan with ``methods/smooth.py`` added (no other file touched)."""
    src = tmp_path_factory.mktemp("copy") / "src"
    shutil.copytree(Path(mlaan.__file__).parent, src / "mlaan", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "mlaan" / "engine" / "methods" / "smooth.py").write_text(TOY_METHOD)
    return src


def test_toy_method_through_the_api(package_copy, tmp_path):
    result = _run(["-c", API_CHECK], package_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "API: smoothing must be in [0, 1), got 1.5" in result.stdout


def test_toy_method_through_train_flag_yaml_metrics_and_resume(package_copy, tmp_path):
    help_text = _run(["-m", "mlaan", "train", "--help"], package_copy, tmp_path).stdout
    assert "--smoothing" in help_text and "label smoothing of the aux loss" in help_text

    out = tmp_path / "flag"
    result = _run(["-m", "mlaan", "train", *TINY, "--method", "smooth", "--smoothing", "0.3",
                   "--output-dir", str(out)], package_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["smoothing"] == 0.3

    config = tmp_path / "run.yaml"
    config.write_text("method: smooth+mlm\nsmoothing: 0.2\n")
    out = tmp_path / "yaml"
    result = _run(["-m", "mlaan", "train", *TINY, "--config", str(config), "--output-dir", str(out)],
                  package_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "metrics.json").read_text())["config"]["smoothing"] == 0.2

    result = _run(["-m", "mlaan", "train", "--output-dir", str(out), "--resume", "--epochs", "2",
                   "--smoothing", "0.4"], package_copy, tmp_path)
    assert result.returncode == 2
    assert "smoothing: 0.2 in the run, 0.4 given" in result.stderr

    result = _run(["-m", "mlaan", "train", *TINY, "--method", "smooth", "--smoothing", "1.5",
                   "--output-dir", str(tmp_path / "bad")], package_copy, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "mlaan: error: smoothing must be in [0, 1), got 1.5"


def test_toy_method_through_an_entry_point(tmp_path):
    """A method outside the package: a module and a dist-info whose entry point names it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "smooth_method.py").write_text(TOY_METHOD)
    dist_info = site / "smooth_method-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: smooth-method\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[mlaan.methods]\nsmooth = smooth_method\n")
    src = Path(mlaan.__file__).parent.parent
    result = _run(["-c", API_CHECK], src, tmp_path, extra_path=site)
    assert result.returncode == 0, result.stderr
    assert "API: smoothing must be in [0, 1), got 1.5" in result.stdout


@pytest.mark.parametrize("flag,value,option", [("--temperature", "0", {"temperature": 0.0}),
                                               ("--infopro-task", "mse", {"infopro_task": "mse"}),
                                               ("--aux-width", "0", {"aux_width": 0})])
def test_api_and_cli_refuse_a_bad_value_with_the_same_message(tmp_path, capsys, flag, value, option):
    from mlaan.cli import main

    with pytest.raises(ValueError) as info:
        mlaan.create_local_model("resnet20", method="infopro", num_local_modules=3,
                                 **({"infopro_task": "contrastive"} | option))
    code = main(["train", "--dataset", "synthetic", "--method", "infopro", "--infopro-task", "contrastive",
                 flag, value, "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"mlaan: error: {info.value}"
    assert not (tmp_path / "run").exists()


def test_an_option_name_is_declared_once(monkeypatch):
    """A method may not declare an option another method or the engine declares (one source per name)."""
    from dataclasses import dataclass

    from mlaan.engine.methods import LocalMethod, register, registry
    from mlaan.engine.options import option_fields

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # leave the real registry as it was

    @dataclass
    class TakesTemperature:
        temperature: float = 0.1

    class Twin(LocalMethod):
        name, Options = "twin-of-infopro", TakesTemperature

    taken = r"option name\(s\) already in use: temperature \(declared by method 'infopro'\)"
    with pytest.raises(ValueError, match=taken):
        register(Twin)

    @dataclass
    class TakesWindow:
        window: int = 3

    class Shadow(LocalMethod):
        name, Options = "shadow", TakesWindow

    register(Shadow)
    with pytest.raises(ValueError, match=r"method 'shadow' declares option\(s\) the engine already has: window"):
        option_fields()


def test_head_options_are_checked_when_a_method_registers(monkeypatch):
    from mlaan.engine.methods import LocalMethod, register, registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    class ReadsWindow(LocalMethod):
        name, head_options = "reads-window", ("aux_head", "window")

    with pytest.raises(ValueError, match=r"ReadsWindow.head_options must be a tuple of engine options an aux head "
                                         r"reads \(depth_shrink, aux_head, aux_width, image_mean, image_std\); "
                                         r"got \('aux_head', 'window'\)"):
        register(ReadsWindow)


def test_make_head_reads_only_what_its_method_declares(monkeypatch):
    """``ctx.options`` holds the method's own options and its ``head_options``: an engine option read without
    being declared would be one ``--resume`` does not compare, so reading it is an error that names the fix."""
    from torch import nn

    from mlaan.engine.methods import LocalMethod, register, registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    seen = {}

    @register
    class Peeks(LocalMethod):
        name, head_options = "peeks", ("aux_width",)

        def make_head(self, ctx):
            seen["aux_width"] = ctx.options.aux_width
            for name in ("aux_head", "window", "temperature"):  # undeclared: engine head, engine part, infopro's
                with pytest.raises(AttributeError, match=rf"method 'peeks' reads option '{name}' in make_head "
                                                         r"without declaring it: .*Peeks.head_options "
                                                         r"\(readable here: aux_width\)"):
                    getattr(ctx.options, name)
            with pytest.raises(AttributeError, match="read-only"):
                ctx.options.aux_width = 3
            assert copy.deepcopy(ctx.options).aux_width == 7  # a head may keep it, and models are deep-copied
            return nn.Identity()

    with warnings.catch_warnings():
        # its head reads aux_width whatever aux_head says (it never reads aux_head): no "read only with" warning
        warnings.simplefilter("error")
        mlaan.create_local_model("resnet20", method="peeks", num_local_modules=2, aux_width=7)
    assert seen == {"aux_width": 7}
