"""The Kubernetes launcher without a cluster: pod specs checked against the Kubernetes schema, config validation,
and run() end to end through the real PipesK8sClient against a fake CoreV1Api that runs the pod as a local process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import kubernetes
import pydantic
import pytest
from dagster_k8s import PipesK8sClient
from dagster_k8s.client import DagsterKubernetesClient
from dagster_k8s.pipes import build_pod_body

from orchestration.defs.data import raw_shards
from orchestration.defs.resources import EvalHistory
from orchestration.defs.tokenizer import tokenizer
from orchestration.defs.training import base_checkpoint, mid_checkpoint, sft_checkpoint
from orchestration.k8s_launcher import K8sTorchrunLauncher, validate_pod_spec
from orchestration.profiles import RunProfile
from orchestration.workspace import Workspace, nanochat_env
from store.artifact_store import LocalArtifactStore

SECRET_VALUE = "wJalrXUtnFEMI-do-not-leak"
GPU_NODE = dict(
    image="ghcr.io/example/nanochat:abc123", namespace="training", gpus_per_pod=8,
    cpu_request="64", memory_request="512Gi", memory_limit="900Gi",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                 {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"}],
    service_account_name="nanochat-trainer", image_pull_secrets=["ghcr-pull"], env_from_secret="nanochat-s3",
    workspace_claim="nanochat-workspace", workspace_root="/mnt/workspace", extra_env={"NCCL_DEBUG": "WARN"},
)


def d20_base_spec(launcher: K8sTorchrunLauncher) -> tuple[dict, list[str]]:
    """The spec of base_checkpoint's d20 run, with the arguments the asset builds (see defs/training.py)."""
    s = RunProfile(name="d20").settings()
    args = [f"--depth={s['depth']}", f"--device-batch-size={s['device_batch_size']}",
            f"--total-batch-size={s['total_batch_size']}", f"--device-type={s['device_type']}"]
    env = nanochat_env(Path("/mnt/workspace/run-1234/base_checkpoint"))
    return launcher.pod_spec("nanochat.base_train", args, s["nproc_per_node"], env), args


def test_d20_pod_spec_is_a_valid_gpu_pod(monkeypatch):
    # Credentials in the Dagster process's environment must never be copied into the spec.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-do-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    spec, args = d20_base_spec(K8sTorchrunLauncher(**GPU_NODE))
    (container,) = spec["containers"]
    assert container["image"] == GPU_NODE["image"]
    assert container["command"] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8",
                                    "-m", "nanochat.base_train", *args]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "8", "memory": "900Gi"},
                                      "requests": {"cpu": "64", "memory": "512Gi"}}
    env = {e["name"]: e["value"] for e in container["env"]}
    # Host paths are moved to the pod's base_dir, where the run's directory of the shared claim is mounted.
    assert env["NANOCHAT_BASE_DIR"] == "/workspace/nanochat"
    assert env["NANOCHAT_DATA_DIR"] == "/workspace/nanochat/base_data"
    assert "NANOCHAT_COMPILE_DIR" not in env  # a host path outside the mounted run dir
    assert env["NCCL_DEBUG"] == "WARN"
    assert container["envFrom"] == [{"secretRef": {"name": "nanochat-s3"}}]
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"},
    ]
    assert spec["serviceAccountName"] == "nanochat-trainer"
    assert spec["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert volumes["workspace"]["persistentVolumeClaim"] == {"claimName": "nanochat-workspace"}
    assert mounts["workspace"] == {"name": "workspace", "mountPath": "/workspace/nanochat",
                                   "subPath": "run-1234/base_checkpoint"}
    text = json.dumps(spec)
    assert SECRET_VALUE not in text and "AKIA" not in text and "AWS_" not in text

    # Every key is a real PodSpec field: the schema round trip keeps them all.
    model = validate_pod_spec(spec)
    assert isinstance(model, kubernetes.client.V1PodSpec)
    assert model.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    assert model.tolerations[1].effect == "NoExecute"
    # And dagster-k8s turns it into the pod it would create, adding the Pipes bootstrap to our container.
    pod = build_pod_body("p", image=None, command=None, env_vars={"DAGSTER_PIPES_CONTEXT": "x"},
                         base_pod_meta=None, base_pod_spec=spec)
    assert pod.spec.containers[0].name == "train" and pod.spec.volumes[0].empty_dir.medium == "Memory"
    assert {e.name for e in pod.spec.containers[0].env} >= {"NANOCHAT_BASE_DIR", "DAGSTER_PIPES_CONTEXT"}


def test_single_process_cpu_pod_is_minimal():
    launcher = K8sTorchrunLauncher(image="nanochat:dev", gpus_per_pod=0, shm_size="", timeout_seconds=0)
    spec = launcher.pod_spec("nanochat.base_train", ["--depth=4"], 1, {"NANOCHAT_BASE_DIR": "/tmp/run"})
    (container,) = spec["containers"]
    assert container["command"] == ["python", "-m", "nanochat.base_train", "--depth=4"]
    assert "resources" not in container and "volumes" not in spec and "activeDeadlineSeconds" not in spec
    validate_pod_spec(spec)


def test_schema_check_names_unknown_and_mistyped_fields():
    spec, _ = d20_base_spec(K8sTorchrunLauncher(**GPU_NODE))
    with pytest.raises(ValueError, match=r"spec\.nodeSelecter"):
        validate_pod_spec({**spec, "nodeSelecter": {"a": "b"}})
    container = {**spec["containers"][0], "resources": {"limits": {"nvidia.com/gpu": 8}}}  # a number, not a string
    with pytest.raises(ValueError, match=r"spec\.containers\[0\]\.resources\.limits\.nvidia\.com/gpu"):
        validate_pod_spec({**spec, "containers": [container]})


@pytest.mark.parametrize("config, field, message", [
    (dict(image=""), "image", "image must name the training image"),
    (dict(image="x", gpus_per_pod=-3), "gpus_per_pod", "gpus_per_pod must be >= 0, got -3"),
    (dict(image="x", memory_limit="lots"), "memory_limit", "'lots' is not a Kubernetes quantity"),
    (dict(image="x", cpu_request=" 8"), "cpu_request", "is not a Kubernetes quantity"),
    (dict(image="x", tolerations=[{"key": "gpu", "operator": "Maybe"}]), "tolerations.0.operator",
     "operator must be one of Equal, Exists"),
    (dict(image="x", tolerations=[{"key": "gpu", "effect": "Sometimes"}]), "tolerations.0.effect",
     "effect must be NoSchedule"),
    (dict(image="x", tolerations=[{"key": "gpu", "operator": "Exists", "value": "y"}]), "tolerations.0",
     "Exists takes no value"),
    (dict(image="x", env_from_secret="S3_Creds"), "env_from_secret", "is not a Kubernetes name"),
    (dict(image="x", extra_env={"AWS_SECRET_ACCESS_KEY": SECRET_VALUE}), "extra_env", "env_from_secret"),
    (dict(image="x", cpu_request="16", cpu_limit="8"), "K8sTorchrunLauncher", "cpu_request='16' exceeds"),
    (dict(image="x", workspace_claim="ws"), "K8sTorchrunLauncher", "workspace_claim needs workspace_root"),
    (dict(image="x", load_incluster_config=True, kubeconfig_file="/k"), "K8sTorchrunLauncher",
     "load_incluster_config=True ignores"),
])
def test_bad_config_is_a_clear_error(config, field, message):
    with pytest.raises(pydantic.ValidationError) as error:
        K8sTorchrunLauncher(**config)
    assert field in str(error.value) and message in str(error.value)


def test_unrunnable_requests_are_refused():
    launcher = K8sTorchrunLauncher(image="x", gpus_per_pod=4)
    with pytest.raises(dg.Failure, match="asks for 8 processes but the launcher's gpus_per_pod is 4"):
        launcher.pod_spec("nanochat.base_train", [], 8, {})
    with pytest.raises(dg.Failure, match="gpus_per_pod is 0"):
        K8sTorchrunLauncher(image="x", gpus_per_pod=0).pod_spec("nanochat.base_train", ["--device-type=cuda"], 1, {})
    with pytest.raises(dg.Failure, match=r"credentials \(HF_TOKEN\) in the pod spec"):
        K8sTorchrunLauncher(image="x").pod_spec("nanochat.base_train", [], 8, {"HF_TOKEN": SECRET_VALUE})
    with pytest.raises(dg.Failure, match="not under workspace_root"):
        K8sTorchrunLauncher(image="x", workspace_claim="ws", workspace_root="/mnt/ws").pod_spec(
            "nanochat.base_train", [], 1, {"NANOCHAT_BASE_DIR": "/elsewhere/run"})


def test_both_launchers_are_one_launcher_type():
    from orchestration.launcher import Launcher, TorchrunLauncher

    # The assets annotate `launcher: Launcher`: both implementations are one, with the same run() and world size.
    k8s, local = K8sTorchrunLauncher(image="x", nnodes=2), TorchrunLauncher()
    assert isinstance(k8s, Launcher) and isinstance(local, Launcher)
    assert K8sTorchrunLauncher.run is TorchrunLauncher.run is Launcher.run
    assert (k8s.world_size(8), local.world_size(8)) == (16, 8)  # what resume fingerprints count


def test_client_gets_the_cluster_settings():
    client = K8sTorchrunLauncher(image="x", kubeconfig_file="/etc/kube/config", kube_context="gpu-cluster",
                                 poll_interval_seconds=2.5).client()
    assert isinstance(client, PipesK8sClient)
    assert (client.load_incluster_config, client.kubeconfig_file, client.kube_context, client.poll_interval) == (
        None, "/etc/kube/config", "gpu-cluster", 2.5)
    incluster = K8sTorchrunLauncher(image="x", load_incluster_config=True).client()
    assert incluster.load_incluster_config is True and incluster.kubeconfig_file is None


def test_replaces_the_local_launcher_in_definitions(tmp_path):
    resources = {"artifacts": LocalArtifactStore(root=str(tmp_path / "artifacts")),
                 "workspace": Workspace(root=str(tmp_path / "work")), "profile": RunProfile(name="d20"),
                 "launcher": K8sTorchrunLauncher(image="x"),
                 "duckdb": EvalHistory(database=str(tmp_path / "evals.duckdb"))}
    defs = dg.Definitions(assets=[raw_shards, tokenizer, base_checkpoint, mid_checkpoint, sft_checkpoint],
                          resources=resources)
    dg.Definitions.validate_loadable(defs)
    assert isinstance(defs.resources["launcher"], K8sTorchrunLauncher)


# --- run() through PipesK8sClient, against a fake cluster ---------------------------------------------------------

CHILD = """
import os, sys
from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    print("training...")
    pipes.report_custom_message({"step": 1, "loss": 3.5})
    if "--crash" in sys.argv:
        raise RuntimeError("CUDA is not available")
    checkpoint_dir = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "base_checkpoints", "d4")
    pipes.report_asset_materialization(metadata={"step": 5, "checkpoint_dir": checkpoint_dir})
"""


class FakeLog(list):
    """A pod log response: iterable chunks when followed, `.data` when read whole."""

    @property
    def data(self) -> bytes:
        return b"".join(line.split(b" ", 1)[1] for line in self)


class FakeCoreApi:
    """
    The slice of CoreV1Api that PipesK8sClient uses. Creating a pod runs its container's command as a local process
    with the container's env on top of ours (the "image"). The pod then reports Running until its log has been
    followed once, and Terminated with the process's exit code after, like a pod that trains for a while.
    """

    def __init__(self) -> None:
        self.created: list[tuple[str, kubernetes.client.V1Pod]] = []
        self.deleted: list[str] = []
        self.proc: subprocess.CompletedProcess | None = None
        self.log_followed = False

    def create_namespaced_pod(self, namespace: str, body: kubernetes.client.V1Pod) -> None:
        self.created.append((namespace, body))
        container = body.spec.containers[0]
        env = {**os.environ, **{e.name: e.value for e in container.env}}
        self.proc = subprocess.run(container.command, env=env, capture_output=True, text=True, timeout=120)

    def list_namespaced_pod(self, namespace: str, field_selector: str) -> kubernetes.client.V1PodList:
        _, body = self.created[-1]
        if self.log_followed:
            state = kubernetes.client.V1ContainerState(terminated=kubernetes.client.V1ContainerStateTerminated(
                exit_code=self.proc.returncode, reason="Completed" if self.proc.returncode == 0 else "Error"))
        else:
            state = kubernetes.client.V1ContainerState(running=kubernetes.client.V1ContainerStateRunning())
        status = kubernetes.client.V1ContainerStatus(name=body.spec.containers[0].name, ready=True, state=state,
                                                     image="img", image_id="img", restart_count=0)
        pod = kubernetes.client.V1Pod(metadata=body.metadata,
                                      status=kubernetes.client.V1PodStatus(container_statuses=[status]))
        return kubernetes.client.V1PodList(items=[pod])

    def read_namespaced_pod_log(self, name: str, namespace: str, **kwargs) -> FakeLog:
        self.log_followed = self.log_followed or kwargs.get("follow", False)
        lines = (self.proc.stdout + self.proc.stderr).splitlines()
        return FakeLog(f"2024-01-01T00:00:00.{i:06d}Z {line}\n".encode() for i, line in enumerate(lines))

    def delete_namespaced_pod(self, name: str, namespace: str) -> None:
        self.deleted.append(name)


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch) -> FakeCoreApi:
    (tmp_path / "child" / "fake_train.py").parent.mkdir()
    (tmp_path / "child" / "fake_train.py").write_text(textwrap.dedent(CHILD))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "child"))
    core_api = FakeCoreApi()
    production_client = DagsterKubernetesClient.production_client
    monkeypatch.setattr(DagsterKubernetesClient, "production_client",
                        staticmethod(lambda: production_client(core_api_override=core_api)))
    monkeypatch.setattr(PipesK8sClient, "_load_k8s_config", lambda self: None)  # no kubeconfig here
    return core_api


def materialize_with_fake_cluster(tmp_path: Path, args: list[str]) -> dg.ExecuteInProcessResult:
    run_dir = tmp_path / "work" / "run" / "trained"

    @dg.asset
    def trained(context: dg.AssetExecutionContext, launcher: K8sTorchrunLauncher) -> dg.MaterializeResult:
        result, messages, wall = launcher.run(context, "fake_train", args, 1, nanochat_env(run_dir))
        return dg.MaterializeResult(metadata={**result, "messages": len(messages), "wall": wall})

    # Configured at launch, as from the launchpad's YAML.
    config = {"image": "nanochat:test", "namespace": "training", "python": sys.executable, "gpus_per_pod": 0,
              "poll_interval_seconds": 0.01, "env_from_secret": "nanochat-s3",
              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    return dg.materialize([trained], resources={"launcher": K8sTorchrunLauncher.configure_at_launch()},
                          run_config={"resources": {"launcher": {"config": config}}}, raise_on_error=False)


def test_run_reports_the_pods_result_with_host_paths(tmp_path, fake_cluster):
    result = materialize_with_fake_cluster(tmp_path, ["--depth=4"])
    assert result.success
    (namespace, pod), = fake_cluster.created
    assert namespace == "training" and fake_cluster.deleted == [pod.metadata.name]
    assert pod.spec.containers[0].command == [sys.executable, "-m", "fake_train", "--depth=4"]
    assert pod.spec.containers[0].env_from[0].secret_ref.name == "nanochat-s3"
    assert pod.spec.tolerations[0].operator == "Exists"
    (mat,) = result.asset_materializations_for_node("trained")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["step"] == 5 and meta["messages"] == 1
    # The pod reported /workspace/nanochat/...; the asset gets the path of the same files on the Dagster side.
    assert meta["checkpoint_dir"] == str(tmp_path / "work" / "run" / "trained" / "base_checkpoints" / "d4")


def test_pod_failure_fails_the_asset_with_the_childs_error(tmp_path, fake_cluster):
    result = materialize_with_fake_cluster(tmp_path, ["--crash"])
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "fake_train failed after" in message and "namespace training" in message
    assert "The child raised: RuntimeError: CUDA is not available" in message
    assert "exited with errors" in message  # the pod's own exit information from dagster-k8s
    assert len(fake_cluster.deleted) == 1  # the failed pod is cleaned up too
