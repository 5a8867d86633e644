"""The Grafana dashboard (infra/grafana/costopt-serving.json) queries only metrics the servers export."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import serving.gateway.rollout  # noqa: F401  (each module registers its metrics on import)
import serving.gateway.routing  # noqa: F401
import serving.gateway.server  # noqa: F401
import serving.metrics  # noqa: F401

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "costopt-serving.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


def exported() -> set[str]:
    """Every sample name the process's registry can expose (a labeled family with no child yet too)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("costopt_"):
            names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def test_every_panel_queries_an_exported_metric():
    dash = json.loads(DASHBOARD.read_text())
    names = exported()
    assert "costopt_requests_total" in names and "costopt_gateway_canary_active" in names, sorted(names)[:20]
    queried = set()
    for panel in dash["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            found = set(re.findall(r"\bcostopt_[a-z0-9_]+", target["expr"]))
            assert found, f"panel {panel['title']!r}: {target['expr']!r} names no costopt metric"
            missing = found - names
            assert not missing, f"panel {panel['title']!r} queries {sorted(missing)}, which no server exports"
            queried |= found
    assert len(queried) >= 15, f"the dashboard covers few metrics: {sorted(queried)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
