"""The Python helper against the published event-id vectors (packs/event-id-vectors.json).
Run: python3 -m unittest discover -s packs/python/tests"""

import json
import pathlib
import sys
import unittest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import lumenflow_pack  # noqa: E402

VECTORS = json.loads((pathlib.Path(__file__).resolve().parents[2] / "event-id-vectors.json").read_text("utf-8"))


class EventIds(unittest.TestCase):
    def test_namespace(self):
        self.assertEqual(str(lumenflow_pack.EVENT_ID_NAMESPACE), VECTORS["namespace"]["uuid"])

    def test_vectors(self):
        self.assertGreaterEqual(len(VECTORS["vectors"]), 8)
        for v in VECTORS["vectors"]:
            self.assertEqual(lumenflow_pack.event_id(v["from"], v["kind"], v["idempotency_key"]), v["event_id"], v)
            e = lumenflow_pack.build_kernel_event_v2({"kind": v["kind"], "from": v["from"], "n": 1},
                                                     idempotency_key=v["idempotency_key"])
            self.assertEqual(e["event_id"], v["event_id"])
            self.assertEqual(e["payload"], {"n": 1})

    def test_uuid7_is_time_ordered(self):
        a = lumenflow_pack.uuid7(1_700_000_000_000)
        self.assertTrue(a.startswith("018bcfe5-6800-7"), a)


if __name__ == "__main__":
    unittest.main()
