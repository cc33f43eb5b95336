// The Node helper's event ids against the published vectors (packs/event-id-vectors.json).
// Run: node --test packs/node/test/event-id.test.mjs
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { EVENT_ID_NAMESPACE, eventId } from '../lumenflow-pack.mjs';

const doc = JSON.parse(readFileSync(new URL('../../event-id-vectors.json', import.meta.url), 'utf8'));

test('namespace is the published one', () => {
  assert.equal(EVENT_ID_NAMESPACE, doc.namespace.uuid);
});

test('every published vector', () => {
  assert.ok(doc.vectors.length >= 8);
  for (const v of doc.vectors) {
    assert.equal(eventId(v.from, v.kind, v.idempotency_key), v.event_id, JSON.stringify(v));
  }
});

test('buildKernelEventV2 gives a keyed event the published id', async () => {
  const { buildKernelEventV2 } = await import('../lumenflow-pack.mjs');
  for (const v of doc.vectors) {
    const e = buildKernelEventV2({ kind: v.kind, from: v.from, n: 1 }, { idempotencyKey: v.idempotency_key });
    assert.equal(e.event_id, v.event_id);
    assert.equal(e.schema_version, 2);
    assert.deepEqual(e.payload, { n: 1 });
    assert.match(e.timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
  }
  const { uuidv7 } = await import('../lumenflow-pack.mjs');
  const a = uuidv7(1_700_000_000_000);
  assert.match(a, /^018bcfe5-6800-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});

test('the test kit captures emits with the ids the agent would give', async () => {
  const { createTestContext } = await import('../testing.mjs');
  const ctx = createTestContext({ extra: 1 });
  const id = await ctx.emit('acme-demo:job_completed', { job_id: 'job-1' }, { idempotencyKey: 'job-1:completed' });
  assert.equal(id, 'fb5c5f73-6729-525c-a307-a4fbe90b0695');
  assert.equal(ctx.emitted.length, 1);
  assert.equal(await ctx.replayLog.has('k'), false);
  await ctx.replayLog.put('k');
  assert.equal(await ctx.replayLog.has('k'), true);
  assert.equal(ctx.extra, 1);
});
