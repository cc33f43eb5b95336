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
    /// Extra lines of the server's configuration file (auth, tls, cluster).
    extra: String,
    /// The URL scheme and host clients use (`nats://127.0.0.1`, `tls://localhost`).
    scheme_host: String,
    /// Options for the test's own client.
    client_opts: fn() -> async_nats::ConnectOptions,
}

fn installed() -> bool {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: nats-server is not installed (`.ci/run` installs it)");
        return false;
    }
    true
}

impl Nats {
    fn start(dir: &Path) -> Option<Nats> {
        Self::start_with(dir, "nats", "")
    }

    /// A server whose configuration file ends with `extra`, its store in `dir/<name>`.
    fn start_with(dir: &Path, name: &str, extra: &str) -> Option<Nats> {
        if !installed() {
            return None;
        }
        let mut n = Nats {
            child: None,
            port: free_port(),
            dir: dir.join(name),
            extra: extra.to_string(),
            scheme_host: "nats://127.0.0.1".into(),
            client_opts: async_nats::ConnectOptions::new,
        };
        n.restart();
        Some(n)
    }

    fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let conf = self.dir.join("server.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\n{}\n",
                self.port,
                self.dir.join("js").display(),
                self.extra
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
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

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn url(&self) -> String {
        format!("{}:{}", self.scheme_host, self.port)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn js(&self) -> impl std::future::Future<Output = async_nats::jetstream::Context> {
        let (url, opts) = (self.url(), (self.client_opts)());
        async move { async_nats::jetstream::new(opts.connect(url).await.unwrap()) }
    }

    /// Every message stored on `subjects`: (Nats-Msg-Id -> count, bodies).
    fn stored(&self, subjects: &str) -> (BTreeMap<String, usize>, Vec<Value>) {
        Self::runtime().block_on(async {
            let js = self.js().await;
            stored_in(&js, subjects).await
        })
    }

    fn publish(&self, subject: &str, id: &str, body: &Value) {
        Self::runtime().block_on(async {
            let js = self.js().await;
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject.to_string(), h, body.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        })
    }

    /// The agent's consumer `name`: (pending, ack pending, deliveries so far).
    fn consumer(&self, name: &str) -> Option<(u64, usize, u64)> {
        Self::runtime().block_on(async {
            let js = self.js().await;
            let stream = js.get_stream("LUMENFLOW").await.ok()?;
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(name).await.ok()?;
            let i = c.info().await.ok()?;
            Some((
                i.num_pending,
                i.num_ack_pending,
                i.delivered.consumer_sequence,
            ))
        })
    }
}

/// Every message stored on `subjects`, read with a throwaway consumer.
async fn stored_in(
    js: &async_nats::jetstream::Context,
    subjects: &str,
) -> (BTreeMap<String, usize>, Vec<Value>) {
    // A cluster that just lost a node may take a while to answer (leader elections): retried
    // for up to a minute.
    let mut tries = 0;
    let consumer: async_nats::jetstream::consumer::PullConsumer = loop {
        let created = match js.get_stream("LUMENFLOW").await {
            Ok(stream) => stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    filter_subject: subjects.into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match created {
            Ok(c) => break c,
            Err(e) if tries < 60 => {
                tries += 1;
                eprintln!("reading the stream: {e}; again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("cannot read the stream: {e}"),
        }
    };
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

/// agent.json for `identity` on NATS `upstream`, with `extra` keys merged in.
fn nats_agent(ws: &Workspace, identity: &str, upstream: &str, extra: Value) {
    let mut cfg = json!({"identity": identity, "upstream": upstream});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    std::fs::write(ws.path().join(".lumenflow/agent.json"), cfg.to_string()).unwrap();
}

fn wait_connected(ws: &Workspace) {
    wait_for("connected to NATS", T, || {
        (ws.status()["upstream"]["state"] == "connected").then_some(())
    });
}

fn wait_drained(ws: &Workspace, timeout: Duration) {
    wait_for("the outbox drained", timeout, || {
        (ws.status()["queue"]["durable_depth"] == 0).then_some(())
    });
}

fn recovery(n: usize) -> Value {
    json!({"schema_version": 2, "event_id": format!("0190a0e0-0000-7000-8000-{n:012}"),
        "kind": "conductor:recovery_requested", "timestamp": "2026-04-20T00:00:00.000Z",
        "from": "fleet-ops", "payload": {"wu_id": format!("acme-job-{n}")}})
}

/// A TCP proxy in front of a NATS server that, once armed, swallows the first client message
/// holding a JetStream ack and everything the client sends after it (the connection stays
/// open): the agent has committed and acked, the server never hears of it.
struct AckEater {
    port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    eaten: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AckEater {
    fn start(target: u16) -> AckEater {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let eaten = Arc::new(AtomicBool::new(false));
        let (a, e) = (armed.clone(), eaten.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s2.read(&mut buf) {
                        if n == 0 || c2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
                let (a, e) = (a.clone(), e.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = client.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let has_ack = buf[..n].windows(8).any(|w| w == b"$JS.ACK.");
                        if e.load(Ordering::SeqCst) || (has_ack && a.load(Ordering::SeqCst)) {
                            e.store(true, Ordering::SeqCst);
                            continue; // swallowed
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        AckEater { port, armed, eaten }
    }
}

/// The agent is killed after the inbound commit and the handler, before the server got the
/// ack: after the restart the server delivers the event again, the replay log absorbs it (one
/// effect), and the redelivery is acked.
#[test]
fn a_kill_9_between_the_inbound_commit_and_the_ack_gives_one_effect_and_an_ack_after_restart() {
    use std::sync::atomic::Ordering;
    let mut ws = Workspace::new(json!({}), "recorder");
    let Some(nats) = Nats::start(ws.path()) else {
        return;
    };
    let proxy = AckEater::start(nats.port);
    let settings = json!({"nats": {"ack_wait_ms": 2000}});
    nats_agent(
        &ws,
        "ws-ack",
        &format!("nats://127.0.0.1:{}", proxy.port),
        settings.clone(),
    );
    ws.start();
    wait_connected(&ws);
    wait_for("the inbox consumer", T, || nats.consumer("lf-ws-ack"));
    proxy.armed.store(true, Ordering::SeqCst);
    nats.publish(
        "lumenflow.ws-ack.inbound.conductor.recovery_requested",
        "r-1",
        &recovery(1),
    );
    wait_for("handled", T, || (ws.effects().len() == 1).then_some(()));
    wait_for("the ack swallowed", T, || {
        proxy.eaten.load(Ordering::SeqCst).then_some(())
    });
    let (_, unacked, _) = nats.consumer("lf-ws-ack").unwrap();
    assert_eq!(unacked, 1, "the server never got the ack");
    ws.kill9();

    nats_agent(&ws, "ws-ack", &nats.url(), settings);
    ws.start();
    let (pending, unacked, delivered) = wait_for("redelivered and acked", T, || {
        nats.consumer("lf-ws-ack")
            .filter(|(p, u, d)| *p == 0 && *u == 0 && *d >= 2)
    });
    assert_eq!((pending, unacked), (0, 0));
    assert!(delivered >= 2, "delivered {delivered} times");
    let p = wait_for("the redelivery counted", T, || {
        let p = ws.pack_status("recorder");
        (p["replayed"].as_u64().unwrap_or(0) >= 1).then_some(p)
    });
    assert_eq!(ws.effects().len(), 1, "one effect: {:?}", ws.effects());
    assert_eq!(
        p["handled"], 0,
        "handled before the kill, only replayed after: {p}"
    );
}

/// 20 agents (20 workspaces) publish at once; a pack in a 21st workspace subscribes to the kind
/// they all emit and sees every event once, its own workspace's too (routed locally, not twice).
#[test]
fn a_pack_subscribed_to_a_kind_sees_it_from_every_workspace_of_the_fleet_once() {
    const FLEET: usize = 20;
    const EACH: usize = 50;
    let mut hq = Workspace::new(json!({}), "recorder,emitter");
    let Some(nats) = Nats::start(hq.path()) else {
        return;
    };
    nats_agent(&hq, "ws-hq", &nats.url(), json!({}));
    hq.start();
    wait_connected(&hq);
    wait_for("the fleet consumer", T, || {
        nats.consumer("lf-ws-hq-all-emitter-job_completed")
    });
    let mut fleet: Vec<Workspace> = (0..FLEET)
        .map(|i| {
            let ws = Workspace::new(json!({}), "emitter");
            nats_agent(&ws, &format!("ws-{i:02}"), &nats.url(), json!({}));
            ws
        })
        .collect();
    for ws in &mut fleet {
        ws.start();
    }
    let jobs = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|j| json!({"kind": "emitter:job_completed", "payload": {"j": j}, "idempotency_key": format!("job-{j}")}))
            .collect()
    };
    // All at once: one thread per agent.
    std::thread::scope(|s| {
        for ws in &fleet {
            s.spawn(move || {
                for chunk in jobs(EACH).chunks(10) {
                    let r = ws.api().emit(chunk.to_vec());
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            });
        }
        let r = hq.api().emit(jobs(EACH));
        assert_eq!(r.status, 200, "{}", r.body);
    });
    let want = (FLEET + 1) * EACH;
    wait_for(
        "every event at the subscriber",
        Duration::from_secs(90),
        || (hq.effects().len() >= want).then_some(()),
    );
    let mut per_id = BTreeMap::new();
    for line in hq.effects() {
        let id = line.split(' ').nth(1).unwrap_or_default().to_string();
        *per_id.entry(id).or_insert(0) += 1;
    }
    assert_eq!(per_id.len(), want, "distinct events");
    assert!(per_id.values().all(|n| *n == 1), "once each");
    for ws in &fleet {
        assert_eq!(ws.status()["queue"]["durable_depth"], 0);
    }
    let (ids, _) = nats.stored("lumenflow.*.events.emitter.job_completed");
    assert_eq!(ids.len(), want, "every workspace's events in the stream");
    // The consumer details in status are refreshed every few seconds: wait for the count to
    // settle rather than read the first refresh (it once showed 800 of 1,000 under load).
    let settled = (want - EACH) as u64;
    let c = wait_for("the consumer in status", T, || {
        let st = hq.status();
        let c = st["upstream"]["nats"]["consumers"]["lf-ws-hq-all-emitter-job_completed"].clone();
        (c["delivered"].as_u64() >= Some(settled)).then_some(c)
    });
    assert_eq!(
        c["filter"], "lumenflow.*.events.emitter.job_completed",
        "{c}"
    );
    assert_eq!(
        c["delivered"],
        (want - EACH) as u64,
        "its own events are skipped, not counted: {c}"
    );
    assert_eq!(
        hq.pack_status("recorder")["replayed"],
        0,
        "its own events did not come twice"
    );
}

/// Wrong credentials: `unauthorized` in status, events wait; the right token in the file it is
/// read from (at every attempt): delivered, nothing dropped.
#[test]
fn refused_credentials_show_unauthorized_and_lose_nothing() {
    let mut ws = Workspace::new(json!({}), "");
    let Some(nats) = Nats::start_with(ws.path(), "nats", "authorization { token: \"s3cret\" }")
    else {
        return;
    };
    let token_file = ws.path().join("nats.token");
    std::fs::write(&token_file, "wrong\n").unwrap();
    shop_pack(&ws);
    nats_agent(
        &ws,
        "ws-auth",
        &nats.url(),
        json!({"nats": {"token_file": "nats.token"}}),
    );
    ws.start();
    let s = wait_for("unauthorized", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "unauthorized").then_some(s)
    });
    let err = s["upstream"]["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("authorization violation"), "{err}");
    assert!(!ws.log().contains("wrong"), "the token is never logged");
    orders(&ws, 0, 5);
    assert_eq!(ws.status()["queue"]["durable_depth"], 5);
    std::fs::write(&token_file, "s3cret\n").unwrap();
    wait_connected(&ws);
    wait_drained(&ws, T);
    let mut with_token = nats;
    with_token.client_opts = || async_nats::ConnectOptions::with_token("s3cret".into());
    let (ids, _) = with_token.stored("lumenflow.ws-auth.events.>");
    assert_eq!(ids.len(), 5);
    assert!(!ws.log().contains("s3cret"), "the token is never logged");
}

/// An operator's stream that does not take this workspace's subjects: `misconfigured` with the
/// reason; once the operator fixes it the waiting events go.
#[test]
fn a_stream_without_the_workspace_subjects_is_named_in_status_until_fixed() {
    let mut ws = Workspace::new(json!({}), "");
    let Some(nats) = Nats::start(ws.path()) else {
        return;
    };
    let rt = Nats::runtime();
    let config = |subjects: &[&str]| async_nats::jetstream::stream::Config {
        name: "LUMENFLOW".into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    rt.block_on(async {
        nats.js()
            .await
            .create_stream(config(&["other.>"]))
            .await
            .unwrap();
    });
    shop_pack(&ws);
    nats_agent(&ws, "ws-cfg", &nats.url(), json!({}));
    ws.start();
    let s = wait_for("misconfigured", T, || {
        let s = ws.status();
        (s["upstream"]["state"] == "misconfigured").then_some(s)
    });
    let err = s["upstream"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("stream LUMENFLOW does not capture lumenflow.ws-cfg.events.>")
            && err.contains("other.>"),
        "{err}"
    );
    orders(&ws, 0, 4);
    rt.block_on(async {
        nats.js()
            .await
            .update_stream(config(&["other.>", "lumenflow.>"]))
            .await
            .unwrap();
    });
    wait_connected(&ws);
    wait_drained(&ws, T);
    assert_eq!(nats.stored("lumenflow.ws-cfg.events.>").0.len(), 4);
}

/// `tls://` with the CA in `tls.ca_file`, authenticated by an nkey seed read from a file.
#[test]
fn tls_and_an_nkey_seed_from_a_file() {
    let mut ws = Workspace::new(json!({}), "");
    let dir = ws.path().to_path_buf();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("ca.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    let user = nkeys::KeyPair::new_user();
    std::fs::write(dir.join("agent.nk"), user.seed().unwrap()).unwrap();
    let extra = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\nauthorization {{ users: [ {{ nkey: {} }} ] }}",
        dir.join("ca.pem").display(),
        dir.join("key.pem").display(),
        user.public_key()
    );
    let Some(mut nats) = Nats::start_with(&dir, "nats", &extra) else {
        return;
    };
    nats.scheme_host = "tls://localhost".into();
    shop_pack(&ws);
    nats_agent(
        &ws,
        "ws-tls",
        &nats.url(),
        json!({"tls": {"ca_file": "ca.pem"}, "nats": {"nkey_seed_file": "agent.nk"}}),
    );
    ws.start();
    wait_connected(&ws);
    orders(&ws, 0, 3);
    wait_drained(&ws, T);
    assert_eq!(
        ws.status()["upstream"]["nats"]["auth"],
        format!("nkey seed {}", dir.join("agent.nk").display())
    );
    assert!(
        !ws.log().contains(&user.seed().unwrap()),
        "the seed is never logged"
    );
}

/// The inbox consumer deleted on the server while the agent runs: it is created again after the
/// last committed stream sequence, so what was published meanwhile arrives and nothing handled
/// before is delivered again.
#[test]
fn a_consumer_lost_on_the_server_is_recreated_after_what_was_committed() {
    let mut ws = Workspace::new(json!({}), "recorder");
    let Some(nats) = Nats::start(ws.path()) else {
        return;
    };
    nats_agent(&ws, "ws-lost", &nats.url(), json!({}));
    ws.start();
    wait_connected(&ws);
    let subject = "lumenflow.ws-lost.inbound.conductor.recovery_requested";
    for i in 0..5 {
        nats.publish(subject, &format!("a-{i}"), &recovery(i));
    }
    wait_for("5 handled", T, || (ws.effects().len() == 5).then_some(()));
    Nats::runtime().block_on(async {
        let js = nats.js().await;
        let stream = js.get_stream("LUMENFLOW").await.unwrap();
        stream.delete_consumer("lf-ws-lost").await.unwrap();
    });
    for i in 5..8 {
        nats.publish(subject, &format!("a-{i}"), &recovery(i));
    }
    wait_for("8 handled", T, || (ws.effects().len() == 8).then_some(()));
    let p = ws.pack_status("recorder");
    assert_eq!(p["handled"], 8, "{p}");
    assert_eq!(
        p["replayed"].as_u64().unwrap_or(0),
        0,
        "nothing from before again: {p}"
    );
}

/// Three servers in one JetStream cluster, the operator's stream replicated on all three.
struct Cluster {
    nodes: Vec<Nats>,
}

impl Cluster {
    fn start(dir: &Path) -> Option<Cluster> {
        if !installed() {
            return None;
        }
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect();
                let extra = format!(
                    "server_name: n{i}\nlame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"\ncluster {{ name: lf, listen: \"127.0.0.1:{}\", routes: [{}] }}",
                    routes[i],
                    others.join(", ")
                );
                Nats::start_with(dir, &format!("n{i}"), &extra).unwrap()
            })
            .collect();
        Some(Cluster { nodes })
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The stream with three replicas, once the cluster has a meta leader.
    fn create_r3_stream(&self) {
        let n = &self.nodes[0];
        wait_for("an R3 stream", Duration::from_secs(60), || {
            Nats::runtime().block_on(async {
                let js = n.js().await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: "LUMENFLOW".into(),
                    subjects: vec!["lumenflow.>".into()],
                    num_replicas: 3,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .ok()
                .map(|_| ())
            })
        });
    }

    /// The node the agent is connected to (by its port in `status`), once it is not `not`.
    fn connected_node(&self, ws: &Workspace, not: Option<usize>) -> usize {
        wait_for("the agent's server", T, || {
            let port = ws.status()["upstream"]["nats"]["connected_to"]["port"].as_u64()?;
            self.nodes
                .iter()
                .position(|n| u64::from(n.port) == port)
                .filter(|i| Some(*i) != not)
        })
    }
}

/// Publishing goes on while the node the agent uses is killed, and while another is put in
/// lame duck mode: every accepted event is in the R3 stream once.
#[test]
fn a_three_node_cluster_loses_nothing_when_a_node_dies_or_goes_lame_duck() {
    let mut ws = Workspace::new(json!({}), "");
    let Some(mut cluster) = Cluster::start(ws.path()) else {
        return;
    };
    cluster.create_r3_stream();
    shop_pack(&ws);
    nats_agent(&ws, "ws-r3", &cluster.urls(), json!({}));
    ws.start();
    wait_connected(&ws);
    let replicas = wait_for("the stream in status", T, || {
        ws.status()["upstream"]["nats"]["stream"]["replicas"].as_u64()
    });
    assert_eq!(replicas, 3, "the operator's stream is used as configured");
    let mut next = 0;
    let mut send = |ws: &Workspace, n: usize| {
        for _ in 0..n / 20 {
            orders(ws, next, 20);
            next += 20;
        }
    };
    send(&ws, 200);
    // kill -9 the agent's node under load.
    let first = cluster.connected_node(&ws, None);
    cluster.nodes[first].kill9();
    send(&ws, 300);
    wait_drained(&ws, Duration::from_secs(90));
    let moved = cluster.connected_node(&ws, Some(first));
    cluster.nodes[first].restart();
    // Lame duck for the node it uses now: the server asks its clients to move, then exits.
    let status = Command::new("kill")
        .args(["-USR2", &cluster.nodes[moved].pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    send(&ws, 300);
    wait_drained(&ws, Duration::from_secs(90));
    wait_for("the lame duck mode seen", T, || {
        ws.status()["upstream"]["nats"]["last_lame_duck_ms"]
            .is_i64()
            .then_some(())
    });
    // The lame duck server exits within its 30 s; the agent goes on with the other two.
    wait_for("the lame duck server gone", Duration::from_secs(60), || {
        let c = cluster.nodes[moved].child.as_mut()?;
        c.try_wait().ok().flatten().map(|_| ())
    });
    send(&ws, 200);
    wait_drained(&ws, Duration::from_secs(90));
    cluster.connected_node(&ws, Some(moved));
    let alive = (0..3).find(|i| *i != moved).unwrap();
    let (ids, _) = cluster.nodes[alive].stored("lumenflow.ws-r3.events.>");
    assert_eq!(ids.len(), 1000, "every accepted event is in the stream");
    assert!(ids.values().all(|n| *n == 1), "once each");
}
