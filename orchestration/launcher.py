"""
Launch nanochat entry points as external processes through Dagster Pipes.

`Launcher` is the interface the training and eval assets take (their `launcher` resource): `run(context, module,
args, nproc, env)` returns (reported result, progress messages, wall seconds) and fails the step with one message
shape for every launcher: what failed and after how long, where, the exception the child reported through Pipes,
then the launcher's own details (the last log lines here, the pod's state on Kubernetes). Subclasses only start the
process (`launch`), and say where it ran and how many ranks it spans (`world_size`, which resume fingerprints use).

`TorchrunLauncher` runs `torchrun --standalone --nproc_per_node=N -m nanochat.<entry> ...` (plain `python -m`
for one process) with `PipesSubprocessClient`: rank 0 streams progress messages and reports its result
(checkpoint dir, step, losses, tok/s, MFU) back; other ranks never touch the Pipes channel. Cancelling the run
in the UI terminates the process tree (forward_termination); a failure raises with the exit code and the
child's own exception, which rank 0 reports through Pipes before exiting.

Multi-node: with `nnodes > 1` the same launcher starts this machine's share of a job spanning several machines
(`torchrun --nnodes=N --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=ID ...`). Dagster
launches node 0; every other node runs the same command with its own node_rank (by hand, a scheduler, or
`K8sTorchrunLauncher` on Kubernetes). Only global rank 0 reports through Pipes, so it must live on the node Dagster
launched: the c10d rendezvous ignores --node_rank and orders nodes by address (`--local_addr`, else the host's
FQDN), hence `local_addr`; the static backend honours node_rank as given. See infra/README.md.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError
from pydantic import model_validator

RDZV_BACKENDS = ("c10d", "static")


class LaunchFailed(Exception):
    """Raised by `Launcher.launch`: the process failed; `reason` is one line, `details` and `metadata` extra."""

    def __init__(self, reason: str, details: str = "", metadata: dict | None = None) -> None:
        super().__init__(reason)
        self.reason, self.details, self.metadata = reason, details, metadata or {}


class Launcher(dg.ConfigurableResource, ABC):
    """Runs a nanochat entry point to completion through Dagster Pipes; annotate assets with this type."""

    nnodes: int = 1  # machines (or pods) one job spans

    def world_size(self, nproc: int) -> int:
        """The ranks of a job that runs `nproc` processes per node."""
        return nproc * self.nnodes

    @abstractmethod
    def launch(self, context: dg.AssetExecutionContext, module: str, args: list[str], nproc: int,
               env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
        """Start the job and wait for it; raise LaunchFailed when it fails."""

    def where(self) -> str:
        """Where the job runs, for a failure message (e.g. " on Kubernetes (namespace x, image y)")."""
        return ""

    def translate_result(self, result: dict, env: dict[str, str]) -> dict:
        """Reported values as the Dagster side sees them (a pod's paths become the host's)."""
        return result

    def run(self, context: dg.AssetExecutionContext, module: str, args: list[str], nproc: int,
            env: dict[str, str]) -> tuple[dict, list[dict], float]:
        """Run to completion; return (reported result metadata, progress messages, wall seconds)."""
        t0 = time.time()
        try:
            invocation = self.launch(context, module, args, nproc, env)
        except LaunchFailed as e:
            child_error = reported_exception(context)
            raise dg.Failure(
                description=f"{module} failed after {time.time() - t0:.0f}s{self.where()}: {e.reason}."
                            + (f" The child raised: {child_error}" if child_error else "")
                            + (f"\n{e.details}" if e.details else ""),
                metadata={**e.metadata, "child_error": child_error or "not reported"},
            ) from e.__cause__
        wall = time.time() - t0
        result, messages = pipes_result(invocation, module)
        return self.translate_result(result, env), messages, wall


def pipes_result(invocation: dg.PipesClientCompletedInvocation, module: str) -> tuple[dict, list[dict]]:
    """(the reported materialization metadata, the progress messages) of a finished Pipes invocation."""
    result: dict = {}
    for materialization in invocation.get_results():
        result.update({k: v.value for k, v in (materialization.metadata or {}).items()})
    if not result:
        raise dg.Failure(f"{module} exited 0 but reported no result through Dagster Pipes")
    return result, list(invocation.get_custom_messages())


class TorchrunLauncher(Launcher):
    """torchrun (or plain python for one process) on this machine, through PipesSubprocessClient."""

    python: str = ""  # the interpreter for the children; default: this one
    termination_timeout_seconds: float = 20.0
    # Multi-node rendezvous (ignored when nnodes == 1, which runs `--standalone` on this machine alone).
    node_rank: int = 0  # this machine's place among the nnodes; Dagster normally launches node 0
    rdzv_endpoint: str = ""  # HOST:PORT of node 0, reachable from every node (c10d hosts its store there)
    rdzv_id: str = "nanochat"  # the job's name in the rendezvous: the same on every node, new for each job
    rdzv_backend: str = "c10d"
    # The address this node announces (torchrun --local_addr). c10d orders nodes by it, so give node 0 the address
    # that sorts first; it must resolve from the other nodes (rank 0's becomes MASTER_ADDR). Empty: the host's FQDN.
    local_addr: str = ""

    @model_validator(mode="after")
    def _rendezvous(self) -> TorchrunLauncher:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if self.rdzv_backend not in RDZV_BACKENDS:
                raise ValueError(f"rdzv_backend must be one of {', '.join(RDZV_BACKENDS)}, got {self.rdzv_backend!r}")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"nnodes={self.nnodes} needs rdzv_endpoint=HOST:PORT of node 0 (e.g. "
                                 f"10.0.0.1:29400), got {self.rdzv_endpoint!r}")
            if not self.rdzv_id.strip():
                raise ValueError("rdzv_id must name the job (the same on every node)")
        return self

    def command(self, module: str, args: list[str], nproc: int) -> list[str]:
        python = self.python or sys.executable
        if self.nnodes > 1:
            return [python, "-m", "torch.distributed.run", *rendezvous_args(
                self.nnodes, self.node_rank, self.rdzv_backend, self.rdzv_endpoint, self.rdzv_id, self.local_addr),
                f"--nproc_per_node={nproc}", "-m", module, *args]
        if nproc > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", module, *args]
        return [python, "-m", module, *args]

    def launch(self, context: dg.AssetExecutionContext, module: str, args: list[str], nproc: int,
               env: dict[str, str]) -> dg.PipesClientCompletedInvocation:
        command = self.command(module, args, nproc)
        context.log.info(f"launching: {shlex.join(command)}")
        client = dg.PipesSubprocessClient(forward_termination=True,
                                          termination_timeout_seconds=self.termination_timeout_seconds)
        # Every rank tees its output here (nanochat.pipes), so a failure can show its last lines.
        log_dir = Path(env.get("NANOCHAT_BASE_DIR") or tempfile.mkdtemp(prefix="nanochat-logs-")) / "logs"
        log_file = log_dir / f"{module.rsplit('.', 1)[-1]}-{int(time.time())}.log"
        try:
            return client.run(context=context, command=command, env={**env, "NANOCHAT_LOG_FILE": str(log_file)})
        except DagsterPipesExecutionError as e:
            tail = log_tail(log_file)
            raise LaunchFailed(
                str(e), (f"Last output lines:\n{tail}\n" if tail else "")
                + "The full stdout/stderr are in this step's compute logs.",
                {"command": shlex.join(command), "last_log_lines": dg.MetadataValue.text(tail or "none captured"),
                 "log_files": str(log_dir)},
            ) from e


def log_tail(log_file: Path, lines: int = 20) -> str:
    """The last lines each rank wrote (<log_file>.rank<R>), rank 0 first."""
    parts = []
    for path in sorted(log_file.parent.glob(log_file.name + ".rank*"), key=lambda p: int(p.suffix[5:] or 0)):
        text = path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()[-lines:]
        if text:
            parts.append(f"[{path.suffix[1:]}]\n" + "\n".join(text))
    return "\n".join(parts)


def rendezvous_args(nnodes: int, node_rank: int, backend: str, endpoint: str, rdzv_id: str,
                    local_addr: str = "", is_host: bool | None = None) -> list[str]:
    """torchrun's multi-node arguments (shared with K8sTorchrunLauncher so both spell them the same way)."""
    argv = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--rdzv_backend={backend}",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}"]
    if is_host is not None:  # c10d: host the rendezvous store here, instead of guessing from the hostname
        argv.append(f"--rdzv_conf=is_host={int(is_host)}")
    if local_addr:
        argv.append(f"--local_addr={local_addr}")
    return argv


def reported_exception(context: dg.AssetExecutionContext) -> str | None:
    """The exception rank 0 reported through Pipes before exiting (Dagster logs it as an engine event)."""
    records = context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    step = context.op_execution_context.op.name
    for record in reversed([r for r in records if r.step_key == step]):
        event = record.dagster_event
        error = getattr(event.event_specific_data, "error", None) if event else None
        if error is not None and "closed with exception" in (record.user_message or ""):
            return error.message.strip()
    return None
