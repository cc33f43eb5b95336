// The manifest as a typed value, for code and tests. The agent and the LumenFlow platform read
// manifest.yaml beside package.json: keep the two the same (a test checks the kinds match).
import type { PackManifest } from './lumenflow/lumenflow-pack.mjs';

export const {{CONST}}_MANIFEST: PackManifest = {
  id: '{{NAME}}',
  version: '0.1.0',
  task_types: ['{{NAME}}'],
  tools: [],
  policies: [],
  emitted_event_kinds: ['{{NAME}}:job_completed'],
  subscribed_event_kinds: ['conductor:recovery_requested'],
  backpressure_policy: {
    '{{NAME}}:job_completed': 'queue',
  },
  surfaces_required: ['http'],
};
