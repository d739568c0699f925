"""
Launch nanochat entry points as external processes through Dagster Pipes.

`TorchrunLauncher` runs `torchrun --standalone --nproc_per_node=N -m nanochat.<entry> ...` (plain `python -m`
for one process) with `PipesSubprocessClient`: rank 0 streams progress messages and reports its result
(checkpoint dir, step, losses, tok/s, MFU) back; other ranks never touch the Pipes channel. Cancelling the run
in the UI terminates the process tree (forward_termination); a failure raises with the exit code and the
child's own exception, which rank 0 reports through Pipes before exiting.
"""

from __future__ import annotations

import shlex
import sys
import time

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError


class TorchrunLauncher(dg.ConfigurableResource):
    python: str = ""  # the interpreter for the children; default: this one
    termination_timeout_seconds: float = 20.0

    def command(self, module: str, args: list[str], nproc: int) -> list[str]:
        python = self.python or sys.executable
        if nproc > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", module, *args]
        return [python, "-m", module, *args]

    def run(self, context: dg.AssetExecutionContext, module: str, args: list[str], nproc: int,
            env: dict[str, str]) -> tuple[dict, list[dict], float]:
        """Run to completion; return (reported result metadata, progress messages, wall seconds)."""
        command = self.command(module, args, nproc)
        context.log.info(f"launching: {shlex.join(command)}")
        client = dg.PipesSubprocessClient(forward_termination=True,
                                          termination_timeout_seconds=self.termination_timeout_seconds)
        t0 = time.time()
        try:
            invocation = client.run(context=context, command=command, env=env)
        except DagsterPipesExecutionError as e:
            child_error = reported_exception(context)
            raise dg.Failure(
                description=f"{module} failed after {time.time() - t0:.0f}s: {e}."
                            + (f" The child raised: {child_error}" if child_error else "")
                            + " Its stdout/stderr are in this step's compute logs.",
                metadata={"command": shlex.join(command), "child_error": child_error or "not reported"},
            ) from e
        wall = time.time() - t0
        result: dict = {}
        for materialization in invocation.get_results():
            result.update({k: v.value for k, v in (materialization.metadata or {}).items()})
        if not result:
            raise dg.Failure(f"{module} exited 0 but reported no result through Dagster Pipes")
        return result, list(invocation.get_custom_messages()), wall


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
