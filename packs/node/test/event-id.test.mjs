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
