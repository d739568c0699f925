"""
Render the training pods K8sTorchrunLauncher asks Kubernetes for, as YAML beside this file, so they can be read and
reviewed without a cluster. CI re-renders them and fails when a file here no longer matches the code.

    python infra/k8s/render_examples.py          # rewrite the examples after changing the launcher

- d20-1x8.yaml: base_checkpoint of the d20 profile on one pod with 8 GPUs.
- d20-2x8.yaml: the same on 2 pods x 8 GPUs: the headless Service, node 0 (the Pipes pod) and node 1.

What PipesK8sClient adds to node 0 when it creates it is left out: Dagster's labels and the DAGSTER_PIPES_CONTEXT /
DAGSTER_PIPES_MESSAGES variables that connect rank 0 to the run (it also picks node 0's pod name; the DNS name comes
from `hostname`). Without them the files still apply as they are (`kubectl apply -f d20-2x8.yaml`): a way to try a
cluster's GPUs, claim and networking with the real image before Dagster is involved (nothing reports back then).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, when run as a script

from orchestration.k8s_launcher import RENDEZVOUS_LABEL, K8sTorchrunLauncher, rendezvous_name  # noqa: E402
from orchestration.profiles import RunProfile  # noqa: E402
from orchestration.workspace import nanochat_env  # noqa: E402

RUN_ID = "8f14e45f-ceea-467f-a0e6-0b1c2b1d2a3e"  # an example Dagster run id
MODULE = "nanochat.base_train"

# A GPU node pool of 8 x H100 machines; the same settings as the launcher's launchpad config in infra/README.md.
CLUSTER = dict(
    image="ghcr.io/your-org/nanochat-dagster:0.1.0-cu128", namespace="training", gpus_per_pod=8,
    cpu_request="64", memory_request="512Gi", memory_limit="900Gi", shm_size="32Gi",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    service_account_name="nanochat-trainer", env_from_secret="nanochat-s3",
    workspace_claim="nanochat-workspace", workspace_root="/mnt/workspace", extra_env={"NCCL_DEBUG": "WARN"},
)


def base_train_args(profile: RunProfile) -> list[str]:
    """The arguments base_checkpoint gives nanochat.base_train (orchestration/defs/training.py)."""
    s = profile.settings()
    return [f"--depth={s['depth']}", f"--max-seq-len={s['max_seq_len']}",
            f"--device-batch-size={s['device_batch_size']}", f"--total-batch-size={s['total_batch_size']}",
            f"--num-iterations={s['base_iterations']}", f"--eval-every={s['eval_every']}",
            f"--eval-tokens={s['eval_tokens']}", "--log-every=10", f"--run={RUN_ID}",
            f"--device-type={s['device_type']}"]


def pod(name: str, spec: dict, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **({"labels": labels} if labels else {})},
            "spec": spec}


def render() -> dict[str, list[dict]]:
    """{file name: the manifests it holds}."""
    env = nanochat_env(Path("/mnt/workspace") / RUN_ID / "base_checkpoint")

    single = K8sTorchrunLauncher(**CLUSTER)
    profile = RunProfile(name="d20")
    one = [pod(f"nanochat-base-train-{RUN_ID[:8]}",
               single.pod_spec(MODULE, base_train_args(profile), profile.settings()["nproc_per_node"], env))]

    # 16 processes: halve the per-GPU batch so 524,288 tokens per step stays one micro-batch per process.
    multi = K8sTorchrunLauncher(**CLUSTER, nnodes=2)
    profile = RunProfile(name="d20", device_batch_size=16)
    args, nproc = base_train_args(profile), profile.settings()["nproc_per_node"]
    name = rendezvous_name(MODULE, RUN_ID, suffix="ab12")
    labels = {RENDEZVOUS_LABEL: name}
    two = [multi.rendezvous_service(name),
           pod(f"{name}-0", multi.pod_spec(MODULE, args, nproc, env, 0, name), labels),
           *multi.worker_pods(MODULE, args, nproc, env, name)]
    return {"d20-1x8.yaml": one, "d20-2x8.yaml": two}


def to_yaml(manifests: list[dict]) -> str:
    header = "# Rendered by infra/k8s/render_examples.py from K8sTorchrunLauncher; do not edit by hand.\n"
    return header + yaml.safe_dump_all(manifests, sort_keys=False, width=120)


if __name__ == "__main__":
    for file_name, manifests in render().items():
        (HERE / file_name).write_text(to_yaml(manifests))
        print(f"wrote {HERE / file_name}")
