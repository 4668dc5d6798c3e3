"""Import rules between the parts of the tree (issue #18 item 3, "Services side by side"), read from the source
with `ast` (no import is executed, no dependency needed):

1. A service imports only itself and shared/: no module of services/<a>/ imports services/<b>/ (nor mpctl/).
   What two services need alike lives in shared/.
2. A pure module (every services/*/domain.py, and the other modules in PURE) imports none of the adapters'
   libraries: aiokafka, redis, ccxt, prometheus_client. Those belong to the bootstraps and adapters.
3. shared/ never imports services/ (nor mpctl/). shared/kafka.py and others may use aiokafka and the like.

mpctl/, tests/ and scripts/ may import anything. Every import statement counts, wherever it stands (in a
function, under `if TYPE_CHECKING:`); relative imports are resolved against the module's package. A failure
names the file, the line and the import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADAPTER_LIBRARIES = frozenset({"aiokafka", "redis", "ccxt", "prometheus_client"})
# Pure modules besides every services/*/domain.py: each must exist (a rename must not drop a rule silently).
PURE = (
    "services/arbiter/routing.py",
    "services/execution/routing.py",
    "services/registry/routing.py",
    "services/strategy/routing.py",
    "services/strategy/signals.py",
    "services/strategy/indicators.py",
    "services/strategy/trust.py",
    "services/ingest/live_domain.py",
    "services/execution/reconcile.py",
    "services/execution/ports.py",
    "services/execution/errors.py",
    "services/registry/errors.py",
    "services/registry/memory.py",
    "services/registry/ports.py",
    "shared/aligner.py",
    "shared/book.py",
    "shared/clock.py",
    "shared/orders.py",
)


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the absolute module imported (`from a.b import c` gives "a.b" and "a.b.c")
    text: str  # the statement as written

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None, root: Path = ROOT) -> Iterator[Import]:
    """Every module the file imports, as absolute names; `source` replaces the file's text (tests of the rules)."""
    text = path.read_text() if source is None else source
    tree = ast.parse(text, filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name, ast.unparse(node))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            yield Import(path, node.lineno, mod, ast.unparse(node))
            for alias in node.names:  # `from services import arbiter` imports services.arbiter
                if alias.name != "*":
                    yield Import(path, node.lineno, f"{mod}.{alias.name}", ast.unparse(node))


def _top(module: str, n: int = 1) -> tuple[str, ...]:
    return tuple(module.split(".")[:n])


def violations(path: Path, source: str | None = None, root: Path = ROOT) -> list[str]:
    """The rules this file breaks, one line each: file:line: import -- rule."""
    rel = path.relative_to(root)
    out: list[str] = []
    pure = (len(rel.parts) == 3 and rel.parts[0] == "services" and rel.name == "domain.py") or (
        rel.as_posix() in PURE
    )
    for imp in imports_of(path, source, root):
        where = f"{rel.as_posix()}:{imp.line}: {imp.text}"
        target = imp.module.split(".")
        if rel.parts[0] == "services" and len(rel.parts) >= 3:
            own = rel.parts[1]
            if target[0] == "services" and len(target) >= 2 and target[1] != own:
                out.append(f"{where} -- services/{own}/ imports services/{target[1]}/ (share it via shared/)")
            if target[0] == "mpctl":
                out.append(f"{where} -- services/{own}/ imports mpctl/")
        if rel.parts[0] == "shared" and target[0] in ("services", "mpctl"):
            out.append(f"{where} -- shared/ imports {target[0]}/")
        if pure and target[0] in ADAPTER_LIBRARIES:
            out.append(f"{where} -- pure module imports {target[0]}")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1]), s))


def checked_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for d in ("services", "shared") for p in (root / d).rglob("*.py"))


def test_the_tree_keeps_the_import_rules() -> None:
    files = checked_files()
    assert len(files) > 50, "the scan found too few modules: is ROOT right?"
    broken = [v for p in files for v in violations(p)]
    assert not broken, "import rules broken (tests/unit/test_import_rules.py):\n" + "\n".join(broken)


def test_every_named_pure_module_exists() -> None:
    missing = [p for p in PURE if not (ROOT / p).is_file()]
    assert not missing, f"PURE names modules that do not exist: {missing}"


# ------------------------------------------------------------------------------------------ the rules can fail
@pytest.mark.parametrize(
    ("file", "source", "expected"),
    [
        (
            "services/arbiter/domain.py",
            "x = 1\nfrom services.execution.domain import desync_delay_ms\n",
            "services/arbiter/domain.py:2: from services.execution.domain import desync_delay_ms -- "
            "services/arbiter/ imports services/execution/ (share it via shared/)",
        ),
        (
            "services/execution/live_wiring.py",
            "def f():\n    from services import monitor\n",
            "services/execution/live_wiring.py:2: from services import monitor -- "
            "services/execution/ imports services/monitor/ (share it via shared/)",
        ),
        (
            "services/execution/live_wiring.py",
            "import services.monitor.collect as c\n",
            "services/execution/live_wiring.py:1: import services.monitor.collect as c -- "
            "services/execution/ imports services/monitor/ (share it via shared/)",
        ),
        (
            "services/registry/handlers.py",
            "from ..strategy import domain\n",
            "services/registry/handlers.py:1: from ..strategy import domain -- "
            "services/registry/ imports services/strategy/ (share it via shared/)",
        ),
        (
            "services/strategy/domain.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import redis.asyncio\n",
            "services/strategy/domain.py:3: import redis.asyncio -- pure module imports redis",
        ),
        (
            "services/strategy/signals.py",
            "from prometheus_client import Counter\n",
            "services/strategy/signals.py:1: from prometheus_client import Counter -- "
            "pure module imports prometheus_client",
        ),
        (
            "services/execution/domain.py",
            "import ccxt.async_support as ccxt_async\n",
            "services/execution/domain.py:1: import ccxt.async_support as ccxt_async -- pure module imports ccxt",
        ),
        (
            "services/ingest/domain.py",
            "from aiokafka import TopicPartition\n",
            "services/ingest/domain.py:1: from aiokafka import TopicPartition -- pure module imports aiokafka",
        ),
        (
            "shared/kafka.py",
            "from services.monitor.collect import write_outputs\n",
            "shared/kafka.py:1: from services.monitor.collect import write_outputs -- shared/ imports services/",
        ),
    ],
)
def test_a_planted_violation_is_named_with_file_line_and_import(
    file: str, source: str, expected: str
) -> None:
    assert violations(ROOT / file, source) == [expected]


@pytest.mark.parametrize(
    ("file", "source"),
    [
        (
            "services/arbiter/bootstrap.py",
            "from services.arbiter import domain\nfrom shared.orders import x\n",
        ),
        ("services/arbiter/domain.py", "from . import metrics\nfrom .domain import y\n"),
        (
            "services/monitor/bootstrap.py",
            "from aiokafka import AIOKafkaConsumer\nimport prometheus_client\n",
        ),
        ("shared/kafka.py", "from aiokafka import AIOKafkaProducer\n"),
    ],
)
def test_what_the_rules_allow(file: str, source: str) -> None:
    assert violations(ROOT / file, source) == []
