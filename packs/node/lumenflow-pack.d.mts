// Types of lumenflow-pack.mjs, the Node helper for lumenflow-agent exec packs.
// The protocol these calls speak is in PROTOCOL.md at the repository root.

/** A complete schema-2 event (SPEC §5). */
export interface KernelEventV2<K extends string = string, P = Record<string, unknown>> {
  schema_version: 2;
  event_id: string;
  kind: K;
  /** RFC 3339, UTC, `Z`, milliseconds. */
  timestamp: string;
  /** The workspace identity of the producer. */
  from: string;
  payload: P;
}

/** What a handler returns (or a bare status string). `retry` redelivers later with backoff;
 * `failed` dead-letters at once. */
export interface HandlerOutcome {
  status: 'handled' | 'replayed' | 'ignored' | 'retry' | 'failed';
  action?: string;
}

/** The replay log a handler checks before its effect and records after it. */
export interface ReplayLog {
  has(key: string): Promise<boolean>;
  put(key: string): Promise<void>;
}

export interface EmitOptions {
  /** Makes the event_id deterministic: a retry yields the same id. */
  idempotencyKey?: string;
}

/** The quickstart's sync port: events built with `buildKernelEventV2`, pushed in order. */
export interface SyncPort {
  pushKernelEvents(events: KernelEventV2[]): Promise<unknown>;
}

/** What the agent gives every handler (and `onStart`). */
export interface HandlerContext {
  replayLog: ReplayLog;
  /** Emits an event of this pack; resolves to its event_id. Committed with the outcome. */
  emit(kind: string, payload?: Record<string, unknown>, options?: EmitOptions): Promise<string>;
  /** `pushKernelEvents` through `emit`. */
  syncPort: SyncPort;
  log: Record<'debug' | 'info' | 'warn' | 'error', (...parts: unknown[]) => void>;
  /** The pack id and the workspace (from `initialize`): `identity` is the `from` of its events. */
  pack?: string;
  workspace?: { root: string; identity: string };
  /** 1 on the first delivery; more after a crash or a retry. */
  attempt?: number;
  redelivered?: boolean;
}

/** Payloads by kind, for typed handlers. Extend it in your pack:
 * `declare module './lumenflow/lumenflow-pack.mjs' { interface EventPayloads { 'x:y': {...} } }` */
export interface EventPayloads {
  'conductor:recovery_requested': { wu_id: string; [k: string]: unknown };
}

export type PayloadOf<K extends string> = K extends keyof EventPayloads
  ? EventPayloads[K]
  : Record<string, unknown>;

/** A handler for events of kind `K`, with a context of type `Ctx` (the quickstart's). */
export type PackEventHandler<K extends string = string, Ctx = HandlerContext> = (
  event: KernelEventV2<K, PayloadOf<K>>,
  ctx: Ctx,
) => Promise<HandlerOutcome> | HandlerOutcome;

/** A pack manifest (SPEC §4): the platform's DomainPackManifest fields and the event fields.
 * The agent and the platform read it from manifest.yaml. */
export interface PackManifest {
  id: string;
  version: string;
  slug?: string;
  config_key?: string;
  task_types: string[];
  tools: unknown[];
  policies: unknown[];
  evidence_types?: string[];
  state_aliases?: Record<string, string>;
  lane_templates?: unknown[];
  emitted_event_kinds: string[];
  subscribed_event_kinds: string[];
  required_approvals?: string[];
  surfaces_required?: string[];
  backpressure_policy: Record<string, 'ephemeral' | 'queue'>;
  runtime?: { command: string[]; env?: Record<string, string>; timeout_ms?: number };
}

export interface RunPackOptions {
  /** Handlers by the kind they handle (the manifest's subscribed_event_kinds). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  handlers?: Record<string, (event: any, ctx: any) => unknown>;
  /** Runs once after the handshake, with a context that can emit (e.g. to run a job). */
  onStart?: (ctx: HandlerContext) => unknown;
  /** Adds your own services (a database, `markJobRecovered`) to every handler's context. */
  context?: (ctx: HandlerContext) => Record<string, unknown>;
}

/** Speaks the agent's protocol on stdin/stdout until the agent says `shutdown`. Call it only
 * in the worker entry (`src/worker.ts`), never in a module your tests import. */
export function runPack(options?: RunPackOptions): void;

/** `buildKernelEventV2({kind, from, ...payload}, {idempotencyKey})`: a complete v2 envelope,
 * its id the agent's (`eventId`) with a key, a UUIDv7 without. */
export function buildKernelEventV2<K extends string>(
  fields: { kind: K; from: string; payload?: Record<string, unknown>; [field: string]: unknown },
  options?: { idempotencyKey?: string; timestamp?: string },
): KernelEventV2<K>;

/** The event id of (from, kind, idempotency key): UUIDv5 in EVENT_ID_NAMESPACE
 * (test vectors: packs/event-id-vectors.json). */
export function eventId(from: string, kind: string, key: string): string;
export const EVENT_ID_NAMESPACE: string;
export function uuidv7(now?: number): string;
export const PROTOCOL_VERSION: number;
export const IDEMPOTENCY_KEY: unique symbol;

/** A sync port to the running agent's local API (found from `workspace` upward). */
export function agentSyncPort(options?: { workspace?: string; url?: string; token?: string }): SyncPort;
