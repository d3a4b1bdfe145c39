"""training/main.py: a tiny run and every bad input through its `main` in this process (flags
parsed on a fresh FlagValues), and, as the binary itself, a bad flag's exit status and the
resume after SIGKILL."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from unittest import mock
import time

import numpy as np
import pytest

from tests import binaries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(ROOT, "training", "main.py")

main_lib = binaries.load(binaries.MAIN)


def _parse(*args):
    """The binary's flags on a fresh FlagValues, parsed from `args` as the binary does; returns
    (the arguments left, the FlagValues)."""
    return binaries.parse(binaries.MAIN, *args)


def _main(*args):
    """Runs the binary's `main` in this process, as `main.py`; a failure raises SystemExit."""
    with mock.patch.object(sys, "argv", ["main.py", *args]):
        main_lib.main(*_parse(*args))


def _fails_with_one_line(capsys, args, *expected, status=None):
    with pytest.raises(SystemExit) as exit_info:
        _main(*args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    if status is not None:
        assert exit_info.value.code == status, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("main.py: error: "), err[-2000:]
    for text in expected:
        assert text in last
    return last


def test_tiny_run_writes_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    _main("--epochs=2", "--steps_per_epoch=2", f"--model_dir={run}", "--seed=3")
    for name in ("config.json", "metrics.json", "model.keras", "training_log.csv",
                 os.path.join("checkpoints", "checkpoint")):
        assert (run / name).exists(), name
    assert os.listdir(run / "logs")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("clean_accuracy", "nearest_center_accuracy", "agreement"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_examples"] == 360
    assert metrics["epochs"] == 2
    with open(run / "training_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for key in ("loss", "nearest_center_accuracy", "val_accuracy", "variance", "center_separation"):
        assert key in rows[0]
    config = json.loads((run / "config.json").read_text())
    assert (config["k"], config["m"], config["d"], config["alpha"], config["L"], config["lr"]) == (
        2, 12, 20, 12.5, 10, 1e-4)
    assert config["seed"] == 3
    # Progress as plain lines: one per epoch with its validation metrics, no control characters
    # (a log file reads as the terminal), no epoch line twice.
    out = capsys.readouterr().out
    assert "\r" not in out and "\b" not in out
    ends = [line for line in out.splitlines() if line.startswith("Epoch ") and " steps in " in line]
    assert [line.split(":")[0] for line in ends] == ["Epoch 1/2", "Epoch 2/2"], out[-2000:]
    assert all("val_accuracy" in line and "loss" in line for line in ends), ends


def test_progress_lines_inside_and_at_the_end_of_an_epoch():
    import io

    from clustr_tf.training import callbacks

    stream = io.StringIO()
    progress = callbacks.ProgressLines(epochs=3, steps_per_epoch=4, interval=0.0, stream=stream)
    progress.on_epoch_begin(1)
    for step in range(4):
        progress.on_train_batch_end(step, {"loss": 1.23456, "accuracy": 0.5, "note": "text"})
    progress.on_epoch_end(1, {"loss": 1.2, "val_accuracy": 0.75})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Epoch 2/3: step 1/4 - loss 1.235 - accuracy 0.5 (0 s)"
    assert len(lines) == 5
    assert lines[-1] == "Epoch 2/3: 4 steps in 0 s - loss 1.2 - val_accuracy 0.75"


def test_former_boolean_mixed_precision_flag():
    for args, expected in ((["--mixed_precision"], "float16"), (["--nomixed_precision"], None),
                           (["--mixed_precision=bfloat16"], "bfloat16"), ([], None)):
        _, flag_values = _parse(*args, "--model_dir=r")
        assert main_lib.config_from_flags(flag_values).runtime.mixed_precision == expected, args


def test_sigkill_then_rerun_continues_and_logs_each_epoch_once(tmp_path):
    run = str(tmp_path / "run")
    args = [sys.executable, MAIN, "--epochs=5", "--steps_per_epoch=6", "--checkpoint_every_steps=2",
            f"--model_dir={run}", "--seed=1"]
    csv_path = os.path.join(run, "training_log.csv")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(csv_path):
                with open(csv_path) as fh:
                    if len(fh.read().splitlines()) >= 3:  # header + epochs 0 and 1
                        break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not os.path.exists(os.path.join(run, "metrics.json"))
    out = binaries.run(binaries.MAIN, *args[2:])  # the rerun, in this process
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restored" in out.stderr
    restored_epoch = int(out.stderr.split("Restored")[1].split("epoch ")[1].split(",")[0])
    # Killed after epoch 1 was logged: the state saved at or after its last
    # mid-epoch checkpoint comes back, never the start.
    assert restored_epoch >= 1
    assert "Epoch 1/5" not in out.stdout  # it did not start over
    assert f"Epoch {restored_epoch + 1}/5" in out.stdout
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert os.path.exists(os.path.join(run, "metrics.json"))


def test_the_binary_exits_2_with_one_line_on_a_bad_flag(tmp_path):
    """A bad value, a typo and a bad type: exactly one line each (no TensorFlow start-up
    lines: the flags are checked before it loads), exit status 2, nothing on disk."""
    for args, line in (
            (["--k=0"], "main.py: error: --k must be an integer >= 1. Received: 0"),
            (["--datset=cifar10"], "main.py: error: Unknown command line flag 'datset'. Did you mean: dataset ?"),
            (["--lr=abc"], "main.py: error: flag --lr=abc: could not convert string to float: 'abc'")):
        out = subprocess.run([sys.executable, MAIN, *args, f"--model_dir={tmp_path}/run"], capture_output=True,
                             text=True, cwd=ROOT, timeout=600)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines() == [line]
        assert not os.path.exists(tmp_path / "run")


def test_help_lists_the_flags_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, MAIN, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--certified_margin" in out.stdout and "--dataset" in out.stdout
    assert os.listdir(tmp_path) == []


def test_heartbeat_repeats_the_status_while_a_phase_is_silent():
    """`cli.Heartbeat` prints the current status when `interval` passed without a line, and
    not while lines come."""
    import io

    from clustr_tf import cli

    stream = io.StringIO()
    with cli.Heartbeat(interval=0.2, stream=stream) as beat:
        beat.status("l_inf PGD eps 8/255: 0/10 images attacked")
        time.sleep(0.7)
        quiet = stream.getvalue().splitlines()
        beat.status(None)
        beat.say("[1/1] done")
        time.sleep(0.5)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(quiet) <= 4, quiet
    assert all(l.startswith("  ... l_inf PGD eps 8/255: 0/10 images attacked (") for l in quiet)
    assert lines[len(quiet):] == ["[1/1] done"]  # no status: nothing repeated


@pytest.mark.parametrize("args, expected", [
    pytest.param(["--dataset=mnist"], ("--dataset", "'mnist'"), id="unknown_dataset"),
    pytest.param(["--m=20"], ("--m", "Received: --m=20"), id="m_too_large"),
    pytest.param(["--L=21"], ("--L", "20", "Received: --L=21"), id="L_too_large"),
    pytest.param(["--k=0"], ("--k", "Received: 0"), id="k_zero"),
    pytest.param(["--backbone=vgg"], ("--backbone", "'vgg'"), id="unknown_backbone"),
    pytest.param(["--lr=-1"], ("--lr", "Received: -1"), id="lr_negative"),
])
def test_bad_flag(args, expected, tmp_path, capsys):
    _fails_with_one_line(capsys, args + [f"--model_dir={tmp_path}/run"], *expected, status=2)
    assert not (tmp_path / "run" / "config.json").exists()


def test_unwritable_model_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    _fails_with_one_line(capsys, [f"--model_dir={blocker}/run"], "--model_dir", str(blocker))
    assert blocker.read_text() == "keep me"


_HOLD_LOCK = """
import fcntl, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
fh.truncate(0)
fh.write("pid 4242 on elsewhere, since 2026-12-03 10:00:00")
fh.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_training_in_the_same_run_directory_fails_at_once(tmp_path, capsys):
    """While another process trains in the run directory (holds its lock as
    `state.run_dir_lock` does), the command stops with one line naming that process, exit 1,
    before it writes anything; once that process is killed, the same command runs."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("the first training's")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run / ".training.lock")],
                              stdout=subprocess.PIPE, text=True)
    args = [f"--model_dir={run}", "--epochs=1", "--steps_per_epoch=1"]
    try:
        assert holder.stdout.readline().strip() == "locked"
        _fails_with_one_line(capsys, args, "Another training is running in this run directory",
                             "pid 4242 on elsewhere", "Nothing was changed", f"model_dir={run}", status=1)
        assert sorted(os.listdir(run)) == [".training.lock", "config.json"]
        assert (run / "config.json").read_text() == "the first training's"
    finally:
        holder.kill()
        holder.wait()
    _main(*args)  # the killed holder left no stale lock
    assert json.loads((run / "config.json").read_text())["model_dir"] == str(run)
    assert (run / "metrics.json").exists()
    assert "pid %d on " % os.getpid() in (run / ".training.lock").read_text()


def test_missing_dataset(tmp_path, capsys):
    """A --data_dir that does not exist is a bad flag (before TensorFlow loads); an empty one
    without the download, the dataset cannot be had: neither leaves the run folder behind."""
    last = _fails_with_one_line(
        capsys, ["--dataset=cifar10", f"--data_dir={tmp_path}/nothing", f"--model_dir={tmp_path}/run"],
        "--data_dir does not exist", "CIFAR's python or binary tarball", f"Received: {tmp_path}/nothing", status=2)
    assert not (tmp_path / "run").exists() and not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    last = _fails_with_one_line(
        capsys, ["--dataset=cifar10", f"--data_dir={tmp_path}/empty", "--nodownload", f"--model_dir={tmp_path}/run"],
        "cifar10", "--data_dir", status=1)
    assert "could not be found" in last
    assert not (tmp_path / "run").exists()
    assert os.listdir(tmp_path / "empty") == []


def test_no_network_fails_at_once_with_how_to_pass_the_data(tmp_path, capsys, monkeypatch):
    """No network: one connection attempt to the publisher's host (here a closed local port),
    one line saying how to pass --data_dir, no run folder left."""
    import socket

    from clustr_tf.data import tfds_sources

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    real = tfds_sources._check_reachable
    monkeypatch.setattr(tfds_sources, "_check_reachable",
                        lambda urls, timeout=10: real([f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"], timeout))
    (tmp_path / "tfds").mkdir()
    last = _fails_with_one_line(
        capsys, ["--dataset=cifar10", f"--data_dir={tmp_path}/tfds", f"--model_dir={tmp_path}/run"],
        f"127.0.0.1:{port} cannot be reached", "no network?", "Pass --data_dir=DIR", status=1)
    assert not (tmp_path / "run").exists()


def test_unexpected_argument(capsys):
    _fails_with_one_line(capsys, ["train"], "unexpected arguments: train", status=2)


def test_unknown_consistency_form(tmp_path, capsys):
    args = ["--consistency=trades", "--consistency_lambda=8", f"--model_dir={tmp_path}/run"]
    last = _fails_with_one_line(capsys, args, "--consistency", "Received: 'trades'", status=2)
    assert "official, kl" in last


@pytest.fixture(scope="module")
def xent_run(tmp_path_factory):
    """A cross-entropy run, as the official ClusTR+QTRADES recipe starts from."""
    source = str(tmp_path_factory.mktemp("init") / "xent")
    _main("--method=cross_entropy", "--epochs=10", f"--model_dir={source}", "--lr=1e-3")
    return source


def test_init_checkpoint_starts_from_the_backbone_and_refreshes_the_clusters_first(xent_run, tmp_path, caplog):
    import keras

    import clustr_tf  # noqa: F401: registers the models

    caplog.set_level(logging.INFO, logger="absl")
    run = tmp_path / "qtrades"
    _main(f"--init_checkpoint={xent_run}", "--consistency_lambda=8", "--epochs=1", "--steps_per_epoch=1", "--lr=1e-9",
          f"--model_dir={run}")
    assert f"Initialised the backbone from {xent_run}/model.keras (SoftmaxClassifier)" in caplog.text
    with open(run / "training_log.csv") as fh:
        first = next(csv.DictReader(fh))
    # The first step already classifies its batch by centers of the copied features: the
    # clusters were refreshed on them before it (random centers give about 10%).
    assert float(first["nearest_center_accuracy"]) > 0.8
    assert float(first["consistency_loss"]) > 0.0
    source = keras.saving.load_model(os.path.join(xent_run, "model.keras"))
    model = keras.saving.load_model(run / "model.keras")
    assert type(model).__name__ == "ClusTRModel"
    # The trained weights carried over (lr 1e-9 barely moves them; batch-norm moving
    # statistics move with every training pass, whatever the rate).
    assert source.backbone.trainable_weights
    for a, b in zip(source.backbone.trainable_weights, model.backbone.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert json.loads((run / "config.json").read_text())["consistency"] == "official"


def test_init_checkpoint_a_backbone_that_does_not_fit(xent_run, tmp_path, capsys):
    path = os.path.join(xent_run, "model.keras")
    last = _fails_with_one_line(
        capsys, [f"--init_checkpoint={path}", "--backbone=resnet18", "--width_multiplier=0.125",
                 f"--model_dir={tmp_path}/r"],
        "--init_checkpoint's backbone does not fit", f"Received: {path}", status=2)
    assert "--width_multiplier" in last
    assert os.path.exists(path)  # nothing was touched


def test_init_checkpoint_a_corrupt_or_missing_model(tmp_path, capsys):
    corrupt = tmp_path / "broken.keras"
    corrupt.write_bytes(b"not a zip")
    _fails_with_one_line(capsys, [f"--init_checkpoint={corrupt}", f"--model_dir={tmp_path}/r"],
                         f"--init_checkpoint: {corrupt} is not a .keras model archive (9 bytes", "truncated", status=2)
    assert corrupt.exists()
    assert not (tmp_path / "r").exists()  # the run folder it made is gone
    empty = tmp_path / "unfinished_run"
    empty.mkdir()
    _fails_with_one_line(capsys, [f"--init_checkpoint={empty}", f"--model_dir={tmp_path}/r3"],
                         "--init_checkpoint must be a .keras model or a run directory holding model.keras", status=2)
    _fails_with_one_line(capsys, [f"--init_checkpoint={tmp_path}/nothing", f"--model_dir={tmp_path}/r5"],
                         "--init_checkpoint does not exist", status=2)


def test_class_counts_match_the_datasets():
    from clustr_tf import config
    from clustr_tf import data

    assert sorted(config.DATASET_CLASSES) == sorted(data.DATASETS)
    for name, classes in config.DATASET_CLASSES.items():
        assert data.info(name).num_classes == classes


def test_tensorflow_info_lines_are_left_out_of_the_binaries_logs():
    from clustr_tf import cli

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    saver = os.path.join("site-packages", "tensorflow", "python", "checkpoint", "functional_saver.py")
    assert not cli._not_tensorflow_info(record(logging.INFO, saver))
    assert cli._not_tensorflow_info(record(logging.WARNING, saver))
    assert cli._not_tensorflow_info(record(logging.INFO, os.path.join("clustr_tf", "core", "clustering.py")))
