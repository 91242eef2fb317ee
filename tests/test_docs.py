"""Every snippet and command in README.md and docs/*.md runs as written (issue 17), so the docs cannot drift.

The files are read at test time and every fenced block is handled by its language, so new sections are covered
without touching this file:

* ```python -- run, each in a fresh working directory that mirrors the repository (relative paths such as
  ``recipes/configs/...`` resolve, outputs stay out of the checkout), all in one subprocess (_docs_runner.py);
* ```python after ``<!-- docs-test: schema MODULE -->`` -- a schema excerpt: every class in it must match the
  class of that name in MODULE (dataclasses: the same fields, and the same defaults where the doc gives one;
  other classes: every member the doc names exists);
* ```bash -- ``bash -n`` syntax, then per command: ``make T`` (T a Makefile target, ``make -n`` resolves it,
  CONFIG/ACCEL files exist, and the recipe command it expands to is checked as below; ``make help`` runs);
  recipe launches (``accelerate launch`` / ``python recipes/X.py``: launch config, script and ``--config`` file
  exist, overrides load against the recipe's config class, ``--help`` runs; a tiny single-process run of at most
  2 steps really runs, without DeepSpeed's no-GPU warning); other ``python`` scripts and ``pisces-rl``
  subcommands (``--help`` works and lists every ``--flag`` used); any other program: syntax only;
* ```yaml -- parses; a mapping of run-config sections loads as a ``GRPOConfig``.

A block preceded by ``<!-- docs-test: skip (REASON) -->`` is not run; use it only for a GPU, a hub download, the
full ShapesWorld build or a multi-minute run, and say so to the reader in the block or the text around it.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->$")
FENCE = re.compile(r"^ {0,3}```\s*([\w+-]*)")
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith("ACCELERATE_")
       and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(  # absolute: other folders
    str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p))
PROGRAMS = {"python": [sys.executable], "python3": [sys.executable],
            "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"],
            "pisces-rl": [sys.executable, "-m", "pisces_rl.cli"]}
MAX_RUN_STEPS = 2                       # a documented tiny run of at most this many steps is really run


@dataclass
class Block:
    doc: Path
    line: int                            # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[tuple[str, str]]    # ("skip", "(needs a GPU)"), ("schema", "pisces_rl.config"), or None

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def read_blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            end = next((j for j in range(i + 1, len(lines)) if re.match(r"^ {0,3}```\s*$", lines[j])), None)
            assert end is not None, f"{doc.name}:{i + 1}: code fence never closed"
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            mark = MARKER.match(before)
            found.append(Block(doc, i + 1, m.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                               (mark.group(1), mark.group(2)) if mark else None))
            i = end + 1
    return found


BLOCKS = read_blocks()


def of(lang: str, kind: Optional[str] = None) -> list[Block]:
    return [b for b in BLOCKS if b.lang == lang and (b.marker[0] if b.marker else None) == kind]


def ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


def repo_mirror(path: Path) -> Path:
    """A working directory that looks like the repository (top-level entries symlinked; no runs/ or outputs/)."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", "outputs", ".git") and not (path / entry.name).exists():
            (path / entry.name).symlink_to(entry)
    return path


def test_markers_are_known_and_give_their_reason():
    for b in BLOCKS:
        if b.marker is None:
            continue
        kind, arg = b.marker
        assert kind in ("skip", "schema"), f"{b.id}: unknown docs-test marker {kind!r} (use skip or schema)"
        if kind == "skip":
            assert re.fullmatch(r"\(.+\)", arg), f"{b.id}: write the reason, <!-- docs-test: skip (needs a GPU) -->"
        else:
            assert b.lang == "python" and importlib.import_module(arg), f"{b.id}: schema needs a module"
    assert of("python") and of("bash"), "no runnable blocks found: did the fence syntax change?"


# ------------------------------------------------------------------------------------------------ python
@pytest.fixture(scope="module")
def python_results(tmp_path_factory) -> dict[str, dict]:
    """Every runnable Python block, run once in one subprocess (each in its own mirrored working directory)."""
    root = tmp_path_factory.mktemp("docs_python")
    payload = [{"id": b.id, "code": b.code, "cwd": str(repo_mirror(root / f"block{i}"))}
               for i, b in enumerate(of("python"))]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_docs_runner.py")], input=json.dumps(payload),
                          capture_output=True, text=True, env=ENV, cwd=root, timeout=400)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("@@docs-test@@ "):
            result = json.loads(line.split(" ", 1)[1])
            results[result["id"]] = result
    assert results or proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return results


@pytest.mark.parametrize("block", of("python"), ids=ids(of("python")))
def test_python_block_runs(block, python_results):
    result = python_results.get(block.id)
    assert result is not None, f"{block.id} did not run (the runner died before it)"
    assert result["ok"], f"{block.id} failed:\n{result['error']}"


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("block", of("python", "schema"), ids=ids(of("python", "schema")))
def test_schema_block_matches_the_code(block):
    module = importlib.import_module(block.marker[1])
    classes = [n for n in ast.parse(block.code).body if isinstance(n, ast.ClassDef)]
    assert classes, f"{block.id}: a schema block without classes"
    for node in classes:
        real = getattr(module, node.name, None)
        assert real is not None, f"{block.id}: {block.marker[1]} has no class {node.name}"
        documented = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                documented[stmt.target.id] = stmt.value
            elif isinstance(stmt, ast.FunctionDef):
                documented[stmt.name] = None
        if not dataclasses.is_dataclass(real):
            missing = [n for n in documented if not hasattr(real, n) and n not in getattr(real, "__annotations__", {})]
            assert not missing, f"{block.id}: {node.name} has no {missing}"
            continue
        fields = {f.name: f for f in dataclasses.fields(real) if f.init}
        assert set(documented) == set(fields), (
            f"{block.id}: {node.name} fields differ from the code: only in the doc "
            f"{sorted(set(documented) - set(fields))}, only in the code {sorted(set(fields) - set(documented))}")
        for name, expr in documented.items():
            if expr is None:
                continue
            try:
                doc_default = ast.literal_eval(expr)
            except ValueError:
                continue                        # not a literal (e.g. a section): the field's presence is checked
            assert _plain(doc_default) == _plain(_default(fields[name])), (
                f"{block.id}: {node.name}.{name} defaults to {_default(fields[name])!r} in the code, the doc says "
                f"{doc_default!r}")


# -------------------------------------------------------------------------------------------------- bash
def split_commands(code: str) -> list[list[str]]:
    """Commands of a bash block: continuation lines joined, comments dropped, split at && || ; |."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.MULTILINE))


def run(cmd: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a not in ("--help", "--")]


def check_help(where: str, cmd: list[str], used: list[str], cwd: Path) -> None:
    proc = run([*cmd, "--help"], cwd)
    assert proc.returncode == 0, f"{where}: `{' '.join(cmd)} --help` failed:\n{proc.stderr[-2000:]}"
    for flag in flags_in(used):
        assert flag in proc.stdout, f"{where}: {flag} is not an option of `{' '.join(cmd)}`"


def config_class(recipe: Path):
    from pisces_rl import config

    name = re.search(r"parse_cli\((\w+)", recipe.read_text())
    assert name, f"{recipe} does not call parse_cli(<ConfigClass>, ...)"
    return getattr(config, name.group(1))


def check_recipe(where: str, command: list[str], launcher: list[str], args: list[str], processes: int,
                 cwd: Path) -> None:
    """A recipe launch: files exist, the config and overrides load; a tiny one-process run of <= 2 steps runs."""
    from pisces_rl.config import ConfigError, load_config

    script = next((a for a in args if a.endswith(".py")), None)
    assert script and (ROOT / script).is_file(), f"{where}: recipe script {script!r} not found"
    rest = args[args.index(script) + 1:]
    if "--help" in rest or "-h" in rest:
        proc = run([*launcher, *args], ROOT)
        assert proc.returncode == 0 and "train.max_steps" in proc.stdout, f"{where}: --help failed: {proc.stderr}"
        return
    config, overrides = None, []
    i = 0
    while i < len(rest):
        if rest[i] == "--config":
            config, i = rest[i + 1], i + 2
            continue
        assert "=" in rest[i], f"{where}: unexpected recipe argument {rest[i]!r}"
        overrides.append(rest[i])
        i += 1
    assert config is None or (ROOT / config).is_file(), f"{where}: --config {config} not found"
    try:
        cfg = load_config(config_class(ROOT / script), ROOT / config if config else None, overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: `{' '.join(command)}` has a bad config: {exc}")
    cheap = (cfg.model.pretrained == "tiny" and str(cfg.rewards.encoder).startswith("tiny") and processes == 1
             and cfg.train.max_steps <= MAX_RUN_STEPS and not os.path.isabs(cfg.output_dir))
    if cheap:
        proc = run([*PROGRAMS[command[0]], *command[1:]], repo_mirror(cwd), timeout=300)
        assert proc.returncode == 0, f"{where}: `{' '.join(command)}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
        assert (cwd / cfg.output_dir / "summary.json").is_file(), f"{where}: the run wrote no summary.json"
        assert "unable to detect" not in proc.stdout + proc.stderr, f"{where}: DeepSpeed's no-GPU warning is back"


def check_command(where: str, command: list[str], cwd: Path) -> None:
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
        command = command[1:]                                     # leading environment assignments
    if not command:
        return
    program, args = command[0], command[1:]
    if program == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        unknown = [t for t in targets if t not in makefile_targets()]
        assert not unknown, f"{where}: no Makefile target {unknown} (targets: {sorted(makefile_targets())})"
        variables = dict(a.split("=", 1) for a in args if "=" in a)
        for var in ("CONFIG", "ACCEL", "RECIPE"):
            assert var not in variables or (ROOT / variables[var]).is_file(), \
                f"{where}: {var}={variables[var]} not found"
        if targets == ["help"]:
            assert run(["make", "help"], ROOT).returncode == 0
            return
        dry = run(["make", "-n", *args], ROOT)
        assert dry.returncode == 0, f"{where}: `make -n {' '.join(args)}` failed:\n{dry.stderr[-2000:]}"
        for line in dry.stdout.splitlines():
            if " launch " in line and ".py" in line:                # the recipe the target runs
                tokens = shlex.split(line)
                tokens = tokens[tokens.index("launch") + 1:]
                check_command(f"{where} (make {' '.join(targets)})", ["accelerate", "launch", *tokens], cwd / "make")
        return
    if program == "accelerate":
        assert args and args[0] == "launch", f"{where}: only `accelerate launch` is checked"
        i, processes, config_file = 1, 1, None
        while i < len(args) and args[i].startswith("--"):
            if args[i] in ("--config_file", "--num_processes"):
                config_file, i = (args[i + 1], i) if args[i] == "--config_file" else (config_file, i)
                processes = int(args[i + 1]) if args[i] == "--num_processes" else processes
                i += 2
            else:
                i += 1
        assert config_file and (ROOT / config_file).is_file(), f"{where}: --config_file {config_file} not found"
        if "--num_processes" not in args:
            processes = int(yaml.safe_load((ROOT / config_file).read_text()).get("num_processes", 1))
        check_recipe(where, command, PROGRAMS["accelerate"] + ["launch", "--config_file", str(ROOT / config_file)],
                     args[i:], processes, cwd)
        return
    if program in ("python", "python3") and args and args[0].startswith("recipes/"):
        check_recipe(where, command, [sys.executable], args, 1, cwd)
        return
    if program in ("python", "python3") and args:
        script = args[0]
        if script == "-m":
            check_help(where, [sys.executable, "-m", args[1]], args[2:], ROOT)
            return
        assert (ROOT / script).is_file(), f"{where}: {script} not found"
        check_help(where, [sys.executable, str(ROOT / script)], args[1:], ROOT)
        return
    if program == "pisces-rl":
        subcommands = []
        for a in args:
            if a.startswith("-"):
                break
            subcommands.append(a)
        check_help(where, [*PROGRAMS["pisces-rl"], *subcommands], args[len(subcommands):], ROOT)
    # any other program (pip, hf, tensorboard, ...): its syntax was checked with the block


@pytest.mark.parametrize("block", of("bash"), ids=ids(of("bash")))
def test_bash_block_commands_exist_and_the_cheap_ones_run(block, tmp_path):
    syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.id}: bash syntax error: {syntax.stderr}"
    commands = split_commands(block.code)
    assert commands, f"{block.id}: an empty bash block"
    for n, command in enumerate(commands):
        check_command(f"{block.id} command {n + 1}", command, tmp_path / f"cmd{n}")


# -------------------------------------------------------------------------------------------------- yaml
@pytest.mark.parametrize("block", of("yaml"), ids=ids(of("yaml")))
def test_yaml_block_parses_and_run_config_sections_load(block, tmp_path):
    from pisces_rl.config import GRPOConfig, load_config

    data = yaml.safe_load(block.code)
    sections = {f.name for f in dataclasses.fields(GRPOConfig)}
    if isinstance(data, dict) and data and set(data) <= sections:
        path = tmp_path / "config.yaml"
        path.write_text(block.code)
        load_config(GRPOConfig, path)


# ----------------------------------------------------------------------------------------------- CLI help
def test_fit_ot_map_help_explains_every_option_once():
    """Issue 17: `pisces-rl fit-ot-map --help` repeated defaults ('(default: cuda if available) (default: None)')
    and left options without a word of help."""
    from pisces_rl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "fit-ot-map" in a.choices)
    fit = sub.choices["fit-ot-map"]
    for action in fit._actions:
        if action.dest == "help":
            continue
        text = action.help or ""
        assert len(text) > 15, f"{action.option_strings}: no explanation"
        assert text.replace("%(default)s", "").count("default") <= 1, f"{action.option_strings}: default twice"
    rendered = fit.format_help()
    assert "(default: None)" not in rendered and "(default: False)" not in rendered


def test_the_command_checks_catch_what_drifts(tmp_path):
    """The checks above fail on a renamed target, a bad override, a missing config and an unknown flag."""
    launch = "accelerate launch --config_file recipes/accelerate/single.yaml recipes/grpo_short_video.py --config"
    broken = ["make train-gpro", f"{launch} recipes/configs/grpo_tiny_cpu.yaml train.max_step=2",
              f"{launch} recipes/configs/grpo_gone.yaml", "pisces-rl fit-ot-map --dataset d --output o --no-such-flag",
              "python benchmarks/no_such_script.py"]
    for text in broken:
        (command,) = split_commands(text)
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command("test", command, tmp_path)
    assert split_commands("make world && make train-grpo ARGS='a=1 b=2'  # both\nx \\\n  --y") == [
        ["make", "world"], ["make", "train-grpo", "ARGS=a=1 b=2"], ["x", "--y"]]
