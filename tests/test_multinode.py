"""Multi-node torchrun: the launchers' rendezvous settings, two "nodes" on 127.0.0.1 training exactly like one, and
the pods of a multi-node job on Kubernetes (against a fake cluster)."""

import os
import re
import socket
import subprocess
import uuid
from types import SimpleNamespace

import dagster as dg
import pytest
import torch

from orchestration.k8s_launcher import RENDEZVOUS_LABEL, K8sTorchrunLauncher, node_host, rendezvous_name
from orchestration.launcher import TorchrunLauncher
from orchestration.workspace import nanochat_env

# The tiny base_train run of tests/test_training.py, shortened: 2 ranks x 8 rows x 64 tokens = the 1024-token step.
TINY = ["--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=8", "--total-batch-size=1024",
        "--eval-tokens=4096", "--sample-every=-1", "--device-type=cpu", "--log-every=1", "--eval-every=-1",
        "--num-iterations=8", "--compile=no"]
TIMEOUT = 120


# --- TorchrunLauncher's argv ---------------------------------------------------------------------------------------


def test_second_node_command():
    launcher = TorchrunLauncher(python="python", nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400",
                                rdzv_id="run-42")
    assert launcher.command("nanochat.base_train", ["--depth=20"], 8) == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=run-42", "--nproc_per_node=8",
        "-m", "nanochat.base_train", "--depth=20"]


def test_multi_node_always_goes_through_torchrun_and_announces_local_addr():
    launcher = TorchrunLauncher(python="python", nnodes=2, rdzv_endpoint="node0:29400", local_addr="node0")
    argv = launcher.command("nanochat.base_train", [], 1)  # one process per node is still a distributed job
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--node_rank=0" in argv and "--local_addr=node0" in argv and "--nproc_per_node=1" in argv


def test_single_node_is_unchanged():
    assert TorchrunLauncher(python="python").command("nanochat.base_train", ["--x"], 2) == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat.base_train",
        "--x"]
    assert TorchrunLauncher(python="python").command("nanochat.base_train", [], 1) == [
        "python", "-m", "nanochat.base_train"]


@pytest.mark.parametrize("config, message", [
    (dict(nnodes=0), "nnodes must be at least 1"),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="10.0.0.1:29400"), r"node_rank must be in \[0, nnodes=2\)"),
    (dict(nnodes=1, node_rank=1), r"node_rank must be in \[0, nnodes=1\)"),
    (dict(nnodes=2, node_rank=-1, rdzv_endpoint="10.0.0.1:29400"), "node_rank must be in"),
    (dict(nnodes=2), "nnodes=2 needs rdzv_endpoint=HOST:PORT"),
    (dict(nnodes=2, rdzv_endpoint="10.0.0.1"), "needs rdzv_endpoint=HOST:PORT"),
    (dict(nnodes=2, rdzv_endpoint="10.0.0.1:http"), "needs rdzv_endpoint=HOST:PORT"),
    (dict(nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_backend="etcd"), "rdzv_backend must be one of c10d"),
    (dict(nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id=" "), "rdzv_id must name the job"),
])
def test_bad_rendezvous_is_a_clear_error(config, message):
    with pytest.raises(Exception, match=message):
        TorchrunLauncher(**config)


# --- Two nodes on one machine -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str]) -> subprocess.Popen:
    # One thread per process: two cores, two trainers (see ../shared/ENVIRONMENT.md on thread collapse).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            outs.append(out)
            assert proc.returncode == 0, out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def final_loss(out: str) -> float:
    losses = re.findall(r"step 00008/00008 \| loss ([\d.]+)", out)
    assert len(losses) == 1, out  # printed by global rank 0 only
    return float(losses[0])


@pytest.mark.slow
def test_two_nodes_over_c10d_train_exactly_like_one_node(base_dir):
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv_id = f"test-{uuid.uuid4().hex[:8]}"
    # The commands come from the launcher itself: what Dagster would run on node 0, and its twin on node 1.
    nodes = [TorchrunLauncher(nnodes=2, node_rank=rank, rdzv_endpoint=endpoint, rdzv_id=rdzv_id)
             for rank in (0, 1)]
    two_nodes = [start(node.command("nanochat.base_train", [*TINY, "--model-tag=two-nodes"], 1)) for node in nodes]
    outs = finish(two_nodes)
    (one_node,) = finish([start(TorchrunLauncher().command("nanochat.base_train", [*TINY, "--model-tag=one-node"], 2))])

    # Both nodes joined one 2-process job (each ran one rank) instead of two 1-process jobs.
    joined = "".join(outs)
    assert "grad accumulation steps: 1" in joined and "grad accumulation steps: 2" not in joined
    assert final_loss(joined) == pytest.approx(final_loss(one_node), abs=1e-5)

    # Same ranks, same batches, same reductions: the weights agree to the bit, and each rank saved its optimizer shard.
    a = torch.load(base_dir / "base_checkpoints" / "two-nodes" / "model_000008.pt", weights_only=True)
    b = torch.load(base_dir / "base_checkpoints" / "one-node" / "model_000008.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key
    assert (base_dir / "base_checkpoints" / "two-nodes" / "optim_000008_rank1.pt").exists()



# --- Multi-node on Kubernetes: run() against a fake cluster -------------------------------------------------------


class FakeCluster:
    """The Kubernetes API calls of a multi-node run(), recorded in order; node 0 (PipesK8sClient) is simulated."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    # CoreV1Api, for the Service and the peer pods
    def create_namespaced_service(self, namespace: str, body: dict) -> None:
        self.calls.append(("create service", namespace, body["metadata"]["name"], body))

    def create_namespaced_pod(self, namespace: str, body: dict) -> None:
        self.calls.append(("create pod", namespace, body["metadata"]["name"], body))

    def delete_namespaced_pod(self, name: str, namespace: str) -> None:
        self.calls.append(("delete pod", namespace, name))

    def delete_namespaced_service(self, name: str, namespace: str) -> None:
        self.calls.append(("delete service", namespace, name))

    # PipesK8sClient, for node 0
    def run(self, *, context, namespace, base_pod_spec, base_pod_meta, pod_wait_timeout, delete_pod_on_completion):
        from dagster_k8s.client import DagsterK8sError

        self.calls.append(("pipes pod", namespace, base_pod_spec["hostname"], (base_pod_spec, base_pod_meta)))
        if self.fail:
            raise DagsterK8sError("Pod did not exit successfully: NCCL timeout")
        checkpoint_dir = dg.MetadataValue.text("/workspace/nanochat/base_checkpoints/d20")
        result = dg.MaterializeResult(metadata={"step": dg.MetadataValue.int(3), "checkpoint_dir": checkpoint_dir})
        return SimpleNamespace(get_results=lambda: [result], get_custom_messages=lambda: [{"step": 1}])


def materialize_two_pods(tmp_path, monkeypatch, cluster: FakeCluster) -> dg.ExecuteInProcessResult:
    monkeypatch.setattr(K8sTorchrunLauncher, "core_api", lambda self: cluster)
    monkeypatch.setattr(K8sTorchrunLauncher, "client", lambda self: cluster)
    run_dir = tmp_path / "work" / "run" / "base_checkpoint"

    @dg.asset
    def base_checkpoint(context: dg.AssetExecutionContext, launcher: K8sTorchrunLauncher) -> dg.MaterializeResult:
        result, _, _ = launcher.run(context, "nanochat.base_train", ["--depth=20", "--device-type=cuda"], 8,
                                    nanochat_env(run_dir))
        return dg.MaterializeResult(metadata=result)

    launcher = K8sTorchrunLauncher(image="nanochat:cu128", namespace="training", gpus_per_pod=8, nnodes=2)
    return dg.materialize([base_checkpoint], resources={"launcher": launcher}, raise_on_error=False)


def test_k8s_run_starts_the_peers_then_node_0_and_cleans_up(tmp_path, monkeypatch):
    cluster = FakeCluster()
    result = materialize_two_pods(tmp_path, monkeypatch, cluster)
    assert result.success
    (service, peer, node0, delete_peer, delete_service) = cluster.calls
    name = service[2]
    assert service[:2] == ("create service", "training") and name.startswith("nanochat-base-train-")
    assert peer[:3] == ("create pod", "training", f"{name}-1")
    assert "--node_rank=1" in peer[3]["spec"]["containers"][0]["command"]
    spec, meta = node0[3]
    assert node0[2] == f"{name}-0" and spec["subdomain"] == name and meta == {"labels": {RENDEZVOUS_LABEL: name}}
    assert "--node_rank=0" in spec["containers"][0]["command"]
    assert delete_peer == ("delete pod", "training", f"{name}-1") and delete_service == ("delete service", "training",
                                                                                           name)
    (mat,) = result.asset_materializations_for_node("base_checkpoint")
    # Node 0 reported its pod path; the asset gets the same files' path on the Dagster side.
    assert mat.metadata["checkpoint_dir"].value == str(tmp_path / "work" / "run" / "base_checkpoint" /
                                                       "base_checkpoints" / "d20")


def test_k8s_peers_are_removed_when_node_0_fails(tmp_path, monkeypatch):
    cluster = FakeCluster(fail=True)
    result = materialize_two_pods(tmp_path, monkeypatch, cluster)
    assert not result.success
    assert [c[0] for c in cluster.calls] == ["create service", "create pod", "pipes pod", "delete pod",
                                             "delete service"]
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "NCCL timeout" in failure.event_specific_data.error.message


def test_k8s_multi_node_config_is_checked():
    with pytest.raises(Exception, match="nnodes must be at least 1"):
        K8sTorchrunLauncher(image="x", nnodes=0)
    with pytest.raises(Exception, match="rdzv_port must be a TCP port"):
        K8sTorchrunLauncher(image="x", nnodes=2, rdzv_port=0)
    # Without a job name there is nothing for the pods to meet at.
    with pytest.raises(dg.Failure, match="rendezvous name"):
        K8sTorchrunLauncher(image="x", nnodes=2).command("nanochat.base_train", [], 8)


def test_k8s_node_names_sort_like_ranks():
    name = rendezvous_name("nanochat.base_train", "8f14e45f-ceea-467f-a0e6-0b1c2b1d2a3e", suffix="ab12")
    assert name == "nanochat-base-train-8f14e45f-ab12"
    hosts = [node_host(name, rank, 12) for rank in range(12)]
    assert hosts == sorted(hosts) and hosts[10] == f"{name}-10.{name}" and hosts[2] == f"{name}-02.{name}"
    assert len(hosts[0].split(".")[0]) <= 63  # a pod hostname is a DNS label
