// acme-demo: the quickstart's pack, for real.
// Handles conductor:recovery_requested for this pack's jobs (acme-job-*), and emits
// acme-demo:job_completed (ephemeral) when a job is recovered or run.

import { runPack } from './lumenflow-pack.mjs';

// runJob-style emit: the same idempotency key makes a retry produce the same event_id.
export async function runJob(ctx, jobId, result = 'ok') {
  return ctx.emit('acme-demo:job_completed', { job_id: jobId, result }, { idempotencyKey: `${jobId}:completed` });
}

// An upsert-shaped effect: recovering the same job twice emits the same event (same id).
async function markJobRecovered(ctx, jobId) {
  await runJob(ctx, jobId, 'recovered');
}

export const onRecoveryRequested = async (event, ctx) => {
  const replayKey = `acme-demo:recover:${event.event_id}`;

  if (await ctx.replayLog.has(replayKey)) {
    return { status: 'replayed', action: 'noop' };
  }

  // Only handle recoveries targeted at this pack's jobs.
  const wuId = String(event.payload?.wu_id ?? '');
  if (!wuId.startsWith('acme-job-')) {
    return { status: 'ignored', action: 'wrong-pack' };
  }

  await markJobRecovered(ctx, wuId);
  await ctx.replayLog.put(replayKey);

  return { status: 'handled', action: 'recovered' };
};

runPack({
  handlers: {
    'conductor:recovery_requested': onRecoveryRequested,
  },
});
