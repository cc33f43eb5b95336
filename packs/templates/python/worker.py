"""The worker the agent starts (manifest.yaml `runtime.command`: python3 -u worker.py). Only
this file calls run_pack: importing the handlers in tests starts nothing."""

from handlers import on_recovery_requested, run_job
from lumenflow_pack import run_pack


def services(ctx):
    """The services your handlers get besides replay_log, emit, sync_port and log."""
    return {
        # An upsert-shaped effect: recovering a job twice emits the same event (same id).
        "mark_job_recovered": lambda job_id: run_job(ctx.sync_port, ctx.workspace["identity"], job_id),
    }


if __name__ == "__main__":
    run_pack(handlers={"conductor:recovery_requested": on_recovery_requested}, context=services)
