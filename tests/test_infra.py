"""
infra/ checked without Docker or Kubernetes: the compose file through the compose CLI's own `config`, the Helm values
and pod specs against the chart's documented fields and the Kubernetes schema, and infra/dagster.yaml against a real
Postgres (started here) with the first two assets of the pipeline materialized on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import kubernetes
import pytest
import yaml

from orchestration.k8s_launcher import RENDEZVOUS_LABEL, _lost_fields, validate_pod_spec

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
# Variables the compose file reads: cleared from the environment so that only the env file under test counts.
COMPOSE_VARS = {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#")}


# --- docker compose ---------------------------------------------------------------------------------------------


def compose_cli() -> list[str]:
    """The compose CLI: the Docker plugin (`docker compose`) or the standalone `docker-compose` (Debian's package)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose CLI: install Debian's docker-compose (apt-get install --no-install-recommends "
                "docker-compose; scripts/system-deps.sh does) or Docker's compose plugin")


def compose_config(env_file: Path, *files: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARS}
    args = [a for f in files for a in ("-f", str(INFRA / f))]
    # `config` interpolates, merges and validates the files against the compose schema; it never calls an engine.
    return subprocess.run([*compose_cli(), "--env-file", str(env_file), *args, "config"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    result = compose_config(INFRA / ".env.example", "docker-compose.yml")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_defines_the_deployment(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "s3", "create-bucket", "user-code", "webserver", "daemon", "app"}
    for name in ("postgres", "s3", "user-code", "webserver", "daemon", "app"):  # every long-running service
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name

    ours = {"create-bucket", "user-code", "webserver", "daemon", "app"}
    assert {services[name]["image"] for name in ours} == {"nanochat-dagster:local"}  # one image
    assert services["user-code"]["command"] == ["dagster", "code-server", "start", "-m", "orchestration.definitions",
                                                "-h", "0.0.0.0", "-p", "4000"]
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert services["app"]["command"][:3] == ["python", "-m", "app"]

    # Start order: storage healthy, bucket made, then code, then what talks to the code.
    assert services["user-code"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                   "create-bucket": {"condition": "service_completed_successfully"}}
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["user-code"] == {"condition": "service_healthy"}
    assert services["create-bucket"]["depends_on"] == {"s3": {"condition": "service_healthy"}}

    # Named volumes for the eval history, the artifact cache and Dagster's storage; runs write where the app reads.
    volumes = {"postgres-data", "s3-data", "dagster-storage", "duckdb", "artifact-cache", "work"}
    assert volumes <= set(compose["volumes"])
    mounts = {name: {v["target"] if isinstance(v, dict) else v.split(":")[1]: v for v in s.get("volumes", [])}
              for name, s in services.items()}
    for name in ("user-code", "app"):
        assert "/data/duckdb" in mounts[name] and "/data/cache" in mounts[name], name
    for name in ("user-code", "webserver", "daemon"):
        assert "/opt/dagster/home/storage" in mounts[name], name

    # Credentials reach the services from the env file, and the UIs are published on loopback only by default.
    env = services["user-code"]["environment"]
    assert env["DAGSTER_PG_PASSWORD"] == "change-me-postgres-password"
    assert env["AWS_SECRET_ACCESS_KEY"] == "change-me-secret-key"
    assert env["NANOCHAT_ARTIFACTS"] == "s3://nanochat/runs" and env["NANOCHAT_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert "AWS_SECRET_ACCESS_KEY" not in services["webserver"]["environment"]  # only what each service needs
    for name in ("webserver", "app"):
        (published,) = services[name]["ports"]
        host_ip = published["host_ip"] if isinstance(published, dict) else published.split(":")[0]
        assert host_ip == "127.0.0.1", name


def test_compose_gpu_override_gives_the_code_server_the_gpus():
    result = compose_config(INFRA / ".env.example", "docker-compose.yml", "docker-compose.gpu.yml")
    assert result.returncode == 0, result.stderr
    user_code = yaml.safe_load(result.stdout)["services"]["user-code"]
    (device,) = user_code["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_refuses_to_start_without_secrets(tmp_path):
    env_file = tmp_path / "no-secrets.env"
    secret = re.compile(r"(DAGSTER_PG_PASSWORD|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY)=")
    env_file.write_text("".join(line + "\n" for line in (INFRA / ".env.example").read_text().splitlines()
                                if not secret.match(line)))
    result = compose_config(env_file, "docker-compose.yml")
    assert result.returncode != 0
    assert "in infra/.env" in result.stderr  # the message of the file's ${VAR:?...}, naming the variable


def test_no_credentials_in_infra_files():
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if "=" in line and not line.startswith("#"))
    secrets = {k: v for k, v in example.items() if re.search(r"PASSWORD|SECRET|ACCESS_KEY", k)}
    assert secrets and all(v.startswith("change-me") for v in secrets.values()), secrets
    for path in [*INFRA.glob("*.y*ml"), *INFRA.glob("helm/*.yaml"), *INFRA.glob("k8s/*.yaml")]:
        for key, value in yaml_items(list(yaml.safe_load_all(path.read_text()))):
            assert "change-me" not in str(value), (path, key)  # placeholders live in .env.example only
            if re.search(r"password|secret_?key|access_?key", key, re.IGNORECASE) and isinstance(value, str):
                assert value.startswith("${") or not value, (path, key)


def yaml_items(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from yaml_items(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from yaml_items(v, key)
    else:
        yield key, node


def test_workspace_points_at_the_code_server(compose):
    (location,) = yaml.safe_load((INFRA / "workspace.yaml").read_text())["load_from"]
    server = location["grpc_server"]
    assert server["host"] == "user-code" and "user-code" in compose["services"]
    command = compose["services"]["user-code"]["command"]
    assert str(server["port"]) == command[command.index("-p") + 1]
    assert server["location_name"] == "orchestration.definitions"


def test_dockerfile_builds_one_non_root_image_with_cpu_default():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.MULTILINE)
    assert "nvidia/cuda:" in text  # the documented CUDA base
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # Everything the Dockerfile copies from the context survives infra/Dockerfile.dockerignore.
    allowed = [line[1:].rstrip("/") for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for source in sources.split():
            assert source in allowed and (REPO / source).exists(), source
    # The commands the compose services run exist in the environment the image installs.
    for script in ("dagster", "dagster-webserver", "dagster-daemon"):
        assert (Path(sys.executable).parent / script).exists(), script


# --- Helm values and Kubernetes manifests ------------------------------------------------------------------------

# The fields of the official chart's values (dagster 1.13.x) that these values use, with what the chart accepts.
# The chart's values.schema.json is generated from its pydantic models and forbids unknown keys in these sections;
# it is not shipped with the Python packages, so the expectation is written out here (from the chart's schema source).
HELM_FIELDS = {
    "user deployment": {"name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                        "deploymentNamespace", "port", "replicaCount", "env", "envConfigMaps", "envSecrets",
                        "annotations", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
                        "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels",
                        "volumeMounts", "volumes", "schedulerName", "initContainers", "sidecarContainers",
                        "deploymentStrategy"},
    "k8sRunLauncher": {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
                       "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
                       "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig"},
    "runK8sConfig": {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"},
    "queuedRunCoordinator": {"maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
                             "dequeueNumWorkers", "dequeueUseThreads", "blockOpConcurrencyLimitedRuns"},
    "runMonitoring": {"enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts",
                      "pollIntervalSeconds", "freeSlotsAfterRunEndSeconds", "maxRuntimeSeconds"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "postgresql": {"enabled", "image", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                   "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"},
    "top level": {"global", "dagsterWebserver", "dagster-user-deployments", "postgresql",
                  "generatePostgresqlPasswordSecret", "generateCeleryConfigSecret", "rabbitmq", "redis", "flower",
                  "ingress", "imagePullSecrets", "computeLogManager", "scheduler", "runLauncher", "pythonLogs",
                  "dagsterDaemon", "busybox", "migrate", "telemetry", "serviceAccount", "retention", "concurrency",
                  "additionalInstanceConfig", "nameOverride", "fullnameOverride", "rbacEnabled", "dagsterHome"},
}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


def check_model(obj, model: str) -> None:
    """obj (camelCase, as in a manifest) deserializes into the Kubernetes client's `model` with no field lost."""
    api = kubernetes.client.ApiClient()
    kept = api.sanitize_for_serialization(api.deserialize(SimpleNamespace(data=json.dumps(obj)), model))
    lost = _lost_fields(obj, kept, model)
    assert not lost, f"not valid {model} fields: {lost}"


def unknown(section: str, values: dict) -> set[str]:
    return set(values) - HELM_FIELDS[section]


@pytest.fixture(scope="module")
def helm() -> dict:
    return yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())


def test_helm_values_use_the_charts_fields(helm):
    assert not unknown("top level", helm)
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    assert helm["dagster-user-deployments"]["enabled"] is True
    assert not unknown("user deployment", deployment)
    assert {"name", "image", "port"} <= set(deployment)
    assert deployment["codeServerArgs"] == ["-m", "orchestration.definitions"]
    image = deployment["image"]
    assert set(image) == {"repository", "tag", "pullPolicy"} and image["pullPolicy"] in PULL_POLICIES
    for item in deployment["env"]:
        check_model(item, "V1EnvVar")
    for item in deployment["envSecrets"]:
        check_model(item, "V1SecretEnvSource")
    for item in deployment["volumes"]:
        check_model(item, "V1Volume")
    for item in deployment["volumeMounts"]:
        check_model(item, "V1VolumeMount")
    check_model(deployment["resources"], "V1ResourceRequirements")
    # The image K8sTorchrunLauncher puts in training pods is the code location's own.
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["NANOCHAT_IMAGE"] == f"{image['repository']}:{image['tag']}"

    launcher = helm["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    k8s = launcher["config"]["k8sRunLauncher"]
    assert not unknown("k8sRunLauncher", k8s) and k8s["imagePullPolicy"] in PULL_POLICIES
    assert not unknown("runK8sConfig", k8s["runK8sConfig"])
    check_model({"containers": [{"name": "run"}], **k8s["runK8sConfig"]["podSpecConfig"]}, "V1PodSpec")
    check_model({"name": "run", **k8s["runK8sConfig"]["containerConfig"]}, "V1Container")

    coordinator = helm["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True and coordinator["type"] == "QueuedRunCoordinator"
    assert not unknown("queuedRunCoordinator", coordinator["config"]["queuedRunCoordinator"])
    assert not unknown("runMonitoring", helm["dagsterDaemon"]["runMonitoring"])
    assert not unknown("concurrency", helm["concurrency"])
    assert not unknown("concurrency.pools", helm["concurrency"]["pools"])
    assert not unknown("concurrency.runs", helm["concurrency"]["runs"])
    assert not unknown("postgresql", helm["postgresql"]) and "postgresqlPassword" not in helm["postgresql"]
    assert helm["generatePostgresqlPasswordSecret"] is False and helm["global"]["postgresqlSecretName"]
    assert helm["telemetry"] == {"enabled": False}


def test_helm_and_compose_instances_agree(helm):
    # The same queue and pool limits whichever way Dagster is deployed.
    instance = yaml.safe_load((INFRA / "dagster.yaml").read_text())
    assert helm["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"] == 1
    assert helm["concurrency"]["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert helm["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert (helm["dagsterDaemon"]["runMonitoring"]["maxResumeRunAttempts"]
            == instance["run_monitoring"]["max_resume_run_attempts"] == 0)
    # Preempted runs are retried (from failure, so the training stage resumes) a small number of times.
    retries = helm["dagsterDaemon"]["runRetries"]
    assert set(retries) <= {"enabled", "maxRetries", "retryOnAssetOrOpFailure"}
    assert retries["enabled"] is instance["run_retries"]["enabled"] is True
    assert 0 < retries["maxRetries"] == instance["run_retries"]["max_retries"] <= 3
    assert retries["retryOnAssetOrOpFailure"] is instance["run_retries"]["retry_on_asset_or_op_failure"] is True


def load_render_examples():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_examples", INFRA / "k8s" / "render_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_training_pods_are_current_and_valid():
    render = load_render_examples()
    for file_name, manifests in render.render().items():
        assert (INFRA / "k8s" / file_name).read_text() == render.to_yaml(manifests), \
            f"infra/k8s/{file_name} is stale: run python infra/k8s/render_examples.py"
        for manifest in yaml.safe_load_all((INFRA / "k8s" / file_name).read_text()):
            check_model(manifest, f"V1{manifest['kind']}")
            if manifest["kind"] == "Pod":
                validate_pod_spec(manifest["spec"])
                (container,) = manifest["spec"]["containers"]
                assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
                assert "--nproc_per_node=8" in container["command"]
                assert container["envFrom"] == [{"secretRef": {"name": "nanochat-s3"}}]


def test_two_by_eight_pods_meet_at_node_0():
    service, *pods = yaml.safe_load_all((INFRA / "k8s" / "d20-2x8.yaml").read_text())
    name = service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {RENDEZVOUS_LABEL: name}
    assert [p["metadata"]["labels"] for p in pods] == [service["spec"]["selector"]] * 2

    def flags(pod):
        return dict(a[2:].split("=", 1) for a in pod["spec"]["containers"][0]["command"] if a.startswith("--")
                    and "=" in a and a.split("=")[0] in ("--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint",
                                                          "--rdzv_id", "--rdzv_conf", "--local_addr"))

    node0, node1 = (flags(p) for p in pods)
    assert node0["nnodes"] == node1["nnodes"] == "2" and (node0["node_rank"], node1["node_rank"]) == ("0", "1")
    assert node0["rdzv_backend"] == "c10d" and node0["rdzv_id"] == node1["rdzv_id"] == name
    # Both dial node 0's DNS name (hostname.subdomain under the headless Service); node 0 hosts the store.
    assert node0["rdzv_endpoint"] == node1["rdzv_endpoint"] == f"{pods[0]['spec']['hostname']}.{name}:29400"
    assert all(p["spec"]["subdomain"] == name for p in pods)
    assert (node0["rdzv_conf"], node1["rdzv_conf"]) == ("is_host=1", "is_host=0")
    # c10d ranks nodes by the address they announce: node 0's sorts first, so global rank 0 (Pipes) is on node 0.
    assert node0["local_addr"] < node1["local_addr"]
    assert node0["local_addr"] == node0["rdzv_endpoint"].rsplit(":", 1)[0]
    # d20 on 16 GPUs: 16 rows x 2048 tokens x 16 processes = the 524,288-token step in one micro-batch.
    args = pods[0]["spec"]["containers"][0]["command"]
    assert "--device-batch-size=16" in args and "--total-batch-size=524288" in args


def test_training_rbac_is_valid():
    kinds = {}
    for manifest in yaml.safe_load_all((INFRA / "k8s" / "training-rbac.yaml").read_text()):
        check_model(manifest, f"V1{manifest['kind']}")
        kinds[manifest["kind"]] = manifest
    rules = {(r["resources"][0], v) for r in kinds["Role"]["rules"] for v in r["verbs"]}
    for needed in [("pods", "create"), ("pods", "delete"), ("pods/log", "get"), ("events", "list"),
                   ("services", "create"), ("services", "delete")]:
        assert needed in rules, needed


# --- infra/dagster.yaml on a real Postgres ------------------------------------------------------------------------


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                                                    key=lambda p: int(p.parts[-3]), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql (scripts/system-deps.sh installs it)")
    return str(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway Postgres on 127.0.0.1 with a password-protected `dagster` role and database; stopped after."""
    # Postgres refuses to run as root: as root, run it as the `postgres` user, in a directory that user owns (pytest's
    # tmp_path sits under a root-only directory).
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="nanochat-pg-"))
    password, port = "test-only-password", free_port()
    (root / "pwfile").write_text(password + "\n")
    if as_user:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pwfile", "postgres")
    data = root / "data"
    pg_ctl = [*as_user, postgres_bin("pg_ctl"), "-D", str(data)]
    started = False
    try:
        subprocess.run([*as_user, postgres_bin("initdb"), "-D", str(data), "-U", "dagster", "-E", "UTF8",
                        "--auth=scram-sha-256", f"--pwfile={root / 'pwfile'}"], check=True, capture_output=True)
        subprocess.run([*pg_ctl, "-l", str(root / "log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
        started = True
        env = {**os.environ, "PGPASSWORD": password}
        psql = [postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "dagster", "-v", "ON_ERROR_STOP=1"]
        subprocess.run([*psql, "-d", "postgres", "-c", "CREATE DATABASE dagster"], check=True, capture_output=True,
                       env=env)
        yield SimpleNamespace(port=port, password=password, psql=[*psql, "-d", "dagster", "-tA"], env=env,
                              dagster_env={"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port),
                                           "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": password,
                                           "DAGSTER_PG_DB": "dagster"})
    except subprocess.CalledProcessError as e:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        pytest.fail(f"Postgres did not start: {e}\n{e.stderr}\n{log}")
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def query(postgres, sql: str) -> list[list[str]]:
    out = subprocess.run([*postgres.psql, "-c", sql], check=True, capture_output=True, text=True, env=postgres.env)
    return [line.split("|") for line in out.stdout.splitlines() if line]


@pytest.fixture
def dagster_home(tmp_path, postgres):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(INFRA / "dagster.yaml", home / "dagster.yaml")  # as shipped: only the environment differs
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "NANOCHAT_"))}
    return home, {**env, **postgres.dagster_env, "DAGSTER_HOME": str(home)}


def test_dagster_yaml_loads_on_postgres(dagster_home, postgres):
    _, env = dagster_home
    result = subprocess.run([sys.executable, "-m", "dagster", "instance", "info"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for storage in ("PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"):
        assert storage in out
    info = yaml.safe_load(out[out.index("Instance configuration:"):].split("\n", 2)[2].split("Storage schema")[0])
    assert info["concurrency"] == {"runs": {"max_concurrent_runs": 4}, "pools": {"default_limit": 1}}
    assert info["telemetry"] == {"enabled": False} and info["run_monitoring"]["enabled"] is True
    # The tables were created on first use and are at the current schema.
    schema = yaml.safe_load(out[out.index("Storage schema state:"):].split("\n", 2)[2])["schema"]
    assert all(s["current"] == s["latest"] for s in schema.values()), schema
    tables = {name for (name,) in query(postgres, "SELECT table_name FROM information_schema.tables")}
    assert {"runs", "event_logs", "jobs", "concurrency_limits"} <= tables


@pytest.mark.slow
def test_first_assets_materialize_on_the_postgres_instance(dagster_home, postgres, shared_data, tmp_path):
    home, env = dagster_home
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump({"resources": {"profile": {"config": {
        "corpus": "shared", "vocab_size": 512, "tok_max_chars": 2_000_000}}}}))
    env.update(NANOCHAT_SHARED_DATA=str(shared_data), NANOCHAT_ARTIFACTS=str(tmp_path / "artifacts"),
               NANOCHAT_WORKSPACE=str(tmp_path / "work"), NANOCHAT_DUCKDB=str(tmp_path / "evals.duckdb"),
               NANOCHAT_ARTIFACT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "orchestration.definitions",
                             "--select", "raw_shards,tokenizer", "--partition", "tiny", "-c", str(config)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    # The run, its materializations and its step logs are in Postgres (not in a SQLite file under DAGSTER_HOME).
    ((run_id, status),) = query(postgres, "SELECT run_id, status FROM runs")
    assert status == "SUCCESS"
    materialized = query(postgres, "SELECT DISTINCT asset_key FROM event_logs "
                                   "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' ORDER BY asset_key")
    assert [json.loads(key) for (key,) in materialized] == [["raw_shards"], ["tokenizer"]]
    assert not list(home.rglob("*.db")), "a SQLite storage was created beside the Postgres one"
    assert (tmp_path / "artifacts" / "tokenizer").is_dir()
    print(f"materialized raw_shards and tokenizer on Postgres in {time.time() - t0:.1f}s (run {run_id})")
