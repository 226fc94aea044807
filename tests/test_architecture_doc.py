"""docs/ARCHITECTURE.md stays true: every file it names in backticks exists, every `selfsup.module:Name` it names
imports, and its list of layers is the one tests/test_layers.py enforces."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

from test_layers import LAYERS

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"

SPAN = re.compile(r"`([^`]+)`")
PATH = re.compile(r"(src/selfsup|tests|benchmarks|docs)(/[\w.<>-]+)*/?|README\.md")
SYMBOL = re.compile(r"(selfsup(?:\.\w+)*):(\w+(?:\.\w+)*)")
LAYER_LINE = re.compile(r"^\d+\. \*\*(.+?)\*\*: (.+?) \u2014 ", re.M)


def spans(text: str) -> list[str]:
    return SPAN.findall(text)


def paths(text: str) -> list[str]:
    return [s for s in spans(text) if PATH.fullmatch(s)]


def missing_paths(text: str) -> list[str]:
    """The paths that do not exist; one with a placeholder (`methods/<name>.py`) needs only its folder."""
    bad = []
    for p in paths(text):
        target = REPO / p
        if "<" in p:
            target = REPO / p.split("<")[0].rpartition("/")[0]
        if not target.exists():
            bad.append(p)
    return bad


def symbols(text: str) -> list[tuple[str, str]]:
    return [m.groups() for m in map(SYMBOL.fullmatch, spans(text)) if m]


def missing_symbols(text: str) -> list[str]:
    bad = []
    for module, attrs in symbols(text):
        try:
            obj = importlib.import_module(module)
            for a in attrs.split("."):
                obj = getattr(obj, a)
        except (ImportError, AttributeError) as e:
            bad.append(f"{module}:{attrs} ({e})")
    return bad


def layers(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The numbered list of the section 'The layers': (name, modules) per line, lowest first."""
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    return tuple((name, tuple(spans(modules))) for name, modules in LAYER_LINE.findall(section))


def test_every_file_the_document_names_exists():
    text = DOC.read_text()
    assert len(paths(text)) >= 20  # the parsing still finds them
    assert missing_paths(text) == [], "docs/ARCHITECTURE.md names files that do not exist (renamed or removed?)"


def test_every_symbol_the_document_names_imports():
    text = DOC.read_text()
    assert len(symbols(text)) >= 50
    assert missing_symbols(text) == [], "docs/ARCHITECTURE.md names symbols that do not exist"


def test_the_layers_are_those_tests_test_layers_enforces():
    assert layers(DOC.read_text()) == LAYERS


def test_the_checks_report_what_is_wrong():
    text = ("`src/selfsup/methods/simclr.py` `src/selfsup/nope.py` `tests/<x>/a.py` `src/selfsup/methods/<name>.py` "
            "`selfsup.nn:backbone_from_config` `selfsup.nn:no_such` `selfsup.no_such:x` `selfsup.nn.resnet:ResNet.nope` "
            "`--json` `metrics.jsonl` `data.source`")
    assert paths(text) == ["src/selfsup/methods/simclr.py", "src/selfsup/nope.py", "tests/<x>/a.py",
                           "src/selfsup/methods/<name>.py"]
    assert missing_paths(text) == ["src/selfsup/nope.py"]
    assert [s.split(" ")[0] for s in missing_symbols(text)] == [
        "selfsup.nn:no_such", "selfsup.no_such:x", "selfsup.nn.resnet:ResNet.nope"]
    doc = "## The layers\n\n1. **core**: `selfsup.core` \u2014 x\n2. **cli**: `selfsup.cli`, `selfsup` \u2014 y\n## Next"
    assert layers(doc) == (("core", ("selfsup.core",)), ("cli", ("selfsup.cli", "selfsup")))
