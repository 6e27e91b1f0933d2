"""Config files: ``base:`` (a file building on others: order, precedence, errors), the paper settings in
``configs/`` (every data set × net × method, each data set's recipe written once), and ``mlaan train
--print-config`` (what a run would resolve to, printed as a config file, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlaan.cli import main
from mlaan.training.config import load_yaml, merge

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_METHODS = ("bp", "dgl", "dgl_mlaan", "infopro", "infopro_mlaan", "auglocal", "auglocal_mlaan")
PAPER_NETS = {"cifar10": ("resnet32", "resnet110"), "svhn": ("resnet32", "resnet110"),
              "stl10": ("resnet32", "resnet110"), "imagenet": ("resnet34", "resnet101")}
RECIPE_KEYS = ("dataset", "epochs", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_files_come_first_in_order_and_the_file_itself_wins(tmp_path):
    write(tmp_path / "_base" / "recipe.yaml", "epochs: 400\nlr: 0.8\nbatch_size: 1024\n")
    write(tmp_path / "_base" / "method.yaml", "method: dgl\nlr: 0.4\naux_head: mlp\n")
    top = write(tmp_path / "run.yaml", "base: [_base/recipe.yaml, _base/method.yaml]\naux_head: linear\n")
    assert load_yaml(top) == {"epochs": 400, "lr": 0.4, "batch_size": 1024, "method": "dgl", "aux_head": "linear"}


def test_a_base_may_have_bases_of_its_own_relative_to_itself(tmp_path):
    write(tmp_path / "a" / "b" / "deep.yaml", "epochs: 7\nseed: 1\n")
    write(tmp_path / "a" / "mid.yaml", "base: b/deep.yaml\nseed: 2\n")
    top = write(tmp_path / "top.yaml", "base: a/mid.yaml\n")
    assert load_yaml(top) == {"epochs": 7, "seed": 2}


def test_a_file_twice_on_one_chain_is_refused_naming_the_circle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nepochs: 2\n")
    with pytest.raises(ValueError, match=r"build on each other in a circle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_yaml(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ValueError, match="circle"):
        load_yaml(tmp_path / "self.yaml")


def test_the_same_base_on_two_branches_is_not_a_circle(tmp_path):
    write(tmp_path / "common.yaml", "epochs: 3\n")
    write(tmp_path / "x.yaml", "base: common.yaml\nlr: 0.2\n")
    write(tmp_path / "y.yaml", "base: common.yaml\nseed: 4\n")
    assert load_yaml(write(tmp_path / "top.yaml", "base: [x.yaml, y.yaml]\n")) == {"epochs": 3, "lr": 0.2, "seed": 4}


def test_each_file_is_read_once_however_many_branches_reach_it(tmp_path, monkeypatch):
    from mlaan.training import config

    depth = 12  # two branches a level: 2**12 reads if each were read again on every path
    for level in range(depth):
        for side in "ab":
            write(tmp_path / f"{side}{level}.yaml", f"base: l{level + 1}.yaml\n")
        write(tmp_path / f"l{level}.yaml", f"base: [a{level}.yaml, b{level}.yaml]\nseed: {level}\n")
    write(tmp_path / f"l{depth}.yaml", "epochs: 3\n")
    reads = []
    read = config._read_mapping
    monkeypatch.setattr(config, "_read_mapping", lambda path: reads.append(path.name) or read(path))
    assert load_yaml(tmp_path / "l0.yaml") == {"seed": 0, "epochs": 3}
    assert len(reads) == len(set(reads)) == 3 * depth + 1


def test_bases_nested_beyond_the_limit_are_refused_naming_the_top_file(tmp_path):
    from mlaan.training.config import MAX_BASE_DEPTH

    for level in range(MAX_BASE_DEPTH + 1):
        write(tmp_path / f"f{level}.yaml", f"base: f{level + 1}.yaml\n")
    write(tmp_path / f"f{MAX_BASE_DEPTH + 1}.yaml", "epochs: 1\n")
    with pytest.raises(ValueError, match=rf"f0\.yaml: its bases are nested more than {MAX_BASE_DEPTH} files deep"):
        load_yaml(tmp_path / "f0.yaml")
    assert load_yaml(tmp_path / "f2.yaml") == {"epochs": 1}  # within the limit


@pytest.mark.parametrize("key", ["Base", "BASE", "_base_"])
def test_base_spelled_otherwise_is_refused_with_the_right_spelling(tmp_path, key):
    write(tmp_path / "b.yaml", "epochs: 1\n")
    with pytest.raises(ValueError, match=rf"unknown key '{key}'; a file builds on others with 'base: \[FILE"):
        load_yaml(write(tmp_path / "run.yaml", f"{key}: b.yaml\n"))


@pytest.mark.parametrize("base,message", [
    ("missing.yaml", r"run\.yaml: its base 'missing\.yaml' does not exist"),
    ("sub", r"run\.yaml: its base 'sub' is not a file .*; give a YAML file"),
    ("[ok.yaml, ok.yaml]", r"base lists 'ok\.yaml' twice; keep one"),
    ("[]", "base must be a file name or a list of file names"),
    ("3", "base must be a file name or a list of file names"),
    ("[ok.yaml, 5]", "base must be a file name or a list of file names"),
    ("{a: 1}", "base must be a file name or a list of file names"),
])
def test_a_bad_base_is_one_error_naming_the_file(tmp_path, base, message):
    write(tmp_path / "ok.yaml", "epochs: 1\n")
    (tmp_path / "sub").mkdir()
    top = write(tmp_path / "run.yaml", f"base: {base}\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_yaml(top)


def test_an_error_inside_a_base_names_the_base_file(tmp_path, capsys):
    write(tmp_path / "_base" / "bad.yaml", "epoch: 3\n")
    top = write(tmp_path / "run.yaml", "base: _base/bad.yaml\n")
    code = main(["train", "--config", str(top), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.yaml" in err and "unknown config key 'epoch'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_paper_setting_has_a_config_and_resolves_to_its_recipe():
    recipes = {data: load_yaml(CONFIGS / "_base" / f"{data}.yaml") for data in PAPER_NETS}
    for data, nets in PAPER_NETS.items():
        for net in nets:
            for method in PAPER_METHODS:
                path = CONFIGS / f"{data}_{net}_{method}.yaml"
                cfg = merge(load_yaml(path)).resolve()
                assert (cfg.arch, cfg.method) == (net, method.replace("_", "+")), path
                for key in RECIPE_KEYS:
                    assert getattr(cfg, key) == recipes[data][key], (path, key)
                if "mlaan" in method:
                    assert (cfg.window, cfg.w_ind, cfg.w_casc, cfg.ema_momentum) == (3, 0.001, 0.999, 0.995)
                assert cfg.local_modules == 1 if method == "bp" else cfg.local_modules > 1, path


def test_the_first_imagenet_file_names_still_mean_dgl_mlaan():
    for net in PAPER_NETS["imagenet"]:
        assert (load_yaml(CONFIGS / f"imagenet_{net}.yaml")
                == load_yaml(CONFIGS / f"imagenet_{net}_dgl_mlaan.yaml"))


def test_print_config_prints_a_config_file_that_reads_back_the_same_and_writes_nothing(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", str(CONFIGS / "cifar10_resnet32_dgl_mlaan.yaml"), "--epochs", "3",
            "--print-config"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("# mlaan train: resolved options") and "infopro_task" in out.splitlines()[0]
    printed = yaml.safe_load(out)
    assert (printed["epochs"], printed["lr"], printed["window"], printed["method"]) == (3, 0.8, 3, "dgl+mlaan")
    assert "infopro_task" not in printed  # not read by dgl+mlaan: left out, and said so in the first line
    assert not any(tmp_path.iterdir())  # no run folder, no data download
    again = write(tmp_path / "printed.yaml", out)
    assert main(["train", "--config", str(again), "--print-config"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out.splitlines()[1:]


def test_print_config_reports_a_bad_value_as_one_line(tmp_path, capsys):
    assert main(["train", "--print-config", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "epochs must be at least 1" in err and "Traceback" not in err


def test_print_config_leaves_derived_values_unset_so_another_arch_or_method_derives_its_own(tmp_path, capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# local_modules: 16   # unset:" in out
    assert "\n# output_dir: runs/fashion-mnist-resnet32-dgl+mlaan-K16" in out
    printed = write(tmp_path / "p.yaml", out)
    assert main(["train", "--config", str(printed), "--method", "bp", "--arch", "resnet20", "--print-config"]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again["method"] == "bp" and "local_modules" not in again  # derived again, commented again


@pytest.mark.parametrize("method", ["dgl", "infopro", "dgl+mlaan", "infopro+mlaan", "auglocal"])
def test_a_printed_config_read_back_warns_of_nothing(tmp_path, capsys, method):
    assert main(["train", "--method", method, "--print-config"]) == 0
    printed = write(tmp_path / "p.yaml", capsys.readouterr().out)
    assert main(["train", "--config", str(printed), "--print-config"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_print_config_refuses_a_resume_that_train_would_refuse(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "16",
            "--batch-size", "16", "--threads", "1", "--output-dir", str(run)]
    assert main(["train", *tiny, "--arch", "resnet44", "-K", "20", "--max-steps", "1", "--epochs", "2"]) == 0
    capsys.readouterr()
    # -K restated for the run's own arch (resnet44 allows 20; the default resnet32 would not): taken
    assert main(["train", "--output-dir", str(run), "--resume", "-K", "20", "--print-config"]) == 0
    assert "arch: resnet44" in capsys.readouterr().out
    assert main(["train", "--output-dir", str(run), "--resume", "--arch", "resnet32", "-K", "4",
                 "--print-config"]) == 2
    assert "is for arch='resnet44' but this run has --arch 'resnet32'" in capsys.readouterr().err
    assert main(["train", *tiny, "--print-config"]) == 0  # a new run into a folder holding one: said
    assert f"# note: {run} holds a run" in capsys.readouterr().out


def test_a_closed_pipe_ends_print_config_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "mlaan", "train", "--print-config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err


def test_option_choices_are_taken_in_any_case_and_recorded_as_spelled(capsys):
    """``--aux-head MLP`` was refused ("did you mean 'mlp'?"), while methods and data sets took any case."""
    assert main(["train", "--aux-head", "MLP", "--aux-width", "64", "--ema-update", "Last", "--balance", "MEMORY",
                 "--print-config"]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert (printed["aux_head"], printed["ema_update"], printed["balance"]) == ("mlp", "last", "memory")
    assert printed["aux_width"] == 64 and "aux_width" not in err  # read with aux_head=mlp: no "not read" warning
    assert main(["train", "--aux-head", "big", "--print-config"]) == 2
    assert "unknown aux_head 'big'; allowed: mlp, linear" in capsys.readouterr().err


def test_a_choice_in_another_case_is_the_same_value_for_the_api_and_for_resume():
    from mlaan.engine.options import LocalOptions
    from mlaan.training.config import coerce
    from mlaan.training.resume import check_resume_config

    assert LocalOptions(infopro_task="Contrastive", aux_head="MLP").infopro_task == "contrastive"
    assert coerce("aux_head", "MLP") == "mlp" and coerce("aux_head", "big") == "big"  # the option's check names it
    check_resume_config({"method": "dgl+mlaan", "aux_head": "mlp"}, {"aux_head": coerce("aux_head", "MLP")}, "r/x.pt")
    with pytest.raises(ValueError, match='aux_head: "mlp" in the run, "linear" given'):
        check_resume_config({"method": "dgl+mlaan", "aux_head": "mlp"}, {"aux_head": "linear"}, "r/x.pt")


def test_a_choice_in_another_case_reaches_the_options_it_conditions():
    from mlaan.bench.memory import parse_options
    from mlaan.training.config import TrainConfig

    cfg = TrainConfig(method="dgl", aux_head="MLP", aux_width=64).resolve()  # the API, not through coerce
    assert cfg.aux_head == "mlp" and cfg.engine_options((0.0,), (1.0,))["aux_width"] == 64
    assert parse_options(["aux_head=MLP", "aux_width=64"]) == {"aux_head": "mlp", "aux_width": 64}


def test_a_plugin_options_class_that_declares_choices_is_checked_without_calling_check_choices():
    import dataclasses

    from mlaan.engine.options import LocalOptions

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})

    from mlaan.engine.engine_options import check_choices

    spelled = Frozen(mode="B")
    check_choices(spelled)  # a frozen class too
    assert spelled.mode == "b"
    with pytest.raises(ValueError, match="unknown mode 'c'; allowed: a, b"):
        check_choices(Frozen(mode="c"))
    assert LocalOptions(aux_head="Linear").aux_head == "linear"


# ------------------------------------------------------------------------------------- one declaration each
# What --resume let change before the run options declared their resume policy (checkpoint.RESUME_FREE, a
# hand-written list): the derived set must stay this one.
RESUME_FREE_BEFORE = frozenset({
    "max_steps", "overwrite", "device", "workers", "tensorboard", "download", "data_root", "output_dir",
    "eval_batch_size", "precise_bn", "save_every", "grad_checkpointing", "checkpoint_segment", "checkpoint_modules",
    "amp", "channels_last", "compile", "threads", "extra", "parallel", "partition", "dist_timeout", "rescale_schedule",
})
# free options added since, each with its reason: data_parallel (issue 31, pipeline replicas: a resume on another
# layout is checked by the global batch, resume.check_schedule); checkpoint_trunk (issue 33: which trunk blocks a
# recomputing step recomputes, like checkpoint_modules: memory and time only, identical results)
RESUME_FREE_ADDED = frozenset({"data_parallel", "checkpoint_trunk"})


def test_every_config_field_has_a_resume_policy_and_the_free_ones_are_as_before():
    import dataclasses

    from mlaan.training.config import PER_INVOCATION, RESUME_FREE, RESUME_POLICIES, RunConfig, TrainConfig

    policies = {f.name: f.metadata.get("resume") for f in dataclasses.fields(TrainConfig)}
    assert {name for name, policy in policies.items() if policy not in RESUME_POLICIES} == set()
    run_fields = [f for f in dataclasses.fields(RunConfig)]
    assert all("resume" in f.metadata and "group" in f.metadata for f in run_fields)  # declared, not defaulted
    assert RESUME_FREE == RESUME_FREE_BEFORE | RESUME_FREE_ADDED
    assert sorted(PER_INVOCATION) == ["max_steps", "overwrite", "rescale_schedule"]


def test_every_run_option_is_a_flag_of_its_group_with_its_help_and_the_config_key_of_the_same_name():
    """``mlaan train``'s run flags come from RunConfig's declarations: one flag per field (``extra`` is a config
    key only), in the field's group, with its help; a data set's options are the data-set registry's."""
    import argparse
    import dataclasses

    from mlaan import data
    from mlaan.cli import build_parser
    from mlaan.training.config import GROUPS, RunConfig

    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    group_of = {a.dest: g.title for g in train._action_groups for a in g._group_actions}
    help_of = {a.dest: a.help for a in train._actions}
    declared = [f for f in dataclasses.fields(RunConfig) if f.metadata["group"] is not None]
    assert [f.name for f in dataclasses.fields(RunConfig) if f not in declared] == ["extra"]
    for f in declared:
        assert group_of[f.name] == GROUPS[f.metadata["group"]], f.name
        if "data_set_option" not in f.metadata:
            assert help_of[f.name] == f.metadata["help"].format(default=f.default), f.name
    data_set_fields = {f.name: f.default for f in declared if "data_set_option" in f.metadata}
    registry = {spec.option_key(o): o.default for spec in data.registered_datasets() for o in spec.options}
    assert data_set_fields == registry
