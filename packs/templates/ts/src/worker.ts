// The worker the agent starts (manifest.yaml `runtime.command`: node --import tsx
// src/worker.ts). Only this file calls runPack: importing the handlers in tests starts nothing.
import { runPack } from './lumenflow/lumenflow-pack.mjs';
import { runJob } from './emit';
import { onRecoveryRequested } from './handlers/recovery-requested';

runPack({
  handlers: {
    'conductor:recovery_requested': onRecoveryRequested,
  },
  // The services your handlers get besides replayLog, emit and log.
  context: (ctx) => ({
    // An upsert-shaped effect: recovering a job emits its {{NAME}}:job_completed, with an
    // idempotency key, so doing it twice yields the same event.
    markJobRecovered: (jobId: string) =>
      runJob({ syncPort: ctx.syncPort, workspaceIdentity: ctx.workspace?.identity ?? '{{NAME}}', jobId }),
  }),
});
