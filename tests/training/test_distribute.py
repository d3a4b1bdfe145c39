"""tf.distribute tests: MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy
with 2 worker processes on localhost. Each runs tests/training/distributed_run.py in subprocesses
(logical devices and TF_CONFIG must be set before TensorFlow starts)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from absl.testing import absltest

from clustr_tf import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "training", "distributed_run.py")



def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


class MirroredTest(absltest.TestCase):
    def test_two_replicas_train_identically_and_scale_the_loss(self):
        tmp = self.create_tempdir().full_path
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--strategy=mirrored", f"--out={out}", f"--model_dir={tmp}",
             "--check_scaling"],
            capture_output=True, text=True, env=_env(), timeout=600,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with open(out) as fh:
            result = json.load(fh)
        self.assertEqual(result["replicas"], 2)
        # 2 replicas on two neighbourhood batches = 1 device on both (SGD, one step).
        self.assertLess(result["scaling_max_abs_diff"], 1e-5)
        losses = result["magnet_loss"]
        self.assertTrue(np.all(np.isfinite(losses)))
        self.assertLess(losses[-1], losses[0])
        for name, copies in result["variables"].items():
            self.assertLen(copies, 2, name)
            np.testing.assert_array_equal(copies[0], copies[1], err_msg=name)


class MultiWorkerTest(absltest.TestCase):
    def test_two_workers_train_identically(self):
        tmp = self.create_tempdir().full_path
        ports = [_free_port(), _free_port()]
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        procs, outs = [], []
        for index in range(2):
            out = os.path.join(tmp, f"worker{index}.json")
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(subprocess.Popen(
                [sys.executable, SCRIPT, "--strategy=multi_worker", f"--out={out}",
                 f"--model_dir={tmp}", "--epochs=2", "--steps=3"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(TF_CONFIG=config),
            ))
            outs.append(out)
        try:
            results = [p.communicate(timeout=600) for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, (_, err) in zip(procs, results):
            self.assertEqual(p.returncode, 0, err[-3000:])
        chief, other = (json.load(open(o)) for o in outs)
        self.assertEqual((chief["replicas"], other["replicas"]), (2, 2))
        self.assertEqual((chief["is_chief"], other["is_chief"]), (True, False))
        np.testing.assert_allclose(chief["magnet_loss"], other["magnet_loss"], rtol=1e-6)
        self.assertTrue(np.all(np.isfinite(chief["magnet_loss"])))
        self.assertLess(chief["magnet_loss"][-1], chief["magnet_loss"][0])
        self.assertEqual(sorted(chief["variables"]), sorted(other["variables"]))
        for name in chief["variables"]:
            np.testing.assert_array_equal(chief["variables"][name][0], other["variables"][name][0], err_msg=name)
        # Each worker saved into its own folder.
        self.assertTrue(os.listdir(os.path.join(tmp, "run", "checkpoints")))
        self.assertTrue(os.listdir(os.path.join(tmp, "run", "workers", "worker_1", "checkpoints")))


class StrategyByNameTest(absltest.TestCase):
    def test_names(self):
        self.assertEqual(distribute.get_strategy("default").num_replicas_in_sync, 1)
        self.assertEqual(distribute.get_strategy("auto").num_replicas_in_sync, 1)
        with self.assertRaisesRegex(ValueError, "Unknown strategy.*'ddp'"):
            distribute.get_strategy("ddp")

    def test_multi_worker_needs_tf_config(self):
        old = os.environ.pop("TF_CONFIG", None)
        try:
            with self.assertRaisesRegex(ValueError, "TF_CONFIG"):
                distribute.get_strategy("multi_worker")
            os.environ["TF_CONFIG"] = "{not json"
            with self.assertRaisesRegex(ValueError, "TF_CONFIG is not valid JSON"):
                distribute.get_strategy("auto")
        finally:
            os.environ.pop("TF_CONFIG", None)
            if old is not None:
                os.environ["TF_CONFIG"] = old

    def test_worker_info_without_cluster(self):
        self.assertEqual(distribute.worker_info(distribute.get_strategy("default")), (True, 0, 1))


if __name__ == "__main__":
    absltest.main()
