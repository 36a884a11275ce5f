"""`dagster dev -w workspace.yaml` (and `dg dev`) on loopback serves the asset graph and its checks over GraphQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from curation_platform_dagster.definitions import build_definitions
from curation_platform_dagster.defs.resources import PlatformResource
from tests.helpers.processes import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
QUERY = """{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }"""
# Runs the daemon would launch are queued and never started: the test only looks at the graph.
INSTANCE_YAML = """run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 0
telemetry:
  enabled: false
"""


def _query(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": QUERY}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("command", ["dagster", "dg"])
def test_dev_server_lists_assets_and_checks(tmp_path: Path, command: str) -> None:
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML)
    port = free_port()
    recipes = tmp_path / "home" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "kl.toml").write_text('name = "kl-top"\n[[stage]]\ntype = "top_fraction"\nscore = "kl_text"\n'
                                     'fraction = 0.25\n')
    env = os.environ | {"DAGSTER_HOME": str(dagster_home), "CURATION_HOME": str(tmp_path / "home"),
                        "DAGSTER_DISABLE_TELEMETRY": "1"}
    expected = build_definitions({}, {"platform": PlatformResource(home_uri=str(tmp_path / "home"))})
    executable = Path(sys.executable).with_name(command)
    log = (tmp_path / "dagster-dev.log").open("wb")
    process = subprocess.Popen([str(executable), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answer = _query(port)
                if answer.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(2)
        assert answer and answer.get("data"), (tmp_path / "dagster-dev.log").read_text()[-3000:]
    finally:
        stop_process_group(process, ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 10)))
        log.close()
    nodes = answer["data"]["assetNodes"]
    served = {"/".join(node["assetKey"]["path"]) for node in nodes}
    assert served == {key.to_user_string() for key in expected.resolve_all_asset_keys()}
    assert "release_kl_top" in served
    checks = {check["name"] for node in nodes for check in node["assetChecksOrError"].get("checks", [])}
    assert checks == {key.name for key in expected.resolve_asset_graph().asset_check_keys}
    assert process.returncode is not None
