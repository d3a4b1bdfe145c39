"""The run configuration: checked when built, resolved, its flags generated from its fields,
and run by training.run."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from clustr_tf import config as c
from clustr_tf import config_flags
from clustr_tf import training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(*args):
    """A fresh FlagValues with the generated flags, parsed from `args`."""
    flag_values = flags.FlagValues()
    config_flags.define_flags(flag_values)
    flag_values(["main.py", *args])
    return flag_values


def test_defaults_resolve():
    digits = c.RunConfig(runtime=c.Runtime(model_dir="r"))
    assert (digits.runtime.epochs, digits.model.eval_L, digits.objective.batch_size) == (40, 20, 240)
    assert digits.optimizer.lr_milestones == ()
    cifar = c.RunConfig(data=c.Data(dataset="cifar10"), runtime=c.Runtime(model_dir="r"))
    assert (cifar.runtime.epochs, cifar.optimizer.lr_milestones) == (90, (30, 60))
    custom = c.RunConfig(optimizer=c.Optimizer(lr_milestones="5,7"), objective=c.Objective(m=4, d=5),
                         runtime=c.Runtime(model_dir="r", epochs=9))
    assert (custom.optimizer.lr_milestones, custom.objective.batch_size) == ((5, 7), 20)
    assert c.RunConfig().runtime.model_dir.startswith(os.path.join("runs", "digits-"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits.runtime = c.Runtime()


def test_learning_rate_defaults_per_dataset_and_backbone():
    def lr(dataset, backbone):
        return c.RunConfig(data=c.Data(dataset=dataset), model=c.Model(backbone=backbone),
                           runtime=c.Runtime(model_dir="r")).optimizer.lr

    assert (lr("digits", "auto"), lr("digits", "lipschitz"), lr("cifar10", "lipschitz")) == (1e-4, 1e-3, 1e-4)
    assert c.RunConfig(optimizer=c.Optimizer(lr=0.5), runtime=c.Runtime(model_dir="r")).optimizer.lr == 0.5


@pytest.mark.parametrize("build, expected", [
    pytest.param(lambda: c.Data(dataset="mnist"), ("Unknown `dataset`", "Received: 'mnist'"), id="dataset"),
    pytest.param(lambda: c.Data(dataset="image_folder"), ("`dataset`=image_folder needs `data_dir`",),
                 id="folder_without_dir"),
    pytest.param(lambda: c.Data(data_mirror="ftpx://x"), ("`data_mirror` must be an http", "'ftpx://x'"), id="mirror"),
    pytest.param(lambda: c.Model(backbone="vgg"), ("Unknown `backbone`", "'vgg'"), id="backbone"),
    pytest.param(lambda: c.Model(k=0), ("`k` must be an integer >= 1. Received: 0",), id="k"),
    pytest.param(lambda: c.Model(L=True), ("`L` must be an integer >= 1. Received: True",), id="bool_is_not_int"),
    pytest.param(lambda: c.Objective(method="trades"), ("Unknown `method`",), id="method"),
    pytest.param(lambda: c.Objective(consistency="mse"), ("Unknown `consistency`", "official, kl"), id="consistency"),
    pytest.param(lambda: c.Objective(xent_lambda=-1.0), ("`xent_lambda` must be >= 0. Received: -1.0",), id="lambda"),
    pytest.param(lambda: c.Objective(method="pgd_at", consistency_lambda=8.0),
                 ("`consistency_lambda` applies to `method`=clustr only",), id="baseline_terms"),
    pytest.param(lambda: c.Objective(pgd_eps=0.01, pgd_step=0.02), ("0 < step <= eps <= 1",), id="pgd"),
    pytest.param(lambda: c.Optimizer(lr=0.0), ("`lr` must be > 0. Received: 0.0",), id="lr"),
    pytest.param(lambda: c.Optimizer(lr_milestones="7,5"), ("`lr_milestones` must be increasing",), id="milestones"),
    pytest.param(lambda: c.Optimizer(lr_milestones="soon"), ("'auto', 'none' or comma-separated",),
                 id="milestones_text"),
    pytest.param(lambda: c.Runtime(strategy="horovod"), ("Unknown `strategy`",), id="strategy"),
    pytest.param(lambda: c.Runtime(cpu_budget_minutes=0), ("`cpu_budget_minutes` must be > 0",), id="budget"),
    pytest.param(lambda: c.RunConfig(objective=c.Objective(m=20)), ("`m` must be at most 19", "Received: `m`=20"),
                 id="m_too_large"),
    pytest.param(lambda: c.RunConfig(model=c.Model(L=21)), ("`L` must be at most the number of clusters, 20",),
                 id="L_too_large"),
    pytest.param(lambda: c.RunConfig(model=c.Model(eval_L=30)), ("`eval_L` must be at most",), id="eval_L"),
    pytest.param(lambda: c.RunConfig(data="cifar10"), ("`data` must be a config.Data",), id="section_type"),
])
def test_bad_settings_name_what_and_what_was_received(build, expected):
    with pytest.raises(c.ConfigError) as error:
        build()
    for text in expected:
        assert text in str(error.value)
    assert "`" not in error.value.as_flags()  # the binary's form: --name


def test_paths_are_checked_before_anything_is_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for runtime, text in ((c.Runtime(model_dir=f"{blocker}/run"), "`model_dir` cannot be made: .* is a file"),
                          (c.Runtime(model_dir=f"{tmp_path}/r", init_checkpoint=f"{tmp_path}/none"),
                           "`init_checkpoint` does not exist"),
                          (c.Runtime(model_dir=f"{tmp_path}/r", export_dir=str(blocker)),
                           "`export_dir` exists and is not a directory")):
        with pytest.raises(c.ConfigError, match=text):
            c.RunConfig(runtime=runtime).check_paths()
    assert blocker.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["file"]  # nothing was created
    c.RunConfig(runtime=c.Runtime(model_dir=f"{tmp_path}/new/run")).check_paths()  # can be made: fine
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_config_modules_import_no_tensorflow():
    """A binary parses and checks its flags before TensorFlow loads: with the library's
    imports deferred (CLUSTR_TF_DEFER_IMPORTS=1, as the entry points set it), the config,
    flags, checks, cli and the serving client and versions load no TensorFlow nor Keras."""
    program = (
        f"import os, sys; sys.path.insert(0, {ROOT!r}); os.environ['CLUSTR_TF_DEFER_IMPORTS'] = '1'\n"
        "from absl import flags\n"
        "from clustr_tf import checks, cli, config, config_flags, defaults\n"
        "from clustr_tf.serving import client, versions\n"
        "assert 'CLUSTR_TF_DEFER_IMPORTS' not in os.environ  # read once, then gone for child processes\n"
        "values = flags.FlagValues()\n"
        "config_flags.define_flags(values)\n"
        "values(['main.py', '--k=3', '--model_dir=r'])\n"
        "assert config_flags.config_from_flags(values).model.k == 3\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_setting_is_a_flag_of_the_binary():
    """config.json (`flat()`) holds every flag under its name; each flag takes its field's
    default, type and help text."""
    flag_values = flags.FlagValues()
    names = config_flags.define_flags(flag_values, module_name="binary")
    assert len(names) == 52  # 47, then holdout_examples, temperature, lr_schedule, lr_horizon_cpu_minutes, resume_checkpoint
    assert sorted(names) == sorted(c.RunConfig(runtime=c.Runtime(model_dir="r")).flat())
    assert [f.name for f in flag_values.flags_by_module_dict()["binary"]] == names
    for field in config_flags.settings():
        flag = flag_values[field.name]
        assert flag.help == field.metadata["help"]
        assert flag.default == (field.default * 255 if field.metadata.get("flag_scale") else field.default)
    kinds = {name: flag_values[name].flag_type() for name in names}
    assert (kinds["download"], kinds["k"], kinds["eval_L"], kinds["alpha"], kinds["lr"]) == (
        "bool", "int", "int", "float", "float")
    assert (kinds["dataset"], kinds["lr_milestones"], kinds["mixed_precision"]) == ("string",) * 3
    assert (flag_values["eval_L"].default, flag_values["lr_milestones"].default) == (None, None)
    assert (flag_values["consistency_eps"].default, flag_values["consistency_step"].default,
            flag_values["pgd_eps"].default, flag_values["pgd_step"].default) == (8.0, 10.0, 8.0, 2.0)
    assert "'cifar10', 'cifar100', 'digits', 'svhn', 'image_folder'" in flag_values["dataset"].help


def test_default_flags_build_the_default_config():
    built = config_flags.config_from_flags(_parse("--model_dir=r"))
    assert built == c.RunConfig(runtime=c.Runtime(model_dir="r"))
    assert config_flags.config_from_values({"model_dir": "r"}) == built
    with pytest.raises(c.ConfigError, match="Unknown setting `K`. Received: 2"):
        config_flags.config_from_values({"K": 2})


def test_parsed_flags_build_the_config():
    built = config_flags.config_from_flags(_parse(
        "--dataset=cifar10", "--nodownload", "--k=3", "--eval_L=5", "--lr=0.01", "--lr_milestones=5,7",
        "--epochs=9", "--consistency_lambda=8", "--consistency_eps=4", "--consistency_step=5", "--pgd_eps=16",
        "--pgd_step=4", "--mixed_precision=bfloat16", "--model_dir=r"))
    assert (built.data.dataset, built.data.download, built.model.k, built.model.eval_L) == ("cifar10", False, 3, 5)
    assert (built.optimizer.lr, built.optimizer.lr_milestones, built.runtime.epochs) == (0.01, (5, 7), 9)
    objective = built.objective
    assert (objective.consistency_eps, objective.consistency_step) == (4 / 255, 5 / 255)  # flags in 1/255
    assert (objective.pgd_eps, objective.pgd_step) == (16 / 255, 4 / 255)
    assert built.runtime.mixed_precision == "bfloat16"


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--consistency_eps=300"], "`consistency_eps` must be in [0, 255] (1/255 units). Received: 300.0",
                 id="range"),
    pytest.param(["--consistency_step=-1"], "`consistency_step` must be in [0, 255]", id="negative"),
    pytest.param(["--pgd_step=0"], "`pgd_eps`, `pgd_step` must satisfy 0 < step <= eps <= 255 (1/255 units). "
                 "Received: 8.0, 0.0", id="pgd_step_zero"),
    pytest.param(["--pgd_eps=2", "--pgd_step=4"], "Received: 2.0, 4.0", id="pgd_step_above_eps"),
    pytest.param(["--pgd_eps=300", "--pgd_step=2"], "`pgd_eps` must be in [0, 255]", id="pgd_range"),
])
def test_flags_in_255ths_are_checked_in_their_units(args, expected):
    with pytest.raises(c.ConfigError) as error:
        config_flags.config_from_flags(_parse(*args, "--model_dir=r"))
    assert expected in str(error.value)
    assert "--" + str(error.value).split("`")[1] in error.value.as_flags()


def test_a_field_needs_a_flag_type():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        values: tuple | list = c.setting((), "Several.")

    with pytest.raises(TypeError, match="`values` .* needs `flag_type` metadata"):
        config_flags.flag_type(dataclasses.fields(Odd)[0])


def test_run_writes_the_run_directory(tmp_path):
    run = str(tmp_path / "run")
    config = c.RunConfig(runtime=c.Runtime(model_dir=run, epochs=1, steps_per_epoch=2))
    metrics = training.run(config)
    for name in ("config.json", "metrics.json", "model.keras", "training_log.csv"):
        assert os.path.exists(os.path.join(run, name)), name
    with open(os.path.join(run, "config.json")) as fh:
        assert json.load(fh) == json.loads(json.dumps(config.flat()))
    assert (metrics["epochs_trained"], metrics["method"], metrics["eval_L"]) == (1, "clustr", 20)
    with pytest.raises(TypeError, match="RunConfig"):
        training.run({"epochs": 1})


def test_write_json_replaces_the_file_whole_with_open_s_permissions(tmp_path):
    """`checks.write_json` (config.json, metrics.json, the benchmarks' results): the old file
    stays whole until the new one is complete, nothing temporary is left, and the file's mode
    is what `open` gives (umask applied), not mkstemp's 0600."""
    import stat

    from clustr_tf import checks

    path = tmp_path / "result.json"
    checks.write_json(str(path), {"a": 1})
    with pytest.raises(TypeError):
        checks.write_json(str(path), {"b": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["result.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
