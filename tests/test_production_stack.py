"""The production profile end to end on one machine: PostgreSQL run storage, SeaweedFS S3 for every
artefact and for compute logs, `dagster-daemon` launching queued runs as subprocesses.

The shard sensor ingests the pool, automation embeds and scores every shard, the CLI bootstraps the
global artefacts and cuts a release; a run worker killed mid-shard is failed by run monitoring and
its retry leaves exactly one embedding per accepted sample.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from curation_platform import lance_tables
from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.releases import list_releases, verify_release
from curation_platform.storage import S3Settings
from tests.helpers.processes import free_port, stop_process_group
from tests.helpers.s3 import S3_BUCKET, upload_directory
from tests.helpers.teachers import tiny_teacher_dir

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parents[1]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
BIN = Path(sys.executable).parent
RECIPE = 'name = "prod-top-half"\ndescription = "production stack test"\n\n' \
         '[[stage]]\ntype = "top_fraction"\nscore = "clip_score"\nfraction = 0.5\n'
RELEASE_ASSET = "release_prod_top_half"
# how long the daemon's per-shard runs may take: generous, so a loaded machine is slow rather than failed
# (the test's own timeout bounds the whole)
SHARD_STEPS_S = 900
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})


def _run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(command[:6])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


# --------------------------------------------------------------------------------------------- PostgreSQL


@contextmanager
def postgres() -> Iterator[dict[str, str]]:
    """PostgreSQL 15 on 127.0.0.1 (free port), sockets in its data dir; a database and a password user."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 server binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    as_root = os.geteuid() == 0
    runner = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="curation-pg-", dir="/tmp"))
    data = base / "data"
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
    os.chmod(base, 0o700)
    port = free_port()
    credentials = {"DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "dagster",
                   "DAGSTER_PG_PASSWORD": uuid.uuid4().hex, "DAGSTER_PG_DB": "dagster"}
    log = base / "postgres.log"
    started = False
    try:
        _run([*runner, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
              "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"], timeout=120)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off"
        _run([*runner, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
              "start"], timeout=90)
        started = True
        admin = [*runner, str(PG_BIN / "psql"), "-h", str(base), "-p", str(port), "-U", "postgres",
                 "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c"]
        _run([*admin, f"CREATE ROLE dagster LOGIN PASSWORD '{credentials['DAGSTER_PG_PASSWORD']}'"])
        _run([*admin, "CREATE DATABASE dagster OWNER dagster"])
        yield credentials
    finally:
        if started:
            pid_file = data / "postmaster.pid"
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
            subprocess.run([*runner, str(PG_BIN / "pg_ctl"), "-D", str(data), "stop", "-m", "fast", "-w", "-t", "30"],
                           check=False, capture_output=True, timeout=60)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def _psql(credentials: dict[str, str], sql: str) -> str:
    env = os.environ | {"PGPASSWORD": credentials["DAGSTER_PG_PASSWORD"]}
    return _run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", credentials["DAGSTER_PG_PORT"], "-U",
                 credentials["DAGSTER_PG_USER"], "-d", credentials["DAGSTER_PG_DB"], "-tA", "-c", sql],
                env=env).stdout.strip()


# --------------------------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by parent pid, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait(condition: Callable[[], object], timeout: float, what: str, diagnose: Callable[[], str] = str,
          interval: float = 2.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


# --------------------------------------------------------------------------------------------- the test


@pytest.mark.timeout(1500)  # ~12 min on an idle 2-core VM: the daemon, Postgres, S3 and 15 runs, one at a time
def test_production_stack(tmp_path: Path, s3_server: S3Settings, demo_pool_dir: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    started, wall = time.monotonic(), time.time()
    prefix = f"prodstack-{uuid.uuid4().hex[:8]}"
    bucket = f"s3://{S3_BUCKET}/{prefix}"
    upload_directory(s3_server, demo_pool_dir / "pool", f"{prefix}/pool")
    upload_directory(s3_server, demo_pool_dir / "target", f"{prefix}/target")
    upload_directory(s3_server, tiny_teacher_dir(tmp_path / "teacher"), f"{prefix}/teacher")
    settings = {"scoring": {"reference_size": 100, "neg_clip_batch_size": 64, "neg_clip_repeats": 2},
                "teacher": {"gate": "warn"}}  # random weights: the gate warns (test_teacher_gate covers blocking)
    with s3_server.pyarrow_filesystem().open_output_stream(f"{S3_BUCKET}/{prefix}/home/curation.json") as stream:
        stream.write(json.dumps(settings).encode())
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "prod.toml").write_text(RECIPE)
    shards = discover_shards(str(demo_pool_dir / "pool"))
    accepted = {shard.partition_key: set(ingest_shard(shard).accepted.column("uid").to_pylist()) for shard in shards}
    names = {shard.partition_key: shard.name for shard in shards}
    assert len(accepted) == 2 and all(accepted.values())

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "infra" / "dagster.local-prod.yaml", dagster_home / "dagster.yaml")
    compute_log_prefix = f"{prefix}/compute-logs"

    with postgres() as credentials:
        profile = credentials | {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_COMPUTE_LOG_BUCKET": S3_BUCKET,
            "DAGSTER_COMPUTE_LOG_PREFIX": compute_log_prefix,
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
            "AWS_REGION": s3_server.region,
            "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key,
            "CURATION_HOME": f"{bucket}/home",
            "CURATION_POOL": f"{bucket}/pool",
            "CURATION_LANCEDB": f"{bucket}/lancedb",
            "CURATION_TEACHER": f"{bucket}/teacher",
            "CURATION_TARGET": f"{bucket}/target",
            "CURATION_DEVICE": "cpu",
            "CURATION_RECIPES": str(recipes),
            "GX_ANALYTICS_ENABLED": "false",
        }
        inherited = {key: value for key, value in os.environ.items()
                     if not key.startswith(("AWS_", "CURATION_", "DAGSTER_"))}
        scratch = tmp_path / "process-tmp"  # what the daemon, runs and killed workers leave behind stays here
        scratch.mkdir()
        env = inherited | profile | {"TMPDIR": str(scratch)}
        for key, value in profile.items():
            monkeypatch.setenv(key, value)
        for key in [key for key in os.environ if key.startswith("AWS_") and key not in profile]:
            monkeypatch.delenv(key)

        def cli(*args: str, timeout: float = 240) -> None:
            """A `dagster` command in its own process group; what it leaves (its code server) is killed."""
            process = subprocess.Popen([str(BIN / "dagster"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                output, _ = process.communicate(timeout=timeout)
            finally:
                stop_process_group(process, ((signal.SIGTERM, 5), (signal.SIGKILL, 10)))
            assert process.returncode == 0, f"dagster {' '.join(args[:4])} failed:\n{output[-6000:]}"

        # The gpu pool limit, set explicitly as infra/README.md prescribes (default_limit alone races).
        cli("instance", "concurrency", "set", "gpu", "1", timeout=60)
        daemon_log = (tmp_path / "daemon.log").open("wb")
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                                  stdout=daemon_log, stderr=subprocess.STDOUT, start_new_session=True)
        seen: set[int] = set()

        def daemon_tail() -> str:
            return (tmp_path / "daemon.log").read_text(errors="replace")[-6000:]

        try:
            import dagster as dg

            instance = dg.DagsterInstance.get()
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"

            # The teacher once, from the CLI, recorded in the same Postgres instance (in this process:
            # the daemon's runs below use the default multiprocess executor).
            cli("asset", "materialize", "-m", "curation_platform_dagster.definitions", "--select", "teacher", "--config-json", IN_PROCESS)
            print(f"teacher after {time.monotonic() - started:.0f} s")

            def materialized(asset: str, keys: list[str]) -> bool:
                seen.update(_descendants(daemon.pid))
                assert daemon.poll() is None, daemon_tail()
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=keys), limit=100).records
                return {record.partition_key for record in records} >= set(keys)

            def run_summary() -> str:
                return timeline() + "\n" + daemon_tail()

            def timeline() -> str:
                lines = []
                for record in reversed(instance.get_run_records(limit=40)):
                    run = record.dagster_run
                    lines.append(f"{run.run_id[:8]} {run.job_name[:24]:24} {run.tags.get('dagster/partition')} "
                                 f"{','.join(key.to_user_string() for key in run.asset_selection or [])} "
                                 f"created {record.create_timestamp.timestamp() - wall:.0f} "
                                 f"start {(record.start_time or wall) - wall:.0f} end {(record.end_time or wall) - wall:.0f}"
                                 f" {run.status.value}")
                return "\n".join(lines)

            def idle() -> bool:
                seen.update(_descendants(daemon.pid))
                return not instance.get_runs(filters=dg.RunsFilter(statuses=[
                    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]))

            keys = sorted(accepted)
            # The sensor adds one partition per shard and queues ingestion; automation embeds each shard.
            # generous: the gpu pool runs the shards one after another, behind ingestion and the daemon's ticks
            # (a clean-clone CI once needed ~260 s on 2 cores); the assertions below do not depend on it
            _wait(lambda: materialized("embeddings", keys), SHARD_STEPS_S, "embeddings of every shard", run_summary)
            _wait(idle, 90, "the embeddings runs (and their checks) to finish", run_summary)
            print(f"embedded after {time.monotonic() - started:.0f} s\n{timeline()}")
            gpu_runs = sorted((record.start_time, record.end_time) for record in instance.get_run_records()
                              if dg.AssetKey("embeddings") in (record.dagster_run.asset_selection or set()))
            assert len(gpu_runs) == len(keys) and all(start is not None and end is not None for start, end in gpu_runs)
            assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(gpu_runs)), \
                f"embedding runs overlapped although the gpu pool allows one:\n{timeline()}"

            # A run worker killed mid-shard (SIGKILL to the run worker and its step process, launched by the
            # daemon): the run is marked failed (the code server sees its worker die; the max-runtime tag makes
            # run monitoring fail it otherwise), nothing was committed, and the retry commits the shard once.
            lance = lance_tables.connect(profile["CURATION_LANCEDB"], s3_server)
            victim = keys[0]
            before = lance.open_table("embeddings").version
            killed_run = str(uuid.uuid4())
            tags = json.dumps({"dagster/partition": victim, "dagster/max_runtime": "30"})
            cli("job", "launch", "-w", "workspace.yaml", "-j", "shard_pipeline", "-o", "embeddings", "--tags", tags,
                "--run-id", killed_run)

            def step_started() -> bool:
                seen.update(_descendants(daemon.pid))
                return bool(instance.all_logs(killed_run, of_type=dg.DagsterEventType.STEP_START))

            _wait(step_started, 120, "the embeddings step to start", run_summary, interval=0.2)
            # The run worker and its step process, by the pids their events recorded.
            workers = {entry.dagster_event.pid for entry in instance.all_logs(killed_run)
                       if entry.dagster_event and entry.dagster_event.pid}
            assert workers and all(pid in _descendants(daemon.pid) for pid in workers), workers
            _kill_all(sorted(workers))
            status = instance.get_run_by_id(killed_run).status
            assert status == dg.DagsterRunStatus.STARTED, status
            _wait(lambda: instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE, 60,
                  "the killed run to be marked failed", run_summary)
            print(f"killed run marked failed after {time.monotonic() - started:.0f} s;"
                  f" table version {before} -> {lance.open_table('embeddings').version}")
            failure = instance.all_logs(killed_run, of_type=dg.DagsterEventType.RUN_FAILURE)
            print("killed run:", [entry.message for entry in failure])
            # The retry runs the asset with its blocking check: automation scores the shard only once the
            # check passed on the new materialisation (an op-selected `-o embeddings` retry would block it).
            cli("asset", "materialize", "-m", "curation_platform_dagster.definitions", "--select", "embeddings", "--partition", victim)
            retry_run = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": victim}), limit=1)[0]
            assert retry_run.run_id != killed_run and retry_run.status == dg.DagsterRunStatus.SUCCESS
            assert materialized("embeddings", [victim])
            _wait(idle, 60, "runs to finish", run_summary)

            # The global artefacts, bootstrapped once (on_missing does not fire for what was missing at start).
            cli("asset", "materialize", "-m", "curation_platform_dagster.definitions", "--select", "reference_sample,normsim_target",
                "--config-json", IN_PROCESS)
            _wait(lambda: materialized("shard_scores", keys), SHARD_STEPS_S, "scores of every shard", run_summary)
            _wait(idle, 120, "the scoring runs (and their checks) to finish", run_summary)
            print(f"scored after {time.monotonic() - started:.0f} s")
            # The release passes: the plan, per shard the candidates and selections, the cuts between them.
            for selection, partitions in (("score_statistics,release_plan", [None]), ("release_candidates", keys),
                                          ("release_cuts", [None]), ("release_selections", keys),
                                          (RELEASE_ASSET, [None])):
                for partition in partitions:
                    cli("asset", "materialize", "-m", "curation_platform_dagster.definitions", "--select", selection,
                        *(["--partition", partition] if partition else []), "--config-json", IN_PROCESS)
            _wait(idle, 90, "in-flight runs to finish", run_summary)
            seen.update(_descendants(daemon.pid))
            final = timeline()

            # Run history lives in Postgres.
            runs = instance.get_runs()
            assert int(_psql(credentials, "SELECT count(*) FROM runs")) == len(runs) > 0
            statuses = {run.run_id: run.status for run in runs}
            assert statuses[killed_run] == dg.DagsterRunStatus.FAILURE
            assert sum(status == dg.DagsterRunStatus.SUCCESS for status in statuses.values()) >= 6, run_summary()
            ingestion_runs = [run for run in runs if run.tags.get("dagster/sensor_name") == "shard_discovery_sensor"]
            assert {run.tags.get("dagster/partition") for run in ingestion_runs} == set(keys)

            # Exactly one embedding and one score row per accepted sample, on S3.
            teacher_id = _latest_metadata(instance, "teacher", "teacher_id")
            for table_name in ("embeddings", "scores"):
                table = lance.open_table(table_name).to_lance()
                for key in keys:
                    uids = table.to_table(columns=["uid"], filter=lance_tables.partition_condition(
                        names[key], teacher_id)).column("uid").to_pylist()
                    assert len(uids) == len(set(uids)) == len(accepted[key]), (table_name, key)
                    assert set(uids) == accepted[key], (table_name, key)
                assert table.count_rows() == sum(len(uids) for uids in accepted.values()), table_name

            # The release on S3 verifies against its checksums and re-derives.
            releases = list_releases(f"{bucket}/home/releases", s3_server)
            assert [(release.name, release.version) for release in releases] == [("prod-top-half", 1)]
            verification = verify_release(releases[0].uri, s3=s3_server)
            assert verification.ok and verification.files_checked > 3, verification

            # Compute logs of the runs landed in the bucket.
            filesystem = s3_server.pyarrow_filesystem()
            logs = [info.path for info in filesystem.get_file_info(
                pafs.FileSelector(f"{S3_BUCKET}/{compute_log_prefix}", recursive=True))
                if info.type == pafs.FileType.File]
            assert any(path.endswith((".err", ".out")) for path in logs), logs[:20]
            assert any(run_id in path for path in logs for run_id in statuses), logs[:20]
        finally:
            seen.update(_descendants(daemon.pid))
            stop_process_group(daemon, ((signal.SIGTERM, 20), (signal.SIGKILL, 10)))
            _kill_all(sorted(seen))
            daemon_log.close()
        _wait(lambda: not any(_alive(pid) for pid in seen | {daemon.pid}), 15, "killed processes to exit")
        leftovers = [pid for pid in sorted(seen | {daemon.pid}) if _alive(pid)]
        assert not leftovers, [(pid, _cmdline(pid)) for pid in leftovers]
    print(f"production stack test: {time.monotonic() - started:.0f} s\n{final}")


def _latest_metadata(instance, asset: str, key: str):
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return event.asset_materialization.metadata[key].value
