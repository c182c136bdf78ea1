"""Faust's and aiokafka's private state is read through ``app/faust_patches.py`` only: no other
module of the service touches a private attribute (``x._name``) whose name is one of Faust's,
aiokafka's or mode's, unless it is the project's own object (listed below)."""

from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).parents[1]


@lru_cache(maxsize=1)
def library_private_names() -> frozenset[str]:
    """Every ``_name`` Faust, aiokafka and mode define or use as an attribute."""
    names: set[str] = set()
    for package in ("faust", "aiokafka", "mode"):
        for path in Path(importlib.import_module(package).__file__).parent.rglob("*.py"):
            text = path.read_text(errors="replace")
            names.update(re.findall(r"\.(_[a-z]\w*)", text))
            names.update(re.findall(r"def (_[a-z]\w*)", text))
    return frozenset(names)

#: Private access to the project's own objects (not Faust's or aiokafka's), and public API whose
#: name starts with an underscore.
OWN = {
    "app/sinks/kafka_clickhouse.py": {"self.sink._on_revoked", "self.sink._on_assigned", "sink._task"},
    "app/models.py": {"ApprovedSignal._symbol"},
    "tables/reconcile.py": {"b._replace"},  # a namedtuple's public method
}


def test_no_private_faust_or_aiokafka_access_outside_faust_patches():
    found = []
    for folder in ("app", "agents", "tables"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "app/faust_patches.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                for m in re.finditer(r"([\w.]*\w)\.(_[a-z]\w*)", code):
                    ref = m.group(0)
                    if (ref.startswith(("self._", "cls._", "os._exit")) or ref in OWN.get(rel, ())
                            or m.group(2) not in library_private_names()):
                        continue
                    found.append(f"{rel}:{n}: {ref}")
                for m in re.finditer(r"getattr\((?!self\b|cls\b)[^,]+,\s*[\"'](_[a-z]\w*)", code):
                    if m.group(1) in library_private_names():
                        found.append(f"{rel}:{n}: {m.group(0)}")
    assert not found, "private access outside app/faust_patches.py (add a function there): " + "; ".join(found)
