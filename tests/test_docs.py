"""README.md and docs/ cannot rot silently: every file and command they name exists, every tool
they name answers ``--help`` and knows the flags they give it, Python snippets import, and every
internal link (anchors included) resolves; train_net.py commands load their configs."""

import ast
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PACKAGE_ROOT = REPO_ROOT / "projects" / "SALTNet"
# Repository paths the docs name, by their first component (``saltnet/`` is the package's).
_PATH = re.compile(
    r"(?<![\w/.-])((?:configs|tools|demo|scripts|tests|benchmarks|docs|saltnet)/[\w./{},*-]*"
    r"|train_net\.py|DEVELOPERS\.md|Makefile)"
)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_TEST_NAME = re.compile(r"`(test_\w+)`")
_HEX = re.compile(r"`[0-9a-f]{7,40}`")


def _code_blocks(text):
    """(language, body) of each fenced code block."""
    return _FENCE.findall(text)


def _prose(text):
    return _FENCE.sub("", text)


def _expand_braces(path):
    """``a/b.{yaml,py}`` -> ``a/b.yaml``, ``a/b.py``."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [p for part in match.group(1).split(",") for p in _expand_braces(head + part + tail)]


def missing_paths(text):
    """Repository paths named in ``text`` that do not exist (globs must match something)."""
    missing = []
    for raw in _PATH.findall(text):
        for path in _expand_braces(raw.rstrip(".,:;")):
            base = PACKAGE_ROOT if path.startswith("saltnet/") else REPO_ROOT
            if not glob.glob(str(base / path)):
                missing.append(path)
    return missing


def commands(text):
    """The shell commands of the code blocks, continuation lines joined, as token lists."""
    found = []
    for language, body in _code_blocks(text):
        if language not in ("", "bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                found.append(tokens)
    return found


def python_invocations(text):
    """(script or ``-m module``, flags given to it) of every ``python ...`` command."""
    calls = []
    for tokens in commands(text):
        while tokens and re.fullmatch(r"\w+=\S*", tokens[0]):  # VAR=value prefixes
            tokens = tokens[1:]
        if not tokens or os.path.basename(tokens[0]) not in ("python", "python3"):
            continue
        if tokens[1] == "-m":
            calls.append((f"-m {tokens[2]}", []))
            continue
        args = tokens[2:]
        if "--opts" in args:
            args = args[: args.index("--opts") + 1]
        calls.append((tokens[1], sorted({a.split("=")[0] for a in args if a.startswith("--")})))
    return calls


def _slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    for heading in re.findall(r"^#+ (.*)$", _prose(path.read_text()), re.M):
        slug = _slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def broken_links(path):
    """Internal links of the markdown file ``path`` whose file or anchor does not exist."""
    broken = []
    for target in _LINK.findall(_prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    return broken


def _all_text():
    return {doc.relative_to(REPO_ROOT).as_posix(): doc.read_text() for doc in DOCS}


def test_named_files_exist():
    missing = {name: missing_paths(text) for name, text in _all_text().items()}
    assert not {name: m for name, m in missing.items() if m}


def test_internal_links_and_anchors_resolve():
    broken = {doc.name: broken_links(doc) for doc in DOCS}
    assert not {name: b for name, b in broken.items() if b}


def test_named_tests_exist():
    tests = "".join(p.read_text() for p in (REPO_ROOT / "tests").glob("*.py"))
    named = {n for text in _all_text().values() for n in _TEST_NAME.findall(text)}
    assert named and not {n for n in named if f"def {n}(" not in tests}


def test_make_targets_exist():
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = {t[1] for text in _all_text().values() for t in commands(text) if t[0] == "make"}
    named |= {t for text in _all_text().values() for t in re.findall(r"`make ([\w-]+)", text)}
    assert {"demo", "test", "setup"} <= named and named <= targets


def test_python_snippets_import():
    for text in _all_text().values():
        for language, body in _code_blocks(text):
            if language != "python":
                continue
            for node in ast.walk(ast.parse(body)):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    assert all(hasattr(module, a.name) for a in node.names), ast.unparse(node)


def test_train_commands_load_their_configs():
    """Every ``train_net.py`` command of the docs: its config with its overrides loads (YAML keys,
    types and LazyConfig keys checked as train_net.py checks them)."""
    from detectron2.config import LazyConfig
    from detectron2.engine import default_argument_parser

    from saltnet.config.defaults import load_yaml_config
    from saltnet.config.lazy_overrides import check_lazy_overrides

    loaded = 0
    for text in _all_text().values():
        for tokens in commands(text):
            if "train_net.py" not in tokens:
                continue
            start = tokens.index("train_net.py") + 1
            args, _ = default_argument_parser().parse_known_args(tokens[start:])
            config_file = str(REPO_ROOT / args.config_file)
            if config_file.endswith(".py"):
                cfg = LazyConfig.load(config_file)
                check_lazy_overrides(cfg, args.opts)
                LazyConfig.apply_overrides(cfg, args.opts)
            else:
                load_yaml_config(config_file, args.opts)
            loaded += 1
    assert loaded >= 10


def test_readme_is_a_first_screen():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert not _HEX.findall(readme), "commit hashes belong in docs/BENCHMARKS.md"
    assert "arxiv.org/abs/2108.12176" in readme and "@inproceedings" in readme


# Runs each script given with --help in one process (torch and detectron2 imported once):
# {script: [exit code, stdout]}.
_HELP_ALL = """
import contextlib, io, json, runpy, sys
answers = {}
for script in sys.argv[1:]:
    sys.argv, out, code = [script, "--help"], io.StringIO(), "returned without exiting"
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except Exception as e:
        code = repr(e)
    answers[script] = [code, out.getvalue()]
print(json.dumps(answers))
"""


def help_texts(scripts):
    """{script: its --help output}; fails naming the scripts that do not answer."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _HELP_ALL, *scripts],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.splitlines()[-1])
    failed = {s: code for s, (code, out) in answers.items() if code != 0 or "usage:" not in out}
    assert not failed
    return {s: out for s, (_, out) in answers.items()}


@pytest.mark.slow
def test_named_tools_answer_help_and_know_their_flags():
    calls = [c for text in _all_text().values() for c in python_invocations(text)]
    named_tools = {
        p
        for text in _all_text().values()
        for p in _PATH.findall(text)
        if re.fullmatch(r"(tools|demo)/[\w/]+\.py|train_net\.py", p)
    }
    scripts = {s for s, _ in calls if not s.startswith("-m")} | named_tools
    for module in {s[3:] for s, _ in calls if s.startswith("-m")}:
        assert importlib.util.find_spec(module) is not None, module
    assert {"train_net.py", "demo/demo.py", "tools/convert_mmdet_checkpoint.py"} <= scripts
    helps = help_texts(sorted(scripts))
    unknown = {
        (script, flag)
        for script, flags in calls
        if script in helps
        for flag in flags
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[script])
    }
    assert not unknown


def test_checks_catch_rot(tmp_path):
    doc = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A `title`: here\n")
    doc.write_text(
        "# Page\n[ok](other.md#a-title-here) [anchor](other.md#gone) [file](nowhere.md)\n"
        "[self](#page) [web](https://example.com)\n"
        "```bash\nVAR=1 python tools/nope.py --flag x \\\n  --other=1 # comment\n"
        "python -m saltnet.utils.collect_env\n```\n"
        "`configs/quick_schedule/salt_R_18_synthetic.{yaml,txt}`\n"
    )
    assert broken_links(doc) == ["other.md#gone", "nowhere.md"]
    text = doc.read_text()
    missing = ["tools/nope.py", "configs/quick_schedule/salt_R_18_synthetic.txt"]
    assert missing_paths(text) == missing
    assert python_invocations(text) == [
        ("tools/nope.py", ["--flag", "--other"]),
        ("-m saltnet.utils.collect_env", []),
    ]
