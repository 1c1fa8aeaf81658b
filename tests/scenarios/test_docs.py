"""The README and the guides in docs/ say only what the code does: every command parses, every option exists,
every link resolves, and nothing in them describes how the package was developed.

- ``python -m bengali_empathy fit|validate|test|predict ...`` lines of ```bash blocks run in this process with
  ``--print_config`` appended (LightningCLI parses and validates them, then prints instead of running);
- the other commands' lines: every ``--option`` (and ``-m``) they use appears in that command's ``--help``;
- ```python blocks compile (docs/architecture.md's are also executed by test_extensions.py);
- relative Markdown links point at existing files and, with ``#anchor``, at an existing heading;
- every dotted option in backticks (``model.lora.r``, ``data.encoding.on_too_long``) is an option of
  ``fit --config configs/default.yaml --print_config`` (or a parse-time link target), so a renamed option fails here.
"""
import functools
import re
import shlex

import pytest
import yaml

from conftest import ROOT, run_cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LIGHTNING = {"fit", "validate", "test", "predict"}
EXTRA = {"chat", "serve", "export", "report", "runs", "rate", "data-stats", "benchmark"}
# Set by the CLI from other options (cli.py link_arguments): real keys that --print_config leaves out.
LINKED = {"data.tokenizer_path", "data.objective", "model.max_seq_length", "model.train_batch_size",
          "model.system_prompt"}
# How the package's development was described; none of it belongs in what a user reads.
DEVELOPMENT_WORDS = [r"\blease", r"\bsession", r"this branch", r"\bcarried\b", r"since-removed",
                     r"call's time limit", r"gpu_session", r"code of now"]


def text(path) -> str:
    return path.read_text(encoding="utf-8")


def blocks(lang: str):
    """(file name, block text) of every fenced block of ``lang`` in the docs."""
    for path in DOCS:
        for block in re.findall(r"^```" + lang + r"\n(.*?)^```", text(path), re.S | re.M):
            yield path.relative_to(ROOT).as_posix(), block


def commands() -> list[tuple[str, tuple[str, ...]]]:
    """(file, argv) of every ``python -m bengali_empathy`` (or ``torchrun ... -m bengali_empathy``) line."""
    out = []
    for name, block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|\s)-m bengali_empathy (.*)$", line)
            if m:
                out.append((name, tuple(shlex.split(m.group(1), comments=True))))
    return out


COMMANDS = commands()


@functools.lru_cache(maxsize=None)
def parse(argv: tuple[str, ...]):
    return run_cli([*argv, "--print_config"], ROOT)


@functools.lru_cache(maxsize=None)
def help_text(command: str) -> str:
    result = run_cli([command, "--help"], ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.lru_cache(maxsize=None)
def default_options() -> set[str]:
    result = parse(("fit", "--config", "configs/default.yaml"))
    assert result.returncode == 0, result.stderr
    keys: set[str] = set()

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                keys.add(prefix + str(key))
                walk(value, f"{prefix}{key}.")

    walk(yaml.safe_load(result.stdout))
    return keys


def test_the_docs_have_commands_of_every_kind():
    used = {argv[0] for _, argv in COMMANDS}
    assert LIGHTNING | EXTRA <= used, f"commands never shown: {(LIGHTNING | EXTRA) - used}"


@pytest.mark.parametrize("name,argv", [c for c in COMMANDS if c[1][0] in LIGHTNING],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_lightning_command_parses(name, argv):
    result = parse(argv)
    assert result.returncode == 0, f"{name}: {' '.join(argv)}\n{result.stderr[-2000:]}"
    assert "model:" in result.stdout


@pytest.mark.parametrize("name,argv", [c for c in COMMANDS if c[1][0] not in LIGHTNING],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_other_command_uses_only_its_options(name, argv):
    assert argv[0] in EXTRA, f"{name}: unknown command {argv[0]!r}"
    shown = help_text(argv[0])
    for arg in argv[1:]:
        option = arg.split("=", 1)[0]
        if re.fullmatch(r"--?[A-Za-z][\w.-]*", option):
            assert re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", shown), \
                f"{name}: {argv[0]} has no option {option}"


def test_python_blocks_compile():
    found = list(blocks("python"))
    assert found
    for name, block in found:
        compile(block, name, "exec")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    heading = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def test_relative_links_resolve():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", text(path)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: link to missing {target}"
            if anchor and linked.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", text(linked), re.M)}
                assert anchor in anchors, f"{path.name}: no heading #{anchor} in {file or path.name}"


def test_every_dotted_option_named_in_the_docs_exists():
    from bengali_empathy.cli import MOVED_OPTIONS

    known = default_options() | LINKED
    for path in DOCS:
        content = text(path)
        for option in re.findall(r"`((?:model|data|trainer|registry)\.[A-Za-z_][\w.]*)", content):
            option = option.rstrip(".")
            if option in MOVED_OPTIONS:  # an old name, shown beside its new place
                assert f"`{MOVED_OPTIONS[option]}`" in content, f"{path.name}: `{option}` without its new name"
                continue
            assert option in known, f"{path.name}: `{option}` is not an option of fit --print_config"


def test_readme_is_short_and_has_the_ci_command():
    readme = text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 200
    ci = re.search(r"^apt-get update .*$", text(ROOT / ".ci" / "run"), re.M).group(0)
    assert ci in readme.splitlines()
    assert "pip install torch==2.13.0 && pip install -e . && python -m bengali_empathy fit --config " \
           "configs/default.yaml" in readme


def test_architecture_lists_every_module():
    table = text(ROOT / "docs" / "architecture.md")
    package = ROOT / "bengali_empathy"
    for module in sorted(package.rglob("*.py")):
        if module.name in ("__init__.py", "__main__.py"):
            continue
        name = module.relative_to(package).with_suffix("").as_posix()
        assert f"`{name}`" in table, f"docs/architecture.md does not list {name}"


@pytest.mark.parametrize("path", DOCS + sorted((ROOT / "docs").glob("*.json*")), ids=lambda p: p.name)
def test_nothing_describes_how_it_was_developed(path):
    content = text(path)
    for word in DEVELOPMENT_WORDS:
        found = re.search(word, content, re.I)
        assert not found, f"{path.name}: {content[max(0, found.start() - 60):found.end() + 60]!r}"
