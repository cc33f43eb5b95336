import type { PackEventHandler } from '../lumenflow/lumenflow-pack.mjs';

export interface RecoveryContext {
  replayLog: {
    has(key: string): Promise<boolean>;
    put(key: string): Promise<void>;
  };
  markJobRecovered(jobId: string): Promise<void>;
}

export const onRecoveryRequested: PackEventHandler<
  'conductor:recovery_requested',
  RecoveryContext
> = async (event, ctx) => {
  const replayKey = `{{NAME}}:recover:${event.event_id}`;

  if (await ctx.replayLog.has(replayKey)) {
    return { status: 'replayed', action: 'noop' };
  }

  // Only handle recoveries targeted at this pack's jobs.
  if (!event.payload.wu_id.startsWith('{{NAME}}-job-')) {
    return { status: 'ignored', action: 'wrong-pack' };
  }

  await ctx.markJobRecovered(event.payload.wu_id);
  await ctx.replayLog.put(replayKey);

  return { status: 'handled', action: 'recovered' };
};
