"""The README's first screen serves a newcomer, and every relative link in README.md and docs/*.md resolves.

GitHub renders these files, so anchors follow GitHub's heading slugs: lower case, punctuation other than ``-`` and
``_`` dropped, spaces turned into ``-``, a repeated heading suffixed ``-1``, ``-2``, ...
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
FIRST_SCREEN = 60
README_MAX_LINES = 120

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside fenced code blocks, lines inside them); fence lines themselves in neither."""
    prose: list[str] = []
    fenced: list[str] = []
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
        else:
            (fenced if in_code else prose).append(line)
    return prose, fenced


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings in code are not rendered)."""
    return split_fences(text)[0]


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    return [
        target
        for line in prose_lines(page.read_text())
        for target in LINK.findall(line)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_slug_follows_github():
    assert slug("Optuna search (`search: optuna`)") == "optuna-search-search-optuna"
    assert slug("Book-keeping engine (`speed.grad_sample_mode: bk`)") == "book-keeping-engine-speedgrad_sample_mode-bk"
    assert slug("The guarantee (for a privacy officer)") == "the-guarantee-for-a-privacy-officer"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= README_MAX_LINES


def test_first_screen_says_what_how_what_comes_out_and_where_next():
    screen = "\n".join(README.read_text().splitlines()[:FIRST_SCREEN])
    what = ["DP-SGD", "Ray Tune", "Opacus", "MLflow", "chest X-ray"]
    commands = ["make sweep", "make test", "make ui", "make report"]
    outputs = ["runs/mlflow.db", "runs/<sweep>/trials.parquet", "runs/<sweep>/epochs.parquet", "report/index.html"]
    guarantee = ["(epsilon, delta)", "tuning epsilon"]
    missing = [text for text in what + commands + outputs + guarantee if text not in screen]
    assert not missing, f"not in the README's first {FIRST_SCREEN} lines: {missing}"
    linked = {target.partition("#")[0] for target in LINK.findall(screen)}
    unlinked = [page.name for page in DOCS if f"docs/{page.name}" not in linked]
    assert not unlinked, f"docs pages not linked from the README's first screen: {unlinked}"


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))


def dpsweep_commands() -> set[str]:
    cli = (ROOT / "sweeps" / "cli.py").read_text()
    return set(re.findall(r'commands\.add_parser\(\s*"([a-z-]+)"', cli))


def code(text: str) -> list[str]:
    """What a reader would type: fenced code lines and inline code spans."""
    prose, fenced = split_fences(text)
    return fenced + re.findall(r"`([^`\n]+)`", "\n".join(prose))


def test_named_make_targets_and_dpsweep_commands_exist():
    targets, commands = make_targets(), dpsweep_commands()
    assert {"sweep", "test", "report", "ui"} <= targets
    assert {"sweep", "table", "report", "ui", "prepare", "audit", "pretrain"} <= commands
    unknown = []
    for page in PAGES:
        for snippet in code(page.read_text()):
            named_targets = re.findall(r"\bmake ([a-z][a-z-]*)", snippet)
            named_commands = re.findall(r"\bdpsweep ([a-z]+)", snippet)
            unknown += [f"{page.name}: make {t}" for t in named_targets if t not in targets]
            unknown += [f"{page.name}: dpsweep {c}" for c in named_commands if c not in commands]
    assert not unknown, unknown


def module_map() -> str:
    """docs/design.md's "Module map" section."""
    text = (ROOT / "docs" / "design.md").read_text()
    return text.split("## Module map", 1)[1].split("\n## ", 1)[0]


def test_the_module_map_names_every_module():
    """Every module of sweeps/ and trainables/ (and each analysis/ and trainables/data, evaluate sub-package as a
    row) is in docs/design.md's module map, so a newcomer finds each one's job."""
    table = module_map()
    named = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        folder = ""
        for item in re.findall(r"`([\w/.]+)`", row.split(" | ")[0]):
            path = item.removesuffix(".py")
            if "/" in path:
                folder = path.rsplit("/", 1)[0]
            named.add(path if "/" in path else f"{folder}/{path}")
    modules = [
        path.relative_to(ROOT).with_suffix("").as_posix()
        for folder in ("sweeps", "trainables", "trainables/privacy")
        for path in sorted((ROOT / folder).glob("*.py"))
        if not path.name.startswith("_")
    ]
    missing = [m for m in modules if m not in named]
    assert not missing, f"modules missing from docs/design.md's module map: {missing}"
    for package in ("trainables/data/", "trainables/evaluate/", "analysis/"):
        assert f"`{package}`" in table, package
