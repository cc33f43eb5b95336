// testing.mjs: a test kit for lumenflow-agent packs, for unit tests of handlers without an
// agent (vitest, node:test, jest). Dependency-free.
//
//   import { createTestContext, recoveryRequested } from './lumenflow/testing.mjs';
//   const ctx = createTestContext({ markJobRecovered: vi.fn() });
//   const first = await onRecoveryRequested(recoveryRequested('acme-job-1'), ctx);
//   const second = await onRecoveryRequested(recoveryRequested('acme-job-1'), ctx);
//   // first.status === 'handled', second.status === 'replayed'
//
// The context is the one a handler gets from the agent, in memory: a replay log (a Set), emits
// captured in order (with the event_id the agent would give them), `syncPort` capturing pushed
// events, and whatever services you pass in (`extra`).

import { buildKernelEventV2, eventId, uuidv7, IDEMPOTENCY_KEY } from './lumenflow-pack.mjs';

export function createTestContext(extra = {}, { workspace = 'ws-test', pack = 'test-pack' } = {}) {
  const keys = new Set();
  const emitted = [];
  const pushed = [];
  const lines = [];
  const log = (level) => (...parts) => lines.push({ level, message: parts.map(String).join(' ') });
  const ctx = {
    pack,
    workspace: { root: process.cwd(), identity: workspace },
    attempt: 1,
    redelivered: false,
    replayLog: {
      has: async (key) => keys.has(String(key)),
      put: async (key) => {
        keys.add(String(key));
      },
      keys,
    },
    emit: async (kind, payload = {}, { idempotencyKey } = {}) => {
      const event_id = idempotencyKey === undefined ? uuidv7() : eventId(workspace, kind, String(idempotencyKey));
      emitted.push({ kind, payload, idempotencyKey, event_id });
      return event_id;
    },
    syncPort: {
      pushKernelEvents: async (events) => {
        pushed.push(...events);
        for (const e of events) {
          emitted.push({ kind: e.kind, payload: e.payload, idempotencyKey: e[IDEMPOTENCY_KEY], event_id: e.event_id });
        }
        return { accepted: events.length };
      },
    },
    log: { debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error') },
    /** What the handlers emitted, in order. */
    emitted,
    /** Events pushed through `syncPort`. */
    pushed,
    /** What they logged. */
    logged: lines,
    ...extra,
  };
  return ctx;
}

// A `conductor:recovery_requested` event as the agent delivers it.
export function recoveryRequested(wuId, { eventId: id = 'evt-abc', from = 'conductor' } = {}) {
  return { ...buildKernelEventV2({ kind: 'conductor:recovery_requested', from, wu_id: wuId }), event_id: id };
}

// Any inbound event as the agent delivers it.
export function inboundEvent(kind, payload = {}, { eventId: id, from = 'conductor', timestamp } = {}) {
  const e = buildKernelEventV2({ kind, from, payload }, { timestamp });
  return id === undefined ? e : { ...e, event_id: id };
}
