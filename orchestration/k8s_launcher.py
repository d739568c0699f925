"""
Launch nanochat's training entry points as Kubernetes pods through Dagster Pipes (dagster-k8s `PipesK8sClient`).

`K8sTorchrunLauncher` is the cluster twin of `TorchrunLauncher`: both are `Launcher`s (orchestration/launcher.py),
sharing `run(context, module, args, nproc, env)` with its result handling and failure messages, so the training
assets take either as their `launcher` resource. Each stage is one pod with one container running torchrun over the
pod's GPUs; rank 0 writes its Pipes messages to stderr, which the client reads back from the pod's log.

The pod's filesystem is not the Dagster host's. The run directory the asset prepared (inputs fetched, checkpoints
expected) reaches the pod through a shared PersistentVolumeClaim (`workspace_claim`) mounted at `base_dir`;
environment values and reported paths are translated between the two views of that directory.

Multi-node (`nnodes > 1`): one pod per node, all alike but for their node rank. Dagster launches node 0 through
PipesK8sClient (global rank 0 lives there and reports back); run() itself creates the other nodes' pods and a headless
Service that gives every pod a stable DNS name (`<name>-<i>.<name>`), and deletes them when node 0 finishes. The pods
meet through torchrun's c10d rendezvous hosted by node 0 on `rdzv_port`; see infra/README.md.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import shlex
from types import SimpleNamespace
from typing import Any

import dagster as dg
import kubernetes
from dagster_k8s import PipesK8sClient
from dagster_k8s.client import DagsterK8sError
from kubernetes.utils import parse_quantity
from pydantic import field_validator, model_validator
from urllib3.exceptions import HTTPError

from orchestration.launcher import Launcher, LaunchFailed, rendezvous_args

# Kubernetes object names (Secrets, ServiceAccounts, claims, namespaces) are DNS-1123 subdomains.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Environment names that hold credentials: those belong in the Secret named by env_from_secret, never in the spec.
_CREDENTIAL_ENV = re.compile(r"(^|_)(SECRET|PASSWORD|TOKEN|ACCESS_KEY)(_|$)", re.IGNORECASE)
_OPERATORS = ("Equal", "Exists")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute", "")
# The label that ties a multi-node job's pods to its headless Service.
RENDEZVOUS_LABEL = "nanochat.rendezvous"


def _check_name(value: str, field: str) -> str:
    if value and (len(value) > 253 or not _K8S_NAME.fullmatch(value)):
        raise ValueError(f"{field}={value!r} is not a Kubernetes name (lowercase letters, digits, '-' and '.')")
    return value


def _credentials_error(env: dict[str, str], where: str) -> str | None:
    leaked = sorted(name for name in env if _CREDENTIAL_ENV.search(name))
    if leaked:
        return (f"{where} would put credentials ({', '.join(leaked)}) in the pod spec in plain text; "
                "put them in a Kubernetes Secret and name it in env_from_secret")
    return None


def _rebase(value: str, old: str, new: str) -> str:
    """`value` with the directory prefix `old` replaced by `new` (unchanged when it is not under `old`)."""
    old = old.rstrip("/")
    if value == old or value.startswith(old + "/"):
        return new.rstrip("/") + value[len(old):]
    return value


class Toleration(dg.Config):
    """One pod toleration, as in the Kubernetes API (tolerationSeconds is left out: training pods never drain)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""

    @field_validator("operator")
    @classmethod
    def _operator(cls, v: str) -> str:
        if v not in _OPERATORS:
            raise ValueError(f"toleration operator must be one of {', '.join(_OPERATORS)}, got {v!r}")
        return v

    @field_validator("effect")
    @classmethod
    def _effect(cls, v: str) -> str:
        if v not in _EFFECTS:
            raise ValueError(f"toleration effect must be NoSchedule, PreferNoSchedule, NoExecute or empty, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        # The API server's own rules, checked here so a bad toleration fails at config time, not at pod creation.
        if self.operator == "Exists" and self.value:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value (got {self.value!r})")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists (it tolerates every taint)")
        return self

    def to_k8s(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v}


class K8sTorchrunLauncher(Launcher):
    """Run a training stage as a pod: torchrun over `gpus_per_pod` GPUs, reporting back through Dagster Pipes."""

    image: str  # must contain this repository's nanochat package, torch with CUDA, and dagster-pipes
    namespace: str = "default"
    python: str = "python"  # the interpreter inside the image
    # Where the run directory appears inside the pod; NANOCHAT_BASE_DIR and NANOCHAT_DATA_DIR point under it.
    base_dir: str = "/workspace/nanochat"
    # A ReadWriteMany claim that also holds the Dagster workspace (mounted at workspace_root where Dagster runs):
    # the pod mounts the run's own directory of it at base_dir, so it sees the fetched inputs and Dagster sees the
    # checkpoints it writes. Without it the pod only has what the image carries.
    workspace_claim: str = ""
    workspace_root: str = ""
    gpus_per_pod: int = 8  # the d20/d26/d32 profiles run 8 processes; 0 = a CPU pod
    gpu_resource_name: str = "nvidia.com/gpu"
    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    # NCCL and dataloader workers share memory through /dev/shm, which container runtimes cap at 64 MB.
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    service_account_name: str = ""
    image_pull_secrets: list[str] = []
    env_from_secret: str = ""  # a Secret injected whole with envFrom (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
    extra_env: dict[str, str] = {}  # plain settings such as NCCL_DEBUG; never credentials
    # How to reach the cluster; None = in-cluster config when running in a pod, else the default kubeconfig.
    load_incluster_config: bool | None = None
    kubeconfig_file: str = ""
    kube_context: str = ""
    poll_interval_seconds: float = 10.0
    # The longest one stage may run (a d32 run takes well over a day on 8 H100s). Enforced twice: Dagster stops
    # waiting, and the pod's activeDeadlineSeconds lets the cluster free the GPUs even if Dagster itself is gone.
    # 0 = no limit.
    timeout_seconds: int = 72 * 3600
    delete_pod_on_completion: bool = True  # False keeps finished pods for `kubectl logs` / `describe`
    # Multi-node training: nnodes pods of gpus_per_pod GPUs each (e.g. 2 x 8 for d20/d32 on two nodes). The processes
    # per pod are still the profile's nproc_per_node; its total_batch_size must divide by nnodes x nproc_per_node x
    # device_batch_size x max_seq_len (d20 on 2 x 8 needs device_batch_size=16).
    nnodes: int = 1
    rdzv_port: int = 29400  # where node 0's torchrun hosts the c10d rendezvous store

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("image must name the training image (e.g. ghcr.io/you/nanochat:latest)")
        return v.strip()

    @field_validator("gpus_per_pod", "timeout_seconds")
    @classmethod
    def _non_negative(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @field_validator("nnodes")
    @classmethod
    def _nodes(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"nnodes must be at least 1, got {v}")
        return v

    @field_validator("rdzv_port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 < v < 65536:
            raise ValueError(f"rdzv_port must be a TCP port (1-65535), got {v}")
        return v

    @field_validator("poll_interval_seconds")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"poll_interval_seconds must be > 0, got {v}")
        return v

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size")
    @classmethod
    def _quantity(cls, v: str, info) -> str:
        if v:
            try:
                amount = parse_quantity(v) if v == v.strip() else None
            except ValueError:
                amount = None
            if amount is None or amount < 0:
                raise ValueError(f"{info.field_name}={v!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
        return v

    @field_validator("namespace", "workspace_claim", "service_account_name", "env_from_secret")
    @classmethod
    def _name(cls, v: str, info) -> str:
        return _check_name(v, info.field_name)

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_name(name, "image_pull_secrets")
        return v

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, v: dict[str, str]) -> dict[str, str]:
        if error := _credentials_error(v, "extra_env"):
            raise ValueError(error)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> K8sTorchrunLauncher:
        if not self.namespace:
            raise ValueError("namespace must not be empty")
        if not self.base_dir.startswith("/"):
            raise ValueError(f"base_dir must be an absolute path in the pod, got {self.base_dir!r}")
        if self.gpus_per_pod and "/" not in self.gpu_resource_name:
            raise ValueError(f"gpu_resource_name must be a vendor-qualified resource such as nvidia.com/gpu, "
                             f"got {self.gpu_resource_name!r}")
        if self.workspace_claim and not self.workspace_root.startswith("/"):
            raise ValueError("workspace_claim needs workspace_root: the absolute path where the Dagster side mounts "
                             "that claim (the Workspace resource's root)")
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if request and limit and parse_quantity(request) > parse_quantity(limit):
                raise ValueError(f"{kind}_request={request!r} exceeds {kind}_limit={limit!r}")
        if self.load_incluster_config and (self.kubeconfig_file or self.kube_context):
            raise ValueError("load_incluster_config=True ignores kubeconfig_file/kube_context; set one or the other")
        return self

    def command(self, module: str, args: list[str], nproc: int, node_rank: int = 0, rendezvous: str = "") -> list[str]:
        # torch.distributed.run is what the `torchrun` script runs; going through `python` keeps one setting.
        if self.nnodes > 1:
            if not rendezvous:
                raise dg.Failure("a multi-node command needs the job's rendezvous name (see rendezvous_name)")
            # c10d ignores --node_rank and orders nodes by the address they announce: each pod announces its own
            # DNS name, which sorts like its node rank, so global rank 0 (the one reporting to Dagster) is node 0's.
            # Node 0 hosts the rendezvous store (is_host), so nobody waits for its DNS record to guess that.
            rdzv = rendezvous_args(self.nnodes, node_rank, "c10d", f"{node_host(rendezvous, 0, self.nnodes)}:"
                                   f"{self.rdzv_port}", rendezvous, node_host(rendezvous, node_rank, self.nnodes),
                                   is_host=node_rank == 0)
            return [self.python, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={nproc}",
                    "-m", module, *args]
        if nproc > 1:
            return [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", module, *args]
        return [self.python, "-m", module, *args]

    def pod_env(self, env: dict[str, str]) -> dict[str, str]:
        """The children's environment in the pod: host paths under the run directory moved to base_dir."""
        host_dir = env.get("NANOCHAT_BASE_DIR")
        pod_env = {k: _rebase(v, host_dir, self.base_dir) if host_dir else v for k, v in env.items()}
        pod_env.pop("NANOCHAT_COMPILE_DIR", None)  # a host path outside the mounted run dir: the pod uses its own
        # Python block-buffers stdout without a terminal: progress would reach the pod log in bursts.
        pod_env = {"PYTHONUNBUFFERED": "1", **pod_env, **self.extra_env}
        if error := _credentials_error(pod_env, "the run's environment"):
            raise dg.Failure(error)
        return pod_env

    def pod_spec(self, module: str, args: list[str], nproc: int, env: dict[str, str], node_rank: int = 0,
                 rendezvous: str = "") -> dict[str, Any]:
        """
        The PodSpec (camelCase, as the Kubernetes API spells it) that run() hands to PipesK8sClient; with nnodes > 1,
        that of node `node_rank` of the job named `rendezvous` (node 0 is the Pipes pod, the others are its peers).
        """
        self._check_processes(nproc, args)
        container: dict[str, Any] = {
            "name": "train",
            "image": self.image,
            "command": self.command(module, args, nproc, node_rank, rendezvous),
            "env": [{"name": k, "value": v} for k, v in self.pod_env(env).items()],
            # A failed container's last log lines become its termination message: they reach the Dagster error.
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        if resources := self._resources():
            container["resources"] = resources
        if self.env_from_secret:
            container["envFrom"] = [{"secretRef": {"name": self.env_from_secret}}]
        volumes, mounts = self._volumes(env.get("NANOCHAT_BASE_DIR"))
        if mounts:
            container["volumeMounts"] = mounts
        spec: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
        if self.nnodes > 1:
            # With the headless Service named like the subdomain, this pod resolves as <hostname>.<subdomain>.
            spec.update(hostname=node_host(rendezvous, node_rank, self.nnodes).split(".")[0], subdomain=rendezvous)
            container["ports"] = [{"name": "rdzv", "containerPort": self.rdzv_port}]
        optional = {
            "volumes": volumes,
            "nodeSelector": dict(self.node_selector),
            "tolerations": [t.to_k8s() for t in self.tolerations],
            "serviceAccountName": self.service_account_name,
            "imagePullSecrets": [{"name": name} for name in self.image_pull_secrets],
            "activeDeadlineSeconds": self.timeout_seconds,
        }
        spec.update({k: v for k, v in optional.items() if v})
        return spec

    def rendezvous_service(self, rendezvous: str) -> dict[str, Any]:
        """The headless Service that gives a multi-node job's pods their DNS names (<name>-<i>.<name>)."""
        return {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": rendezvous, "labels": {RENDEZVOUS_LABEL: rendezvous}},
            "spec": {
                "clusterIP": "None",
                "selector": {RENDEZVOUS_LABEL: rendezvous},
                # Names must resolve while the pods start, before anything could call them ready.
                "publishNotReadyAddresses": True,
                "ports": [{"name": "rdzv", "port": self.rdzv_port, "targetPort": self.rdzv_port}],
            },
        }

    def worker_pods(self, module: str, args: list[str], nproc: int, env: dict[str, str],
                    rendezvous: str) -> list[dict[str, Any]]:
        """The pods of nodes 1..nnodes-1 (node 0 is the Pipes pod), as Pod manifests."""
        return [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": node_host(rendezvous, rank, self.nnodes).split(".")[0],
                              "labels": {RENDEZVOUS_LABEL: rendezvous}},
                 "spec": self.pod_spec(module, args, nproc, env, rank, rendezvous)}
                for rank in range(1, self.nnodes)]

    def client(self) -> PipesK8sClient:
        # Construction only records the settings; the kubeconfig is read when run() starts a pod.
        return PipesK8sClient(load_incluster_config=self.load_incluster_config,
                              kubeconfig_file=self.kubeconfig_file or None, kube_context=self.kube_context or None,
                              poll_interval=self.poll_interval_seconds)

    def launch(self, context: dg.AssetExecutionContext, module: str, args: list[str], nproc: int,
               env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
        rendezvous = rendezvous_name(module, context.run.run_id) if self.nnodes > 1 else ""
        spec = self.pod_spec(module, args, nproc, env, 0, rendezvous)
        validate_pod_spec(spec)  # a malformed spec fails here, not as an API error after the asset has started
        workers = self.worker_pods(module, args, nproc, env, rendezvous) if rendezvous else []
        for worker in workers:
            validate_pod_spec(worker["spec"])
        command = shlex.join(spec["containers"][0]["command"])
        if 0 < nproc < self.gpus_per_pod:
            context.log.warning(f"{nproc} process(es) on a pod holding {self.gpus_per_pod} GPUs: the rest sit idle")
        context.log.info(f"launching {self.nnodes} pod(s) in namespace {self.namespace} ({self.image}): {command}")
        peers = _Peers(self, context, rendezvous, workers)
        try:
            peers.start()
            return self.client().run(context=context, namespace=self.namespace, base_pod_spec=spec,
                                     base_pod_meta={"labels": {RENDEZVOUS_LABEL: rendezvous}} if rendezvous else None,
                                     pod_wait_timeout=float(self.timeout_seconds),
                                     delete_pod_on_completion=self.delete_pod_on_completion)
        except (DagsterK8sError, kubernetes.client.ApiException, kubernetes.config.ConfigException, HTTPError) as e:
            # DagsterK8sError: the pod failed or timed out (its message carries the container's log tail);
            # the others: the cluster refused the pod or could not be reached.
            reason = ("the pod failed or timed out" if isinstance(e, DagsterK8sError)
                      else "the cluster refused the pod or could not be reached")
            raise LaunchFailed(reason, f"{type(e).__name__}: {e}",
                               {"command": command, "namespace": self.namespace, "image": self.image,
                                "pod_error": str(e)}) from e
        finally:
            peers.stop()

    def where(self) -> str:
        return f" on Kubernetes (namespace {self.namespace}, image {self.image})"

    def translate_result(self, result: dict, env: dict[str, str]) -> dict:
        # e.g. checkpoint_dir: the pod's path of a file the asset reads next on the Dagster side
        host_dir = env.get("NANOCHAT_BASE_DIR")
        if not host_dir:
            return result
        return {k: _rebase(v, self.base_dir, host_dir) if isinstance(v, str) else v for k, v in result.items()}

    def core_api(self) -> kubernetes.client.CoreV1Api:
        """The Kubernetes API, reached the way PipesK8sClient reaches it (for the peers of a multi-node job)."""
        if self.load_incluster_config or (self.load_incluster_config is None and not self.kubeconfig_file
                                          and not self.kube_context and os.getenv("KUBERNETES_SERVICE_HOST")):
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(config_file=self.kubeconfig_file or None,
                                               context=self.kube_context or None)
        return kubernetes.client.CoreV1Api()

    def _check_processes(self, nproc: int, args: list[str]) -> None:
        if nproc < 1:
            raise dg.Failure(f"nproc must be at least 1, got {nproc}")
        if self.gpus_per_pod and nproc > self.gpus_per_pod:
            raise dg.Failure(f"the run asks for {nproc} processes but the launcher's gpus_per_pod is "
                             f"{self.gpus_per_pod}: raise gpus_per_pod or lower the profile's nproc_per_node")
        if not self.gpus_per_pod and "--device-type=cuda" in args:
            raise dg.Failure("the run asks for --device-type=cuda but the launcher's gpus_per_pod is 0 (a CPU pod)")

    def _resources(self) -> dict[str, dict[str, str]]:
        # An extended resource such as a GPU is requested through its limit alone (the request defaults to it).
        limits = {self.gpu_resource_name: str(self.gpus_per_pod)} if self.gpus_per_pod else {}
        limits.update({k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v})
        requests = {k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v}
        return {k: v for k, v in (("limits", limits), ("requests", requests)) if v}

    def _volumes(self, host_dir: str | None) -> tuple[list[dict], list[dict]]:
        volumes: list[dict] = []
        mounts: list[dict] = []
        if self.shm_size:
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}})
            mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        if self.workspace_claim:
            volumes.append({"name": "workspace", "persistentVolumeClaim": {"claimName": self.workspace_claim}})
            mount = {"name": "workspace", "mountPath": self.base_dir}
            if host_dir:
                sub_path = posixpath.relpath(host_dir, self.workspace_root)
                if sub_path.startswith(".."):
                    raise dg.Failure(f"the run directory {host_dir} is not under workspace_root "
                                     f"{self.workspace_root}: point the Workspace resource's root at the claim")
                mount["subPath"] = sub_path
            mounts.append(mount)
        return volumes, mounts


def rendezvous_name(module: str, run_id: str, suffix: str | None = None) -> str:
    """
    A DNS label naming one multi-node job: its Service, its pods' subdomain and its c10d rendezvous id. The random
    suffix keeps a retried step clear of the previous attempt's pods, which may still be terminating.
    """
    stage = module.rsplit(".", 1)[-1].replace("_", "-").lower()
    suffix = secrets.token_hex(2) if suffix is None else suffix
    return f"nanochat-{stage[:30]}-{run_id.replace('-', '')[:8]}-{suffix}".lower()


def node_host(rendezvous: str, node_rank: int, nnodes: int) -> str:
    """`<name>-<rank>.<name>`: a pod's DNS name in its namespace. Ranks are zero-padded so the names sort by rank."""
    return f"{rendezvous}-{node_rank:0{len(str(nnodes - 1))}d}.{rendezvous}"


class _Peers:
    """The Service and the pods of nodes 1..N-1 of a multi-node job: created before node 0, deleted after it."""

    def __init__(self, launcher: K8sTorchrunLauncher, context, rendezvous: str, workers: list[dict]) -> None:
        self.launcher, self.context, self.rendezvous, self.workers = launcher, context, rendezvous, workers
        self.api: kubernetes.client.CoreV1Api | None = None
        self.created: list[str] = []

    def start(self) -> None:
        if not self.rendezvous:
            return
        self.api = self.launcher.core_api()
        namespace = self.launcher.namespace
        self.api.create_namespaced_service(namespace, self.launcher.rendezvous_service(self.rendezvous))
        for pod in self.workers:
            self.api.create_namespaced_pod(namespace, pod)
            self.created.append(pod["metadata"]["name"])
        self.context.log.info(f"created Service {self.rendezvous} and peer pod(s) {', '.join(self.created)}")

    def stop(self) -> None:
        # Node 0 is done (or failed): its peers would otherwise hold their GPUs until the rendezvous times out.
        if self.api is None:
            return
        namespace = self.launcher.namespace
        names = self.created if self.launcher.delete_pod_on_completion else []
        for name in names:
            _ignore_missing(lambda n=name: self.api.delete_namespaced_pod(n, namespace))
        _ignore_missing(lambda: self.api.delete_namespaced_service(self.rendezvous, namespace))


def _ignore_missing(call) -> None:
    try:
        call()
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


def validate_pod_spec(spec: dict[str, Any]) -> kubernetes.client.V1PodSpec:
    """
    Check a camelCase PodSpec against the Kubernetes client's schema, without a cluster: deserialize it into
    V1PodSpec as if the API server had sent it, serialize it back, and require every field to survive. The client
    silently drops keys it does not know (a typo such as `nodeSelecter`), so a lost field means an invalid spec.
    """
    api = kubernetes.client.ApiClient()
    model = api.deserialize(SimpleNamespace(data=json.dumps(spec)), "V1PodSpec")
    lost = _lost_fields(spec, api.sanitize_for_serialization(model), "spec")
    if lost:
        raise ValueError(f"not valid PodSpec fields (or wrongly typed values): {', '.join(lost)}")
    return model


def _lost_fields(sent: Any, kept: Any, path: str) -> list[str]:
    if isinstance(sent, dict) and isinstance(kept, dict):
        lost = []
        for key, value in sent.items():
            lost += _lost_fields(value, kept[key], f"{path}.{key}") if key in kept else [f"{path}.{key}"]
        return lost
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [p for i, (a, b) in enumerate(zip(sent, kept)) for p in _lost_fields(a, b, f"{path}[{i}]")]
    return [] if sent == kept else [path]
