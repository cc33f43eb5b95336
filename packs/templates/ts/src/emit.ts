import { buildKernelEventV2 } from './lumenflow/lumenflow-pack.mjs';
import type { SyncPort } from './lumenflow/lumenflow-pack.mjs';

export interface JobContext {
  syncPort: SyncPort;
  workspaceIdentity: string; // the workspace identity (`ctx.workspace` in a handler)
  jobId: string;
}

export async function runJob(ctx: JobContext): Promise<void> {
  // Your business logic here. The mock "job" completes instantly.
  const result = 'ok';

  const event = buildKernelEventV2(
    {
      kind: '{{NAME}}:job_completed',
      from: ctx.workspaceIdentity,
      job_id: ctx.jobId,
      result,
    },
    { idempotencyKey: `${ctx.jobId}:completed` },
  );

  // `queue` per manifest: durable; the agent delivers it upstream in order.
  await ctx.syncPort.pushKernelEvents([event]);
}
