"""lumenflow_pack: the dependency-free Python helper for lumenflow-agent exec packs.

A pack's worker imports it and calls ``run_pack(handlers={...})``. The helper speaks the agent's
protocol (PROTOCOL.md: JSON-RPC 2.0 over stdin/stdout, one message per line) so a handler is
written like the quickstart's::

    def on_recovery_requested(event, ctx):
        key = f"hello:recover:{event['event_id']}"
        if ctx.replay_log.has(key):
            return {"status": "replayed", "action": "noop"}
        ctx.emit("hello:job_completed", {"job_id": event["payload"]["wu_id"]},
                 idempotency_key=f"{event['payload']['wu_id']}:completed")
        ctx.replay_log.put(key)
        return {"status": "handled", "action": "recovered"}

    run_pack(handlers={"conductor:recovery_requested": on_recovery_requested})

Handlers may be plain functions or ``async def`` (then ``await ctx.replay_log.has(key)``,
``await ctx.emit(...)``). Events are handled one at a time, in order. What a handler emits and
the keys it puts are committed by the agent with its outcome: if it raises, or the worker dies,
none of them is kept and the event comes again. stdout belongs to the protocol: ``print`` goes
to stderr, which the agent forwards to its log.
"""

import asyncio
import datetime
import inspect
import json
import os
import sys
import traceback
import uuid
from collections import deque

PROTOCOL_VERSION = 1
#: uuid5(NAMESPACE_URL, "https://lumenflow.dev/ns/event-id"); vectors: packs/event-id-vectors.json
EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://lumenflow.dev/ns/event-id")
STATUSES = ("handled", "replayed", "ignored", "retry", "failed")


def event_id(from_, kind, key):
    """The id the agent gives an event with an idempotency key (UUIDv5, see PROTOCOL.md)."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{from_}\0{kind}\0{key}"))


def uuid7(now_ms=None):
    """A time-ordered UUIDv7, like the ids of events without an idempotency key."""
    ms = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000) if now_ms is None else now_ms
    b = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))


def now_iso():
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class KernelEvent(dict):
    """A v2 envelope (a dict), remembering the idempotency key it was built with."""

    idempotency_key = None


def build_kernel_event_v2(fields, idempotency_key=None, timestamp=None):
    """The quickstart's builder: ``{kind, from, ...payload}`` -> a complete v2 envelope, its id
    the agent's (``event_id``) with a key, a UUIDv7 without."""
    fields = dict(fields)
    kind = fields.pop("kind", None)
    from_ = fields.pop("from", None)
    payload = fields.pop("payload", None)
    if not isinstance(kind, str) or ":" not in kind:
        raise ValueError(f'build_kernel_event_v2: kind must be "<slug>:<event_name>", got {kind!r}')
    if not isinstance(from_, str) or not from_:
        raise ValueError("build_kernel_event_v2: from (the workspace identity) must be a non-empty string")
    event = KernelEvent(
        schema_version=2,
        event_id=uuid7() if idempotency_key is None else event_id(from_, kind, str(idempotency_key)),
        kind=kind,
        timestamp=timestamp or now_iso(),
        payload=fields if payload is None else payload,
    )
    event["from"] = from_
    event.idempotency_key = None if idempotency_key is None else str(idempotency_key)
    return event


class AgentError(Exception):
    """An error the agent answered a request with (``code``: see PROTOCOL.md)."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.data = data


class _ReplayLog:
    def __init__(self, call):
        self._call = call

    def has(self, key):
        return bool(self._call("replay.has", {"key": str(key)}))

    def put(self, key):
        self._call("replay.put", {"key": str(key)})


class _SyncPort:
    """The quickstart's ``syncPort`` inside the worker: each event built with
    ``build_kernel_event_v2`` is emitted through the agent, with its idempotency key."""

    def __init__(self, ctx):
        self._ctx = ctx

    def push_kernel_events(self, events):
        for e in events:
            Context.emit(self._ctx, e["kind"], e.get("payload") or {}, getattr(e, "idempotency_key", None))
        return {"accepted": len(events)}


class Context:
    """What every handler gets: ``replay_log.has/put``, ``emit``, ``sync_port``, ``log``, the
    pack and the workspace (``{root, identity}``), the delivery's ``attempt`` and
    ``redelivered``, and your own services (``run_pack(context=...)``)."""

    def __init__(self, call, notify, pack, workspace, extra):
        self.replay_log = _ReplayLog(call)
        self._call = call
        self._notify = notify
        self.pack = pack
        self.workspace = workspace
        self.attempt = 1
        self.redelivered = False
        self.sync_port = _SyncPort(self)
        if callable(extra):
            extra = extra(self)
        for k, v in (extra or {}).items():
            setattr(self, k, v)

    def emit(self, kind, payload=None, idempotency_key=None):
        params = {"kind": kind, "payload": payload or {}}
        if idempotency_key is not None:
            params["idempotency_key"] = str(idempotency_key)
        return self._call("emit", params)["event_id"]

    def log(self, message, level="info"):
        self._notify("log", {"level": level, "message": str(message)})


class _AsyncReplayLog:
    def __init__(self, log):
        self._log = log

    async def has(self, key):
        return self._log.has(key)

    async def put(self, key):
        self._log.put(key)


class AsyncContext(Context):
    """The context of an ``async def`` handler: the same calls, awaitable."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.replay_log = _AsyncReplayLog(self.replay_log)

    async def emit(self, kind, payload=None, idempotency_key=None):  # noqa: D102
        return Context.emit(self, kind, payload, idempotency_key)


def _normalize(outcome):
    if outcome is None:
        return {"status": "handled"}
    if isinstance(outcome, str) and outcome in STATUSES:
        return {"status": outcome}
    if isinstance(outcome, dict) and outcome.get("status") in STATUSES:
        out = {"status": outcome["status"]}
        if outcome.get("action") is not None:
            out["action"] = str(outcome["action"])
        return out
    raise ValueError(f"a handler must return {{status: {'|'.join(STATUSES)}, action?}}, got {outcome!r}")


def run_pack(handlers=None, on_start=None, context=None, stdin=None, stdout=None):
    """Speaks the protocol until the agent says ``shutdown`` (then exits 0), or stdin closes
    without it (the agent is gone: exits 1 at once, without finishing the handler).

    ``context``: a dict of services added to every handler's context, or a function of the
    context returning them (``lambda ctx: {"mark_job_recovered": ...}``)."""
    handlers = dict(handlers or {})
    inp = stdin or sys.stdin
    out = stdout or sys.stdout
    if stdout is None:
        sys.stdout = sys.stderr  # print() goes to the log, never into the protocol
    waiting = deque()  # agent messages read while waiting for a reply
    state = {"next": 1, "held": False, "pack": None, "workspace": None}

    def send(msg):
        out.write(json.dumps({"jsonrpc": "2.0", **msg}) + "\n")
        out.flush()

    def read():
        line = inp.readline()
        if not line:
            os._exit(1)
        return json.loads(line) if line.strip() else None

    def call(method, params):
        rid = f"py{state['next']}"
        state["next"] += 1
        send({"id": rid, "method": method, "params": params})
        while True:
            msg = read()
            if msg is None:
                continue
            if "method" not in msg and msg.get("id") == rid:
                if "error" in msg:
                    e = msg["error"]
                    raise AgentError(e.get("code"), e.get("message", ""), e.get("data"))
                return msg.get("result")
            waiting.append(msg)

    def notify(method, params):
        send({"method": method, "params": params})

    def make_ctx(cls, delivery=None):
        ctx = cls(call, notify, state["pack"], state["workspace"], context)
        if delivery:
            ctx.attempt = delivery.get("attempt", 1)
            ctx.redelivered = delivery.get("redelivered", False)
        return ctx

    def run_handler(fn, event, delivery):
        if inspect.iscoroutinefunction(fn):
            return asyncio.run(fn(event, make_ctx(AsyncContext, delivery)))
        return fn(event, make_ctx(Context, delivery))

    while True:
        msg = waiting.popleft() if waiting else read()
        if msg is None:
            continue
        method, mid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
        if method == "initialize":
            state["pack"], state["workspace"] = params.get("pack"), params.get("workspace")
            send({"id": mid, "result": {"handles": list(handlers)}})
            if on_start:
                try:
                    if inspect.iscoroutinefunction(on_start):
                        asyncio.run(on_start(make_ctx(AsyncContext)))
                    else:
                        on_start(make_ctx(Context))
                except Exception:  # noqa: BLE001 - reported, never fatal
                    notify("log", {"level": "error", "message": "on_start failed: " + traceback.format_exc()})
        elif method == "handle":
            if state["held"]:
                send({"id": mid, "error": {"code": 1004, "message": "held: an earlier event asked for a retry"}})
                continue
            event, delivery = params.get("event", {}), params.get("delivery", {})
            fn = handlers.get(event.get("kind"))
            if fn is None:
                send({"id": mid, "result": {"status": "ignored", "action": "no-handler"}})
                continue
            try:
                outcome = _normalize(run_handler(fn, event, delivery))
                if outcome["status"] == "retry":
                    state["held"] = True
                send({"id": mid, "result": outcome})
            except Exception:  # noqa: BLE001 - a crash, reported to the agent
                send({"id": mid, "error": {"code": -32000, "message": traceback.format_exc()}})
        elif method == "resume":
            state["held"] = False
        elif method == "shutdown":
            send({"id": mid, "result": None})
            sys.exit(0)
        elif mid is not None:
            send({"id": mid, "error": {"code": -32601, "message": f"method not found: {method}"}})
