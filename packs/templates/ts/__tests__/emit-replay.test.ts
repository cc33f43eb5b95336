import { describe, expect, it, vi } from 'vitest';
import { readFileSync } from 'node:fs';
import { runJob } from '../src/emit';
import { onRecoveryRequested } from '../src/handlers/recovery-requested';
import { {{CONST}}_MANIFEST } from '../src/manifest';

describe('{{NAME}} pack', () => {
  it('emits a namespaced kind through buildKernelEventV2', async () => {
    const pushKernelEvents = vi.fn().mockResolvedValue(undefined);
    const syncPort = { pushKernelEvents } as never;

    await runJob({
      syncPort,
      workspaceIdentity: 'ws-test',
      jobId: 'job-1',
    });

    expect(pushKernelEvents).toHaveBeenCalledOnce();
    const [events] = pushKernelEvents.mock.calls[0]!;
    expect(events[0].kind).toBe('{{NAME}}:job_completed');
    expect(events[0].schema_version).toBe(2);
    expect(events[0].event_id).toBeDefined();
    expect(events[0].from).toBe('ws-test');
  });

  it('handler is idempotent under replay', async () => {
    const seen = new Set<string>();
    const markJobRecovered = vi.fn().mockResolvedValue(undefined);
    const ctx = {
      replayLog: {
        has: async (k: string) => seen.has(k),
        put: async (k: string) => {
          seen.add(k);
        },
      },
      markJobRecovered,
    };

    const event = {
      schema_version: 2 as const,
      kind: 'conductor:recovery_requested' as const,
      event_id: 'evt-abc',
      timestamp: '2026-04-20T00:00:00Z',
      from: 'ws-test',
      payload: { wu_id: '{{NAME}}-job-1' },
    } as never;

    const first = await onRecoveryRequested(event, ctx);
    const second = await onRecoveryRequested(event, ctx);

    expect(first.status).toBe('handled');
    expect(second.status).toBe('replayed');
    expect(markJobRecovered).toHaveBeenCalledOnce(); // NOT twice
  });

  it('manifest.ts declares the kinds manifest.yaml declares', () => {
    const yaml = readFileSync(new URL('../manifest.yaml', import.meta.url), 'utf8');
    for (const kind of [
      ...{{CONST}}_MANIFEST.emitted_event_kinds,
      ...{{CONST}}_MANIFEST.subscribed_event_kinds,
    ]) {
      expect(yaml).toContain(`"${kind}"`);
    }
  });
});
