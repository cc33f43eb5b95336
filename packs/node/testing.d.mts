// Types of testing.mjs, the test kit for lumenflow-agent packs.
import type { HandlerContext, KernelEventV2 } from './lumenflow-pack.mjs';

export interface EmittedEvent {
  kind: string;
  payload: Record<string, unknown>;
  idempotencyKey?: string;
  event_id: string;
}

export type TestContext<Extra = {}> = HandlerContext & {
  replayLog: HandlerContext['replayLog'] & { keys: Set<string> };
  emitted: EmittedEvent[];
  pushed: KernelEventV2[];
  logged: { level: string; message: string }[];
} & Extra;

/** The context a handler gets from the agent, in memory, with your services (`extra`). */
export function createTestContext<Extra extends Record<string, unknown> = {}>(
  extra?: Extra,
  options?: { workspace?: string; pack?: string },
): TestContext<Extra>;

/** A `conductor:recovery_requested` event as the agent delivers it. */
export function recoveryRequested(
  wuId: string,
  options?: { eventId?: string; from?: string },
): KernelEventV2<'conductor:recovery_requested', { wu_id: string }>;

/** Any inbound event as the agent delivers it. */
export function inboundEvent<K extends string>(
  kind: K,
  payload?: Record<string, unknown>,
  options?: { eventId?: string; from?: string; timestamp?: string },
): KernelEventV2<K>;
