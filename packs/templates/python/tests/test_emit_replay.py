"""The quickstart's two tests, in Python: python3 -m unittest discover -s tests"""

import json
import pathlib
import sys
import unittest
from unittest import mock

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from handlers import on_recovery_requested, run_job  # noqa: E402
from lumenflow_pack import event_id  # noqa: E402
from lumenflow_testing import create_test_context, recovery_requested  # noqa: E402


class Pack(unittest.TestCase):
    def test_emits_a_namespaced_kind_through_build_kernel_event_v2(self):
        sync_port = mock.Mock()
        run_job(sync_port, workspace_identity="ws-test", job_id="job-1")
        sync_port.push_kernel_events.assert_called_once()
        [events], _ = sync_port.push_kernel_events.call_args
        self.assertEqual(events[0]["kind"], "{{NAME}}:job_completed")
        self.assertEqual(events[0]["schema_version"], 2)
        self.assertEqual(events[0]["event_id"], event_id("ws-test", "{{NAME}}:job_completed", "job-1:completed"))
        self.assertEqual(events[0]["from"], "ws-test")

    def test_handler_is_idempotent_under_replay(self):
        mark_job_recovered = mock.Mock()
        ctx = create_test_context(mark_job_recovered=mark_job_recovered)
        event = recovery_requested("{{NAME}}-job-1")
        first = on_recovery_requested(event, ctx)
        second = on_recovery_requested(event, ctx)
        self.assertEqual(first["status"], "handled")
        self.assertEqual(second["status"], "replayed")
        mark_job_recovered.assert_called_once()  # NOT twice

    def test_the_event_id_vectors(self):
        vectors = pathlib.Path(__file__).resolve().parents[1] / "event-id-vectors.json"
        for v in json.loads(vectors.read_text("utf-8"))["vectors"]:
            self.assertEqual(event_id(v["from"], v["kind"], v["idempotency_key"]), v["event_id"])


if __name__ == "__main__":
    unittest.main()
