"""{{NAME}}: handles conductor:recovery_requested for its own jobs ({{NAME}}-job-*) and emits
{{NAME}}:job_completed. Run `lumenflow-agent conformance .` in this folder after edits."""

from lumenflow_pack import build_kernel_event_v2


def run_job(sync_port, workspace_identity, job_id):
    """The quickstart's runJob: builds the event with an idempotency key and pushes it."""
    result = "ok"
    event = build_kernel_event_v2(
        {"kind": "{{NAME}}:job_completed", "from": workspace_identity, "job_id": job_id, "result": result},
        idempotency_key=f"{job_id}:completed",
    )
    sync_port.push_kernel_events([event])


def on_recovery_requested(event, ctx):
    replay_key = f"{{NAME}}:recover:{event['event_id']}"

    # At-least-once delivery: the same event may come twice. Check before the effect...
    if ctx.replay_log.has(replay_key):
        return {"status": "replayed", "action": "noop"}

    # Only handle recoveries targeted at this pack's jobs.
    if not str(event["payload"].get("wu_id", "")).startswith("{{NAME}}-job-"):
        return {"status": "ignored", "action": "wrong-pack"}

    ctx.mark_job_recovered(event["payload"]["wu_id"])
    # ...and record it after.
    ctx.replay_log.put(replay_key)
    return {"status": "handled", "action": "recovered"}
