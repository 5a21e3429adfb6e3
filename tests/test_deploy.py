"""deploy/docker-compose.yml, the scale-out topology of docs/deploy.md, holds together: no Docker runs here
(it is checked as the file Compose would read, not run), so what a typo would break is checked instead:
three members of one replica set, an init that names those three, two instances that wait for it and
list every member in their MONGODB_URI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "docker-compose.yml"


def services() -> dict[str, Any]:
    found = yaml.safe_load(COMPOSE.read_text())["services"]
    assert isinstance(found, dict)
    return found


def test_the_compose_file_runs_a_replica_set_of_three_and_two_instances_on_it() -> None:
    s = services()
    members = sorted(name for name, svc in s.items() if "--replSet" in (svc.get("command") or []))
    assert members == ["mongo1", "mongo2", "mongo3"]
    sets = {s[m]["command"][s[m]["command"].index("--replSet") + 1] for m in members}
    assert sets == {"rs0"}
    assert len({tuple(v) for m in members for v in s[m]["volumes"]}) == 3  # a data volume each
    script = s["mongo-init"]["entrypoint"][-1]
    assert sorted(re.findall(r'host: "(mongo\d):27017"', script)) == members
    assert {m: c["condition"] for m, c in s["mongo-init"]["depends_on"].items()} == dict.fromkeys(
        members, "service_healthy"
    )
    instances = sorted(name for name, svc in s.items() if "MONGODB_URI" in svc.get("environment", {}))
    assert instances == ["rulesvc-a", "rulesvc-b"]
    for name in instances:
        uri = s[name]["environment"]["MONGODB_URI"]
        hosts = re.fullmatch(r"mongodb://([^/]+)/\?replicaSet=(\w+)", uri)
        assert hosts is not None, uri
        assert sorted(h.split(":")[0] for h in hosts.group(1).split(",")) == members
        assert hosts.group(2) == "rs0"
        assert s[name]["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"
        assert (COMPOSE.parent / s[name]["build"] / "Dockerfile").is_file()
    ports = [p.split(":")[-2] for name in instances for p in s[name]["ports"]]
    assert len(set(ports)) == 2  # each instance on a port of its own
