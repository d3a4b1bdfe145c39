"""The documentation holds: every relative link of README.md and docs/ resolves inside the
repository, nothing points at files outside it, and every command README.md shows exists
with the flags it uses."""

import os
import re
import sys

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import update_readme  # noqa: E402

# The documents a user reads, and every other Markdown file of the repository.
def _documents():
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "bazel-")) and d not in ("runs", "__pycache__")]
        found += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".md")]
    return sorted(found)


DOCUMENTS = _documents()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?:^|\s|`)(?:\.venv/bin/)?python (\S+\.py)((?:[ \t]+(?:\\\n[ \t]*)?[^\s`#|]+)*)", re.M)
CONSOLE = {"clustr-train": "training/main.py", "clustr-evaluate": "training/evaluate.py",
           "clustr-export": "export/export_model.py", "clustr-client": "export/client.py"}


def _read(path):
    with open(os.path.join(ROOT, path)) as fh:
        return fh.read()


def _flags_of(script):
    """The flag names a script accepts: a binary's own (from its flag definitions), else the
    names its source declares (argparse's "--name" or absl's DEFINE_*("name"))."""
    if script in update_readme.BINARIES.values():
        return {row[0] for row in update_readme.binary_flags(script)}
    source = _read(script)
    return set(re.findall(r"[\"']--([\w-]+)", source)) | set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)", source))


class DocsTest(absltest.TestCase):
    def test_found_the_documents(self):
        for path in ("README.md", "docs/training.md", "docs/serving.md", "export/README.md"):
            self.assertIn(path, DOCUMENTS)

    def test_relative_links_resolve_inside_the_repository(self):
        broken = []
        for path in DOCUMENTS:
            for target in LINK.findall(_read(path)):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL or an anchor of the same page
                resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target.split("#")[0]))
                if not resolved.startswith(ROOT + os.sep) or not os.path.exists(resolved):
                    broken.append(f"{path}: {target}")
        self.assertEqual(broken, [])

    def test_nothing_points_outside_the_repository(self):
        outside = [f"{path}: {m.group(0)}" for path in DOCUMENTS
                   for m in re.finditer(r"\.\./(shared|DESIGN\.md|STYLE\.md)\S*", _read(path))]
        self.assertEqual(outside, [])

    def test_readme_commands_exist_with_their_flags(self):
        text = _read("README.md")
        for name, script in CONSOLE.items():
            text = re.sub(rf"(?<![\w-]){name} ", f"python {script} ", text)
        commands = COMMAND.findall(text)
        self.assertGreater(len(commands), 5)
        problems = []
        for script, arguments in commands:
            if not os.path.isfile(os.path.join(ROOT, script)):
                problems.append(f"no {script}")
                continue
            known = _flags_of(script)
            for flag in re.findall(r"--(?:\[no\])?([\w-]+)", arguments):
                base = flag[2:] if flag.startswith("no") and flag[2:] in known else flag
                if base not in known and base not in ("help", "helpfull"):
                    problems.append(f"{script} has no --{flag}")
        self.assertEqual(problems, [])


if __name__ == "__main__":
    absltest.main()
