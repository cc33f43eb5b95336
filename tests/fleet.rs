//! NATS JetStream as the upstream (issue 15), against a real `nats-server -js` on a loopback
//! port: queue events land in the stream once each (counted by `Nats-Msg-Id`), also across a
//! `kill -9` of the server; inbound events published twice with one id are handled once.
//! Skipped, saying so, where `nats-server` is not installed (`.ci/run` installs it).

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

struct Nats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Nats {
    fn start(dir: &Path) -> Option<Nats> {
        if Command::new("nats-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: nats-server is not installed (`.ci/run` installs it)");
            return None;
        }
        let port = free_port();
        let mut n = Nats {
            child: None,
            port,
            dir: dir.join("nats"),
        };
        n.restart();
        Some(n)
    }

    fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for_port("nats-server", self.port);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Every message stored on `subjects`: (Nats-Msg-Id -> count, bodies).
    fn stored(&self, subjects: &str) -> (BTreeMap<String, usize>, Vec<Value>) {
        Self::runtime().block_on(async {
            let client = async_nats::connect(self.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream("LUMENFLOW").await.unwrap();
            let consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    filter_subject: subjects.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut ids = BTreeMap::new();
            let mut bodies = Vec::new();
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(1000)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .unwrap();
                let mut got = 0;
                while let Some(Ok(m)) = batch.next().await {
                    got += 1;
                    let id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string())
                        .unwrap_or_default();
                    *ids.entry(id).or_insert(0) += 1;
                    bodies.push(serde_json::from_slice(&m.payload).unwrap_or(Value::Null));
                    let _ = m.ack().await;
                }
                if got == 0 {
                    break;
                }
            }
            (ids, bodies)
        })
    }

    fn publish(&self, subject: &str, id: &str, body: &Value) {
        Self::runtime().block_on(async {
            let client = async_nats::connect(self.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject.to_string(), h, body.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn orders(ws: &Workspace, from: usize, n: usize) {
    let events: Vec<Value> = (from..from + n)
        .map(|i| json!({"kind": "shop:order_placed", "payload": {"n": i}, "idempotency_key": format!("order-{i}")}))
        .collect();
    let r = ws.api().emit(events);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn queue_events_are_in_the_stream_once_each_across_a_server_kill_9() {
    let mut ws = Workspace::new(json!({"identity": "ws-fleet"}), "");
    let Some(mut nats) = Nats::start(ws.path()) else {
        return;
    };
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"identity": "ws-fleet", "upstream": nats.url()}).to_string(),
    )
    .unwrap();
    shop_pack(&ws);
    ws.start();
    wait_for("connected to NATS", T, || {
        (ws.status()["upstream"]["state"] == "connected").then_some(())
    });
    orders(&ws, 0, 200);
    wait_for("the first 200 published", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    nats.kill9();
    // Accepted while the server is down: durable, waiting.
    orders(&ws, 200, 300);
    assert!(ws.status()["queue"]["durable_depth"].as_i64().unwrap() > 0);
    nats.restart();
    wait_for(
        "the outbox drained after the restart",
        Duration::from_secs(60),
        || (ws.status()["queue"]["durable_depth"] == 0).then_some(()),
    );
    let (ids, bodies) = nats.stored("lumenflow.ws-fleet.events.>");
    assert_eq!(ids.len(), 500, "every accepted event is in the stream");
    assert!(ids.values().all(|n| *n == 1), "once each: {ids:?}");
    assert!(bodies
        .iter()
        .all(|b| b["kind"] == "shop:order_placed" && b["from"] == "ws-fleet"));
}

#[test]
fn inbound_published_twice_with_one_id_is_handled_once() {
    let mut ws = Workspace::new(json!({"identity": "ws-in"}), "recorder");
    let Some(nats) = Nats::start(ws.path()) else {
        return;
    };
    std::fs::write(
        ws.path().join(".lumenflow/agent.json"),
        json!({"identity": "ws-in", "upstream": nats.url()}).to_string(),
    )
    .unwrap();
    ws.start();
    wait_for("connected to NATS", T, || {
        (ws.status()["upstream"]["state"] == "connected").then_some(())
    });
    let event = json!({"schema_version": 2, "event_id": "0190a0e0-0000-7000-8000-00000000abcd",
        "kind": "conductor:recovery_requested", "timestamp": "2026-04-20T00:00:00.000Z", "from": "fleet-ops",
        "payload": {"wu_id": "acme-job-7"}});
    let subject = "lumenflow.ws-in.inbound.conductor.recovery_requested";
    // Two publishes with two message ids (a producer that lost the first ack and used a new
    // id): the stream keeps both; the agent's replay log must make it one.
    nats.publish(subject, "first", &event);
    nats.publish(subject, "second", &event);
    let p = wait_for("two deliveries counted", T, || {
        let p = ws.pack_status("recorder");
        (p["handled"].as_u64().unwrap_or(0) + p["replayed"].as_u64().unwrap_or(0) == 2).then_some(p)
    });
    assert_eq!(p["handled"], 1, "{p}");
    assert_eq!(ws.effects().len(), 1, "{:?}", ws.effects());
}

/// `enroll --endpoint nats://…` makes NATS the upstream, the enrollment's subject the
/// workspace token of the subjects.
#[test]
fn an_enrollment_with_a_nats_endpoint_publishes_there() {
    let mut ws = Workspace::new(json!({}), "");
    let Some(nats) = Nats::start(ws.path()) else {
        return;
    };
    shop_pack(&ws);
    enroll_at(&ws, &nats.url(), "nats-token");
    ws.start();
    wait_for("connected to NATS", T, || {
        (ws.status()["upstream"]["state"] == "connected").then_some(())
    });
    orders(&ws, 0, 3);
    wait_for("published", T, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
    let (ids, _) = nats.stored("lumenflow.ws-test.events.shop.order_placed");
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ws.status()["upstream"]["source"], "enrollment");
}
