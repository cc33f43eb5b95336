"""A test kit for lumenflow-agent Python packs: the handler context, in memory (unittest or
pytest). ``ctx.emitted`` holds what the handler emitted, with the ids the agent would give."""

from lumenflow_pack import event_id, uuid7


class _Keys:
    def __init__(self):
        self.keys = set()

    def has(self, key):
        return str(key) in self.keys

    def put(self, key):
        self.keys.add(str(key))


class _AsyncKeys(_Keys):
    async def has(self, key):  # noqa: D102
        return _Keys.has(self, key)

    async def put(self, key):  # noqa: D102
        _Keys.put(self, key)


class TestContext:
    """``replay_log``, ``emit``, ``log`` like the agent's; ``emitted`` and ``logged`` to check."""

    def __init__(self, workspace="ws-test", pack="test-pack", asynchronous=False, **extra):
        self.replay_log = _AsyncKeys() if asynchronous else _Keys()
        self.workspace = {"root": ".", "identity": workspace}
        self.pack = pack
        self.attempt = 1
        self.redelivered = False
        self.emitted = []
        self.logged = []
        self._asynchronous = asynchronous
        for k, v in extra.items():
            setattr(self, k, v)

    def _emit(self, kind, payload=None, idempotency_key=None):
        ident = self.workspace["identity"]
        eid = uuid7() if idempotency_key is None else event_id(ident, kind, str(idempotency_key))
        self.emitted.append({"kind": kind, "payload": payload or {}, "idempotency_key": idempotency_key, "event_id": eid})
        return eid

    def emit(self, kind, payload=None, idempotency_key=None):
        if self._asynchronous:
            async def later():
                return self._emit(kind, payload, idempotency_key)
            return later()
        return self._emit(kind, payload, idempotency_key)

    def log(self, message, level="info"):
        self.logged.append((level, str(message)))


def create_test_context(**extra):
    """A synchronous handler's context; ``create_test_context(asynchronous=True)`` for async."""
    return TestContext(**extra)


def recovery_requested(wu_id, event_id_="evt-abc"):
    """A ``conductor:recovery_requested`` event as the agent delivers it."""
    return {"schema_version": 2, "event_id": event_id_, "kind": "conductor:recovery_requested",
            "timestamp": "2026-04-20T00:00:00.000Z", "from": "conductor", "payload": {"wu_id": wu_id}}
