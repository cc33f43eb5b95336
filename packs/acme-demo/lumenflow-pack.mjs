// lumenflow-pack.mjs: the dependency-free Node helper for lumenflow-agent exec packs.
//
// A pack's handler program imports it and calls runPack({ handlers }). The helper speaks the
// agent's protocol (JSON-RPC 2.0 over stdin/stdout, one message per line) so a handler is
// written exactly like the quickstart's:
//
//   export const onRecoveryRequested = async (event, ctx) => {
//     if (await ctx.replayLog.has(key)) return { status: 'replayed', action: 'noop' };
//     ...
//     await ctx.emit('acme-demo:job_completed', { job_id }, { idempotencyKey: `${job_id}:completed` });
//     await ctx.replayLog.put(key);
//     return { status: 'handled', action: 'recovered' };
//   };
//   runPack({ handlers: { 'conductor:recovery_requested': onRecoveryRequested } });
//
// Events are handled one at a time, in the order the agent sends them (or up to
// `runtime.concurrency` at once, started in that order, when the manifest sets it). What a handler emits
// and the keys it puts are committed by the agent together with the handler's outcome: if the
// handler throws, or the worker dies, before it returns, none of them is kept and the event is
// delivered again. stdout belongs to the protocol: console.log is redirected to stderr, which
// the agent forwards to its log.

import { createHash, randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';

export const PROTOCOL_VERSION = 1;

// The event-id namespace: uuid5(NAMESPACE_URL, "https://lumenflow.dev/ns/event-id"). Test
// vectors: packs/event-id-vectors.json.
export const EVENT_ID_NAMESPACE = 'd103d564-ba4b-52ca-bb35-fb3fa51d85e3';

// The event id the agent gives an event with an idempotency key: UUIDv5 (RFC 9562) in
// EVENT_ID_NAMESPACE over `from`, NUL, `kind`, NUL, `key` (UTF-8). A producer can know the id
// of what it emits before the agent answers, and a retry yields the same id.
export function eventId(from, kind, key) {
  const ns = Buffer.from(EVENT_ID_NAMESPACE.replace(/-/g, ''), 'hex');
  const name = Buffer.from(`${from}\0${kind}\0${key}`, 'utf8');
  const h = createHash('sha1').update(ns).update(name).digest().subarray(0, 16);
  h[6] = (h[6] & 0x0f) | 0x50;
  h[8] = (h[8] & 0x3f) | 0x80;
  return uuidText(h.toString('hex'));
}

const hex = (b) => b.toString('hex');
const uuidText = (x) => `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;

// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Time-ordered, like the
// ids the agent gives events without an idempotency key.
export function uuidv7(now = Date.now()) {
  const b = randomBytes(16);
  const ms = BigInt(now);
  for (let i = 0; i < 6; i++) b[i] = Number((ms >> BigInt(8 * (5 - i))) & 0xffn);
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  return uuidText(hex(b));
}

// The idempotency key an event was built with (not serialized: JSON.stringify skips symbols).
export const IDEMPOTENCY_KEY = Symbol.for('lumenflow.idempotencyKey');

// The quickstart's builder: `buildKernelEventV2({kind, from, ...payload}, {idempotencyKey})`
// returns a complete v2 envelope `{schema_version: 2, event_id, kind, timestamp, from,
// payload}`. With a key the id is `eventId(from, kind, key)` (a retry yields the same id, as
// the agent computes it); without one, a UUIDv7. `fields.payload`, when given, is the payload
// as it is; otherwise every field but `kind` and `from` is.
export function buildKernelEventV2(fields, { idempotencyKey, timestamp } = {}) {
  const { kind, from, payload, ...rest } = fields ?? {};
  if (typeof kind !== 'string' || !/^[a-z0-9]+(-[a-z0-9]+)*:[a-z][a-z0-9_]*$/.test(kind)) {
    throw new Error(`buildKernelEventV2: kind must be "<slug>:<event_name_snake_case>", got ${JSON.stringify(kind)}`);
  }
  if (typeof from !== 'string' || from === '') {
    throw new Error('buildKernelEventV2: from (the workspace identity) must be a non-empty string');
  }
  const event = {
    schema_version: 2,
    event_id: idempotencyKey === undefined ? uuidv7() : eventId(from, kind, String(idempotencyKey)),
    kind,
    timestamp: timestamp ?? new Date().toISOString(),
    from,
    payload: payload ?? rest,
  };
  if (idempotencyKey !== undefined) {
    Object.defineProperty(event, IDEMPOTENCY_KEY, { value: String(idempotencyKey), enumerable: false });
  }
  return event;
}

// A sync port for events built outside a handler (a script, a job runner): pushes to the running
// agent's local API, found in `<workspace>/.lumenflow/state/agent/api.json`. The same call as the
// platform's `pushKernelEvents`, with the events as a list.
export function agentSyncPort({ workspace = process.cwd(), url, token } = {}) {
  const find = async () => {
    if (url && token) return { url, token };
    const { readFile } = await import('node:fs/promises');
    const { join, dirname } = await import('node:path');
    for (let dir = workspace; ; dir = dirname(dir)) {
      try {
        return JSON.parse(await readFile(join(dir, '.lumenflow/state/agent/api.json'), 'utf8'));
      } catch {
        if (dirname(dir) === dir) throw new Error(`no running lumenflow-agent found from ${workspace} (start it with \`lumenflow-agent start\`)`);
      }
    }
  };
  return {
    async pushKernelEvents(events) {
      const api = await find();
      const r = await fetch(`${api.url}/api/v1/events`, {
        method: 'POST',
        headers: { authorization: `Bearer ${api.token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ events }),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(`HTTP ${r.status}: ${body?.error?.message ?? ''}`);
      return body;
    },
  };
}

export function runPack({ handlers = {}, onStart, context } = {}) {
  const out = process.stdout;
  // Keep stdout for the protocol.
  console.log = (...args) => console.error(...args);
  console.info = (...args) => console.error(...args);

  let nextId = 1;
  const pending = new Map();
  let shuttingDown = false;
  let pack = null;
  let identity = '';
  // From `initialize`: how many `handle` requests may run at once (the pack's
  // `runtime.concurrency`), and the calls the agent takes without a reply (staged at once;
  // a failure becomes the event's outcome). An older agent offers neither: one at a time,
  // every call awaited.
  let concurrency = 1;
  let withoutReply = new Set();
  let emitted = new Set();

  // The work queue: `handle` requests run in arrival order, up to `concurrency` at once;
  // `onStart`, `resume` and `shutdown` are barriers (they run alone, after everything queued
  // before them, and before everything queued after them).
  const tasks = [];
  let running = 0;
  let barrier = false;
  const pump = () => {
    while (tasks.length > 0 && !barrier) {
      const t = tasks[0];
      if (t.barrier ? running > 0 : running >= concurrency) return;
      tasks.shift();
      running++;
      barrier = t.barrier;
      Promise.resolve()
        .then(t.run)
        .catch((e) => log('error')(`${e?.stack ?? e}`))
        .finally(() => {
          running--;
          if (t.barrier) barrier = false;
          pump();
        });
    }
  };
  const schedule = (run, { isBarrier = false } = {}) => {
    tasks.push({ run, barrier: isBarrier });
    pump();
  };
  // After a handler asks for a retry, the requests the agent had already queued behind it are
  // answered "held" without running, until the agent says `resume` (it sends them again after
  // the retried event): so no event runs twice and the order is kept.
  let held = false;

  const send = (msg) => out.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n');
  const reply = (id, result) => send({ id, result });
  const replyError = (id, code, message) => send({ id, error: { code, message } });

  const call = (method, params) =>
    new Promise((resolve, reject) => {
      const id = `w${nextId++}`;
      pending.set(id, { resolve, reject });
      send({ id, method, params });
    });

  // The calls of one delivery (`delivery`: the id of its `handle` request; undefined outside
  // one). They name it, so the agent knows whose they are when several handlers run at once.
  // `emit` and `replayLog.put` do not wait for the agent where it allows: they are staged with
  // the handler's outcome anyway, and the pipe keeps them before the outcome.
  const callsFor = (delivery) => {
    const inDelivery = delivery !== undefined;
    const withDelivery = (params) => (inDelivery ? { ...params, delivery } : params);
    const callOrSend = (method, params) => {
      if (inDelivery && withoutReply.has(method)) {
        send({ method, params: withDelivery(params) });
        return Promise.resolve(null);
      }
      return call(method, withDelivery(params));
    };
    const emit = async (kind, payload = {}, { idempotencyKey } = {}) => {
      const params = { kind, payload };
      if (idempotencyKey !== undefined) params.idempotency_key = String(idempotencyKey);
      // Only a kind the manifest declares goes without waiting: any other is refused by the
      // agent, and awaiting that answer lets it be thrown here, from the handler's own line.
      if (inDelivery && withoutReply.has('emit') && emitted.has(kind)) {
        // The id is ours to give (the agent's own rule: UUIDv5 with a key, else UUIDv7).
        const id = idempotencyKey === undefined ? uuidv7() : eventId(identity, kind, String(idempotencyKey));
        if (idempotencyKey === undefined) params.event_id = id;
        await callOrSend('emit', params);
        return id;
      }
      // Captured here, so a refusal (`Unknown kind at emit: …`) points at the handler's line,
      // not into this helper's message loop.
      const site = new Error();
      try {
        const r = await call('emit', withDelivery(params));
        return r.event_id;
      } catch (e) {
        const refused = new Error(e.message);
        refused.code = e.code;
        refused.data = e.data;
        refused.stack = `Error: ${e.message}\n${site.stack.split('\n').slice(2).join('\n')}`;
        throw refused;
      }
    };
    return {
      replayLog: {
        has: (key) => call('replay.has', withDelivery({ key: String(key) })),
        put: async (key) => {
          await callOrSend('replay.put', { key: String(key) });
        },
      },
      emit,
      // The quickstart's `syncPort`, inside the worker: each event built with
      // buildKernelEventV2 is emitted through the agent (checked against the manifest,
      // committed with the handler's outcome); its idempotency key goes with it, so the agent
      // gives it the same event_id.
      syncPort: {
        pushKernelEvents: async (events) => {
          for (const e of events) {
            await emit(e.kind, e.payload ?? {}, { idempotencyKey: e[IDEMPOTENCY_KEY] });
          }
          return { accepted: events.length };
        },
      },
    };
  };

  const log = (level) => (...parts) =>
    send({ method: 'log', params: { level, message: parts.map(String).join(' ') } });

  const baseCtx = {
    ...callsFor(undefined),
    log: { debug: log('debug'), info: log('info'), warn: log('warn'), error: log('error') },
  };

  const onMessage = (msg) => {
    if (msg.method === undefined) {
      const p = pending.get(msg.id);
      if (!p) return;
      pending.delete(msg.id);
      if (msg.error) {
        const e = new Error(msg.error.message);
        e.code = msg.error.code;
        e.data = msg.error.data;
        p.reject(e);
      } else {
        p.resolve(msg.result);
      }
      return;
    }
    const { id, method, params } = msg;
    switch (method) {
      case 'initialize': {
        pack = params.pack;
        baseCtx.pack = pack;
        baseCtx.workspace = params.workspace;
        identity = params.workspace?.identity ?? '';
        if (Number.isInteger(params.concurrency) && params.concurrency > 0) concurrency = params.concurrency;
        emitted = new Set(Array.isArray(params.pack?.emitted_event_kinds) ? params.pack.emitted_event_kinds : []);
        withoutReply = new Set(Array.isArray(params.calls_without_reply) ? params.calls_without_reply : []);
        reply(id, { handles: Object.keys(handlers) });
        if (onStart) {
          schedule(() => Promise.resolve(onStart({ ...baseCtx, ...(context ? context(baseCtx) : {}) })).catch((e) => log('error')(`onStart failed: ${e?.stack ?? e}`)), { isBarrier: true });
        }
        return;
      }
      case 'handle': {
        schedule(async () => {
          if (held) {
            replyError(id, 1004, 'held: an earlier event asked for a retry');
            return;
          }
          const { event, delivery } = params;
          const handler = handlers[event.kind];
          if (!handler) {
            reply(id, { status: 'ignored', action: 'no-handler' });
            return;
          }
          try {
            const own = { ...baseCtx, ...callsFor(id) };
            const ctx = { ...own, ...(context ? context(own) : {}), attempt: delivery.attempt, redelivered: delivery.redelivered };
            const outcome = normalize(await handler(event, ctx));
            if (outcome.status === 'retry') held = true;
            reply(id, outcome);
          } catch (e) {
            replyError(id, -32000, String(e?.stack ?? e));
          }
        });
        return;
      }
      case 'resume': {
        schedule(() => {
          held = false;
        }, { isBarrier: true });
        return;
      }
      case 'shutdown': {
        shuttingDown = true;
        schedule(() => {
          reply(id, null);
          process.exit(0);
        }, { isBarrier: true });
        return;
      }
      default:
        if (id !== undefined) replyError(id, -32601, `method not found: ${method}`);
    }
  };

  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', (line) => {
    if (!line.trim()) return;
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      log('error')('the agent sent a line that is not JSON');
      return;
    }
    onMessage(msg);
  });
  // stdin closed without a `shutdown`: the agent is gone (killed). Exit now, without finishing
  // the handler in flight: nothing it does can be committed any more, and the next agent
  // delivers the event again. Finishing it would run its effects twice.
  rl.on('close', () => {
    if (!shuttingDown) process.exit(1);
  });
}

function normalize(outcome) {
  const statuses = ['handled', 'replayed', 'ignored', 'retry', 'failed'];
  if (outcome === undefined || outcome === null) return { status: 'handled' };
  if (typeof outcome === 'string' && statuses.includes(outcome)) return { status: outcome };
  if (typeof outcome === 'object' && statuses.includes(outcome.status)) {
    return outcome.action === undefined ? { status: outcome.status } : { status: outcome.status, action: String(outcome.action) };
  }
  throw new Error(`a handler must return {status: ${statuses.join('|')}, action?}, got ${JSON.stringify(outcome)}`);
}
