"""Rewrites the results blocks of README.md and docs/*.md from benchmarks/results/*.json,
and the binaries' flag tables from their own flag definitions.

    python benchmarks/update_readme.py

Each block sits between `<!-- NAME -->` and `<!-- end NAME -->` markers; a block whose
result file is missing is left as it is. Numbers and flag references in the documents come
only from here (tests/test_update_readme.py checks that the committed ones are current).
"""

import functools
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def default_run(r):
    rows = [r] + ([r["bfloat16"]] if "bfloat16" in r else [])
    return [
        "| command | wall time | test accuracy (soft kNC) | test accuracy (nearest center) |",
        "|---|---|---|---|",
        *[f"| `{x['command']}` | {x['wall_seconds']:.0f} s on {r['machine']['cpus']} CPU cores"
          f"{' (' + format(x['cpu_seconds'], '.0f') + ' CPU-s)' if 'cpu_seconds' in x else ''} | "
          f"{100 * x['clean_accuracy']:.1f}% | {100 * x['nearest_center_accuracy']:.1f}% |" for x in rows],
    ]


def train_throughput(r):
    s, t = r["settings"], r.get("targets", {})

    def met(key):
        return "met" if t.get(key, {}).get("met") else "**not met**"

    return [
        f"ResNet-18 (width {s['width_multiplier']}), batch {s['batch']} (m={s['m']} x d={s['d']}), "
        f"{r['device']['cpu']} with {r['device']['cpu_cores']} cores, TF {r['device']['tensorflow']} "
        f"({r.get('date', '')}):",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| cross-entropy step | {r['xent_step_s']:.2f} s ({r['xent_images_per_s']:.1f} images/s) | |",
        f"| ClusTR step | {r['clustr_step_s']:.2f} s ({r['clustr_images_per_s']:.1f} images/s) | |",
        f"| ClusTR / cross-entropy step time | {r['ratio']:.2f}x | <= 1.10 ({met('ratio')}) |",
        f"| ClusTR+QTRADES step | {r['qtrades_step_s']:.2f} s | |",
        f"| ClusTR+QTRADES / ClusTR step time | {r['qtrades_ratio']:.2f}x | <= 2.2 ({met('qtrades_ratio')}) |",
        f"| sampler batches per consumed step | {r['sampler_to_step_ratio']:.0f}x | >= 10 ({met('sampler_to_step_ratio')}) |",
        f"| cluster refresh / inference pass | {r['refresh_to_inference_ratio']:.2f}x | <= 1.3 ({met('refresh_to_inference_ratio')}) |",
    ]


def precision_speed(r):
    """The bfloat16/float32 table of train_throughput.json (its `precisions` and `precision_ratios`)."""
    d, s = r["device"], r["settings"]
    if "bfloat16" not in r.get("precisions", {}):
        return ["No bfloat16 measurement in `benchmarks/results/train_throughput.json` "
                "(rerun `python benchmarks/train_throughput.py`)."]
    features = [name.upper().replace("_", "-") for name in ("avx512_bf16", "amx_bf16")
                if (d.get("cpu_features") or {}).get(name)]
    lines = [
        f"ResNet-18 (width {s['width_multiplier']}), batch {s['batch']}, one training step, median of "
        f"{s['steps']} interleaved rounds; {d['cpu']}, {d['cpu_cores']} cores "
        f"({', '.join(features) if features else 'no native bfloat16'}"
        f"{', no AMX' if features and 'AMX-BF16' not in features else ''}), TF {d['tensorflow']} "
        f"({r.get('date', '')}):",
        "",
        "| objective | float32 step | bfloat16 step | bfloat16 / float32 (wall) | (CPU seconds) |",
        "|---|---|---|---|---|",
    ]
    names = {"xent": "cross-entropy", "clustr": "ClusTR", "clustr_qtrades": "ClusTR+QTRADES"}
    for key, name in names.items():
        f32, bf16 = r["precisions"]["float32"][key], r["precisions"]["bfloat16"][key]
        ratio = r["precision_ratios"]["bfloat16"][key]
        lines.append(f"| {name} | {f32['step_s']:.2f} s | {bf16['step_s']:.2f} s | "
                     f"**{ratio['step_ratio']:.2f}x** | {ratio['cpu_ratio']:.2f}x |")
    shares = [r["precisions"][p][k]["cpu_share"] for p in ("float32", "bfloat16") for k in names]
    share = sorted(shares)[len(shares) // 2]
    if share < 0.9:
        lines += ["", f"The benchmark's process had a median {share:.2f} of the machine's CPU during these steps "
                      f"(other work shared it): the CPU-second ratios are the steadier measure."]
    if r.get("bfloat16_note"):
        lines += ["", f"**{r['bfloat16_note']}**"]
    return lines


def _radius_name(key, dataset):
    value = float(key)
    return f"{round(value * 255):g}/255" if dataset != "digits" else f"{value:g}"


def _portable(command):
    """A command with an absolute --data_dir shown as the file's name (the path is this
    machine's)."""
    return " ".join(f"--data_dir={os.path.basename(w.split('=', 1)[1])}"
                    if w.startswith("--data_dir=/") else w for w in command.split())


def certified(r):
    """The tables, sweeps and curves of benchmarks/results/certified.json, each row with the
    command that produced it."""
    names = {"certified_clustr": "certified ClusTR (nearest center)",
             "lipschitz_margin_xent": "Lipschitz-margin cross-entropy (linear head)"}
    titles = {"digits": "digits", "cifar10": "CIFAR-10", "cifar10_long": "CIFAR-10, the long budget"}
    lines = []
    for dataset in ("digits", "cifar10", "cifar10_long"):
        runs = {k.split("/")[1]: v for k, v in r.get("runs", {}).items()
                if k.split("/")[0] == dataset and "setting" in v}  # (the former recipe's runs have none)
        if not runs:
            continue
        first = next(iter(runs.values()))
        radii = [k for k in first["certified_accuracy"] if float(k) > 0]
        shown = [_radius_name(k, dataset) for k in radii]
        lines += [f"**{titles[dataset]}**, {first['budget_cpu_minutes']:g} training CPU-minutes per method "
                  f"({first['certified_test_examples']} test images certified, {first['attacked_examples']} "
                  f"attacked; `--backbone=lipschitz`, bound {first['lipschitz_bound']:g}; {r['machine']['cpu']}, "
                  f"{r['machine']['cpus']} cores, {first['date']}):", "",
                  "| method | training CPU-min | clean | " + " | ".join(f"certified {x}" for x in shown)
                  + " | " + " | ".join(f"l2 PGD {x}" for x in shown) + " | violations |",
                  "|---|---|---|" + "---|" * (2 * len(radii)) + "---|"]
        for method, run in runs.items():
            emp = run["empirical_l2_certified_rule"]
            lines.append(
                f"| {names.get(method, method)} | {run['train_cpu_minutes']:.1f} | {100 * run['clean_accuracy']:.1f}% | "
                + " | ".join(f"**{100 * run['certified_accuracy'][k]:.1f}%**" for k in radii) + " | "
                + " | ".join(f"{100 * emp[k]:.1f}% ({100 * run['certified_accuracy_attacked_subset'][k]:.1f}%)"
                             if k in emp else "-" for k in radii) + " | "
                + f"{sum(run['certificate_violations'].values())} |")
        lines += _soft_knc_note(runs)
        if all(len(run.get("seeds", [])) > 1 for run in runs.values()):
            key = radii[min(1, len(radii) - 1)]
            lines += ["", f"The same commands with `--seed=1`, `--seed=2`, ... (the row above is seed 0): certified "
                          f"accuracy at {_radius_name(key, dataset)} on the whole test split, per seed, and the mean:", "",
                      "| method | " + " | ".join(f"seed {x['seed']}" for x in first["seeds"]) + " | mean | clean, mean |",
                      "|---|" + "---|" * (len(first["seeds"]) + 2)]
            lines += [f"| {names.get(method, method)} | "
                      + " | ".join(f"{100 * x['certified_accuracy'][key]:.1f}%" for x in run["seeds"])
                      + f" | **{100 * run['certified_accuracy_mean'][key]:.1f}%** | {100 * run['clean_accuracy_mean']:.1f}% |"
                      for method, run in runs.items()]
        lines += ["", "The commands of these rows (then `" + first["evaluate_command"] + "`):", ""]
        lines += [f"- {names.get(method, method)}: `{_portable(run['command'])}`" for method, run in runs.items()]
        if "--data_dir=" in first["command"]:
            data_file = _portable(first["command"]).split("--data_dir=")[1].split()[0]
            lines += ["", f"`{data_file}` is the JPEG re-encoding of CIFAR-10 that this project's machine keeps "
                          "beside the repository (its pixels differ slightly from the original release's, so these "
                          "numbers are close to, not the same as, numbers on it); without it, leave `--data_dir` out "
                          "and the run reads TFDS's CIFAR-10."]
        lines += ["", "Certified accuracy at " + _radius_name(radii[min(1, len(radii) - 1)] if dataset == "digits"
                                                                  else radii[0], dataset)
                  + " on the whole test split against training CPU time (one run, certified after each part):", "",
                  "| method | " + " | ".join(f"part {i + 1}" for i in range(len(first["curve"]))) + " |",
                  "|---|" + "---|" * len(first["curve"])]
        for method, run in runs.items():
            lines.append(f"| {names.get(method, method)} | "
                         + " | ".join(f"{100 * p['certified_accuracy']:.1f}% at {p['train_cpu_minutes']:.1f} min"
                                      for p in run["curve"]) + " |")
        sweeps = {k.split("/")[1]: v for k, v in r.get("sweeps", {}).items() if k.split("/")[0] == dataset}
        if sweeps:
            sweep = next(iter(sweeps.values()))
            lines += ["", f"The sweep that chose each method's setting ({sweep['budget_cpu_minutes']:g} CPU-minutes "
                          f"per setting, {sweep['holdout_examples']} training examples held out and certified; the "
                          f"test split is not used; R: the training radius over the evaluation radius, T: the "
                          f"temperature):", "",
                      "| method | R | T | learning rate | held-out certified | held-out clean | chosen |",
                      "|---|---|---|---|---|---|---|"]
            for method, sw in sweeps.items():
                for i, setting in enumerate(sw["settings"]):
                    lines.append(f"| {names.get(method, method)} | {setting['radius_x']:g}x | {setting['temperature']:g} | "
                                 f"{setting['lr_x']:g}x | {100 * setting['holdout_certified_accuracy']:.1f}% | "
                                 f"{100 * setting['holdout_clean_accuracy']:.1f}% | {'yes' if i == sw['chosen'] else ''} |")
        anchors = r.get("anchors", {}).get(dataset)
        if anchors:
            lines += ["", "The literature, on GPU budgets (not run here; the rows above had "
                          f"{first['budget_cpu_minutes']:g} CPU-minutes on {r['machine']['cpus']} cores):", "",
                      "| method | budget | clean | certified 36/255 |", "|---|---|---|---|"]
            lines += [f"| {a['method']} | {a.get('budget', 'GPU')} | {100 * a['clean']:.1f}% | "
                      f"{100 * a['certified_36']:.1f}% |" for a in anchors]
        lines.append("")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _soft_knc_note(runs):
    """What 'clean' is in a certified table, and the accuracy ClusTR serves with (soft kNC)."""
    run = runs.get("certified_clustr") or {}
    rule, soft = run.get("serving_rule"), run.get("soft_knc_clean_accuracy")
    if not rule and not soft:
        return []
    text = ("clean: test accuracy of the decision the certificate is about (its radius 0): the nearest center for "
            "ClusTR, the argmax for the linear head; the `certify` signature decides the same way. ClusTR's own "
            "prediction, soft kNC (`model.predict`, the `serving_default` signature), ")
    if rule:
        new, held = rule["temperature"], rule["held_variance"]
        text += (f"reaches {100 * new['accuracy']:.1f}% with 2 sigma^2 = T, this version's rule (it agrees with the "
                 f"nearest center on {100 * new['agreement_with_nearest_center']:.1f}% of test images)")
        if abs(held["variance"] - new["variance"]) > 1e-6:
            text += (f"; this run was trained before that rule and holds sigma^2 = {held['variance']:.3g}, the "
                     f"squared distance to the own center, with which it reaches {100 * held['accuracy']:.1f}% "
                     f"(agreement {100 * held['agreement_with_nearest_center']:.1f}%)")
        text += ". Measured by `python benchmarks/certified.py --phases=serving_rule`."
    elif run.get("soft_knc_rule"):
        text += f"reaches {100 * soft:.1f}% with {run['soft_knc_rule']} (the run's metrics.json)."
    else:
        text += (f"reached {100 * soft:.1f}% (the run's metrics.json) with the variance estimated as the squared "
                 "distance to the own center, the rule before 2026-12-04; this version sets 2 sigma^2 = T "
                 "(`python benchmarks/certified.py --phases=serving_rule` measures both on a run).")
    return ["", text]


def cifar10_cpu_run(r):
    last = r["epochs"][-1]
    return [
        f"`{r['command']}`",
        "",
        "| epochs | wall time | peak memory | test accuracy (soft kNC) | test accuracy (nearest center) | agreement |",
        "|---|---|---|---|---|---|",
        f"| {int(last['epoch']) + 1} | {r['wall_seconds'] / 60:.1f} min | {r['peak_rss_mib'] / 1024:.2f} GiB | "
        f"{100 * r['clean_accuracy']:.2f}% | {100 * r['nearest_center_accuracy']:.2f}% | "
        f"{100 * r['agreement']:.1f}% |",
        "",
        f"Data: {r['data']}.",
    ]


def attack_throughput(r):
    return [
        f"{r['attack']} on {r['backbone']}, batch {r['batch']}, {r['device']['cpus']} CPU cores: "
        f"**{r['images_per_s']:.2f} images/s** ({r['reference']}).",
    ]


def robustness(r):
    """A table of robust accuracy by eps and attack, the certificate and the checks."""
    by_eps = {}
    for a in r["attacks"]:
        if a["norm"] == "inf" and a.get("scope", "all") == "all":
            by_eps.setdefault(f"{a['eps'] * 255:g}/255", {})[a["loss"]] = a["accuracy"]
    losses = ["official", "logits", "margin", "square"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        f"`{r['command']}` on {r['num_examples']} {r['dataset']} test images "
        f"(soft kNC with L = {r['neighbours']}; {r['wall_seconds'] / 60:.1f} min on {r['machine']['cpus']} CPU cores):",
        "",
        f"Clean accuracy {pct(r['clean_accuracy'])} (nearest center {pct(r['nearest_center_accuracy'])}).",
        "",
        "| l_inf eps | official | logits | margin | Square | worst case |",
        "|---|---|---|---|---|---|",
    ]
    for key, worst in r["robust_accuracy"].items():
        row = by_eps.get(key, {})
        lines.append(f"| {key} | " + " | ".join(pct(row.get(k)) for k in losses) + f" | **{pct(worst)}** |")
    for key, worst in r.get("robust_accuracy_l2", {}).items():
        lines.append(f"| l2 {key} | | | | | **{pct(worst)}** |")
    cert = ", ".join(f"{pct(v)} at {k}" for k, v in r["certified_accuracy"].items())
    lines += [
        "",
        f"Certified accuracy (l2, nearest center; Lipschitz bound {r['lipschitz_bound']:.3g}, median radius "
        f"{r['median_certified_radius']:.2g}): {cert}.",
        "",
        "| masking check | outcome | detail |",
        "|---|---|---|",
    ]
    for name, check in r["masking_checks"].items():
        # A check whose attacks were not asked for says "not run" (update_readme loads no TensorFlow,
        # so this reads the detail rather than importing evaluation.check_outcome).
        outcome = ("passed" if check["passed"] else "not run" if check["detail"].startswith("not run")
                   else "**FAILED**")
        detail = re.sub(r"\d+\.\d{5,}", lambda m: f"{float(m.group()):.4f}", check["detail"])
        lines.append(f"| {name} | {outcome} | {detail.replace('|', '/')} |")
    return lines


def serving_latency(r):
    lat, thr, dev, t = r["latency_batch_1"], r["throughput"], r["device"], r["target"]
    rows = [
        f"| `{name}` | {lat[name + '_ms']['median']:.1f} ms / {lat[name + '_ms']['p90']:.1f} ms | "
        f"{lat[name + '_cpu_ms']['median']:.1f} ms | {thr[name + '_images_per_s']:.0f} images/s | "
        f"{thr[name + '_images_per_cpu_s']:.0f} |"
        for name in ("serving_default", "certify", "embed")
    ]
    return [
        f"{r['model']}; {r['loaded_with']}; {dev['cpu']} with {dev['cpus']} cores, TF {dev['tensorflow']} "
        f"({r.get('date', '')}):",
        "",
        f"| signature | latency at batch 1, wall (median / p90) | CPU time per call (median) | "
        f"throughput at batch {thr['batch']}, wall | images per CPU-second |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"`certify` / `serving_default` latency at batch 1: **{lat['certify_over_serving_default']:.2f}x** "
        f"(CPU time: {lat['certify_over_serving_default_cpu']:.2f}x; target <= "
        f"{t['certify_over_serving_default_max']}: {'met' if t['met'] else '**not met**'}).",
        *(["", r["note"]] if r.get("note") else []),
    ]


def reproduce(r):
    """The comparison table from reproduce.json (CIFAR-10) or reproduce_digits.json."""
    order = ("cross_entropy", "clustr", "clustr_from_ce", "clustr_qtrades", "clustr_qtrades_kl", "pgd_at")
    names = {"cross_entropy": "cross-entropy", "clustr": "ClusTR", "clustr_from_ce": "ClusTR",
             "clustr_qtrades": "**ClusTR+QTRADES, the paper's term**", "clustr_qtrades_kl":
             "ClusTR+QTRADES, KL term (not the paper's)", "pgd_at": "PGD-AT (Madry)"}
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    st = r["settings"]
    backbone = f"ResNet-18 x{st['width_multiplier']}" if st.get("width_multiplier") else "the small ConvNet"
    budget = st.get("budget") or f"{st.get('cpu_budget_minutes_per_method', 'n/a')} CPU minutes of training per method"
    lines = [
        f"{r.get('dataset', 'cifar10')}: {backbone}; budget: {budget}; {st['optimizer']}, batch {st['batch_size']}; "
        f"{st['num_examples']} test images; {r['data']}.",
        "",
        "| method | from | measured | training CPU-min | steps of 240 | clean | worst case 2/255 | 8/255 | 16/255 "
        "| 25.5/255 | official loss 8/255 | Square 8/255 | certified (l2 0.1) | masking checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    machines, approximate = {}, False
    for key in order:
        m = r["methods"].get(key)
        if m is None:
            lines.append(f"| {names[key]} | not run yet | | | | | | | | | | | | |")
            continue
        steps = " + ".join("n/a" if s.get("steps") is None else str(s["steps"]) for s in m["train"])
        cpu = [s.get("train_cpu_seconds") for s in m["train"]]
        cpu = "n/a" if None in cpu else " + ".join(f"{c / 60:.0f}" if c >= 600 else f"{c / 60:.2g}" for c in cpu)
        failed = [k for k, v in m["masking_checks"].items() if not v]
        checks = "all passed" if not failed else "failed: " + ", ".join(failed)
        ra = m["robust_accuracy"]
        measured = m.get("measured", {})
        date = measured.get("date", r.get("date", "n/a"))
        machine = measured.get("machine", r.get("machine", {}))
        machines[date] = machine.get("cpu_model") or machine.get("processor") or "n/a"
        official = pct(m["official_loss_8_255"])
        if m.get("official_loss_exact") is False:
            official, approximate = official + " (†)", True
        lines.append(
            f"| {names[key]} | {m.get('start', 'scratch')} | {date} | {cpu} | {steps} | {pct(m['clean_accuracy'])} | "
            f"{pct(ra.get('2/255'))} | **{pct(m['robust_accuracy_8_255'])}** | {pct(ra.get('16/255'))} | "
            f"{pct(ra.get('25.5/255'))} | "
            f"{official} | {pct(m.get('per_loss', {}).get('8/255 square'))} | "
            f"{pct(m['certified_accuracy'].get('0.1'))} | {checks} |"
        )
    if machines:
        lines += ["", "Measured on: " + "; ".join(f"{d}, {machines[d]}" for d in sorted(machines)) + "."]
    if approximate:
        lines += ["(†) evaluated before `official` became the official loss exactly: cross-entropy on softmax(p), "
                  "not on the raw scores S."]
    return lines


def consistency_forms(r):
    """Clean accuracy after fine-tuning with each form of the consistency term."""
    pct = lambda values: ", ".join(f"{100 * v:.1f}%" for v in values)  # noqa: E731
    seeds = ", ".join(str(x["seed"]) for x in r["runs"]["official"])
    return [
        f"`{r['command']}` ({r['date']}): ClusTR on digits for {r['start_epochs']} epochs, "
        f"{100 * r['start']['clean_accuracy']:.1f}% clean, then {r['epochs']} epochs of ClusTR+QTRADES (lambda 8, "
        f"Adam 1e-4), seeds {seeds}:",
        "",
        "| consistency term | clean accuracy after |",
        "|---|---|",
        f"| `--consistency=official` (the paper's, bounded) | {pct(r['clean_accuracy']['official'])} |",
        f"| `--consistency=kl` (TRADES-style KL, unbounded) | {pct(r['clean_accuracy']['kl'])} |",
    ]


BLOCKS = {
    "attack-throughput-results": ("attack_throughput.json", attack_throughput),
    "default-run-results": ("default_run.json", default_run),
    "train-throughput-results": ("train_throughput.json", train_throughput),
    "precision-results": ("train_throughput.json", precision_speed),
    "certified-results": ("certified.json", certified),
    "cifar10-cpu-run-results": ("cifar10_cpu_run.json", cifar10_cpu_run),
    "serving-latency-results": ("serving_latency.json", serving_latency),
    "serving-latency-lipschitz-results": ("serving_latency_lipschitz.json", serving_latency),
    "robustness-digits-results": ("robustness_digits.json", robustness),
    "robustness-cifar10-results": ("robustness_cifar10.json", robustness),
    "reproduce-results": ("reproduce.json", reproduce),
    "reproduce-digits-results": ("reproduce_digits.json", reproduce),
    "consistency-forms-results": ("consistency_forms.json", consistency_forms),
}


# The flag references: each binary's flags, read from its own `define_flags` (in a fresh
# process, where absl's global flags are empty), rendered as a table. training/main.py's are
# generated from the fields of `clustr_tf.config` (`clustr_tf.config_flags`), in their order.
BINARIES = {
    "flags-main": "training/main.py",
    "flags-evaluate": "training/evaluate.py",
    "flags-export": "export/export_model.py",
}
_FLAGS_PROGRAM = """
import json, os, sys
root, path = sys.argv[1], sys.argv[2]
sys.path[:0] = [root, os.path.join(root, os.path.dirname(path))]
name = os.path.splitext(os.path.basename(path))[0]
module = __import__(name)
module.define_flags()
from absl import flags
rows = [[f.name, f.default, f.help, f.flag_type()] for f in flags.FLAGS.flags_by_module_dict()[name]]
print(json.dumps(rows))
"""


@functools.lru_cache(maxsize=None)
def binary_flags(path):
    """[(name, default, help, type)] of the flags a binary defines, in definition order."""
    # The binaries define their flags before TensorFlow loads (clustr_tf/cli.py): no TensorFlow here.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CLUSTR_TF_DEFER_IMPORTS": "1"}
    out = subprocess.run([sys.executable, "-c", _FLAGS_PROGRAM, ROOT, path], capture_output=True, text=True,
                         env=env, check=True, timeout=300)
    return tuple(tuple(row) for row in json.loads(out.stdout.strip().splitlines()[-1]))


def flag_table(path):
    def shown(default, kind):
        if kind == "bool":
            return "on" if default else "off"
        return "none" if default is None else f"`{default}`"

    lines = [f"`python {path}`, generated from its flag definitions by `benchmarks/update_readme.py`:", "",
             "| flag | default | meaning |", "|---|---|---|"]
    for name, default, help_text, kind in binary_flags(path):
        flag = f"--[no]{name}" if kind == "bool" else f"--{name}"
        lines.append(f"| `{flag}` | {shown(default, kind)} | {' '.join(help_text.split()).replace('|', '/')} |")
    return lines


def render(text):
    """`text` with every results block and flag table it has rewritten."""
    blocks = [(marker, lambda name=name, fn=fn: (lambda r: None if r is None else fn(r))(_load(name)))
              for marker, (name, fn) in BLOCKS.items()]
    blocks += [(marker, lambda path=path: flag_table(path)) for marker, path in BINARIES.items()]
    for marker, make in blocks:
        start_tag, end_tag = f"<!-- {marker} -->", f"<!-- end {marker} -->"
        if start_tag not in text:
            continue
        lines = make()
        if lines is None:  # no result file: the block stays as it is
            continue
        start = text.index(start_tag)
        end = text.index(end_tag, start) + len(end_tag) if end_tag in text[start:] else start + len(start_tag)
        text = text[:start] + "\n".join([start_tag, *lines, end_tag]) + text[end:]
    return text


def documents():
    """README.md and docs/*.md: the files that hold results blocks and flag tables."""
    docs = os.path.join(ROOT, "docs")
    names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
    return [os.path.join(ROOT, "README.md")] + [os.path.join(docs, n) for n in names]


def main():
    updated = []
    for path in documents():
        with open(path) as fh:
            text = fh.read()
        rendered = render(text)
        if rendered != text:
            with open(path, "w") as fh:
                fh.write(rendered)
            updated.append(os.path.relpath(path, ROOT))
    print(json.dumps({"updated": updated}))


if __name__ == "__main__":
    main()
