//! The workload, on threads of its own while faults are injected:
//! - the shop producer posts batches of `shop:order_placed` to the agent's local API, each
//!   event with an idempotency key (`order-N`), and retries a batch that got no clear answer
//!   (the agent killed, stopped, or the disk full) until it is accepted, as a real producer
//!   would; an order counts as accepted when a 200 said so;
//! - the job publisher publishes `conductor:job_requested` at the control plane (the agent
//!   pulls them), with delays drawn so that some handlers run into the timeout, a few poison
//!   jobs, a few events written the way other LumenFlow code writes them (`+00:00`), and a
//!   few v1 kernel events the agent must dead-letter (origin `inbound`).

use crate::world::{post, TOKEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Orders a 200 accepted.
    pub orders: BTreeSet<u64>,
    /// Answers that were no 200 and made the producer send the batch again.
    pub order_retries: u64,
    /// Orders refused with a 4xx other than 429 (must stay 0: the batches are valid).
    pub orders_refused: u64,
    pub jobs: BTreeSet<String>,
    pub poison: BTreeSet<String>,
    pub v1_events: BTreeSet<String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    pub sent: Arc<Mutex<Sent>>,
    threads: Vec<JoinHandle<()>>,
}

fn api(api_file: &PathBuf) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(api_file).ok()?).ok()?;
    Some((
        v["url"].as_str()?.to_string(),
        v["token"].as_str()?.to_string(),
    ))
}

impl Load {
    pub fn start(seed: u64, api_file: PathBuf, conductor: String, workspace_id: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Sent::default()));
        let mut threads = Vec::new();
        {
            let (stop, sent) = (stop.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                shop_producer(seed, &api_file, &stop, &sent)
            }));
        }
        {
            let (stop, sent) = (stop.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                job_publisher(seed, &conductor, &workspace_id, &stop, &sent)
            }));
        }
        Load {
            stop,
            sent,
            threads,
        }
    }

    /// Stops both threads; a batch in flight is finished (accepted) first.
    pub fn finish(self) -> Sent {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        s.clone()
    }
}

fn lock(sent: &Mutex<Sent>) -> std::sync::MutexGuard<'_, Sent> {
    sent.lock().unwrap_or_else(|p| p.into_inner())
}

fn shop_producer(seed: u64, api_file: &PathBuf, stop: &AtomicBool, sent: &Mutex<Sent>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5409);
    let mut next = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let n = rng.random_range(1..=5);
        let batch: Vec<u64> = (next..next + n).collect();
        next += n;
        let events: Vec<Value> = batch
            .iter()
            .map(|i| json!({"kind": "shop:order_placed", "payload": {"n": i}, "idempotency_key": format!("order-{i}")}))
            .collect();
        let body = json!({"workspace_id": crate::world::IDENTITY, "events": events});
        // Until a clear answer: a batch that may or may not have been accepted is sent again
        // with the same keys (the same event ids).
        let mut tries = 0;
        loop {
            let reply = api(api_file)
                .and_then(|(url, token)| post(&format!("{url}/api/v1/events"), &token, &body));
            match reply {
                Some((200, _)) => {
                    lock(sent).orders.extend(batch.iter().copied());
                    break;
                }
                Some((s, _)) if (400..500).contains(&s) && s != 429 && s != 408 => {
                    lock(sent).orders_refused += batch.len() as u64;
                    break;
                }
                _ => {
                    lock(sent).order_retries += 1;
                    tries += 1;
                    // Give up on this batch only at the very end (stop asked and 30 s of tries).
                    if stop.load(Ordering::SeqCst) && tries > 600 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(10..40)));
    }
}

fn job_publisher(seed: u64, conductor: &str, ws: &str, stop: &AtomicBool, sent: &Mutex<Sent>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x10b5);
    let mut next = 0u64;
    let url = format!("{conductor}/admin/publish");
    while !stop.load(Ordering::SeqCst) {
        let mut events = Vec::new();
        let mut jobs = Vec::new();
        let mut poison = Vec::new();
        let mut v1 = Vec::new();
        let mut raw = false;
        for _ in 0..rng.random_range(1..=2) {
            let job = format!("job-{next}");
            next += 1;
            let roll = rng.random_range(0..1000);
            let (delay_ms, gap_ms) = if roll < 30 {
                // Around the handler timeout: it lands before the emit, between emit and put,
                // or not at all.
                let t = crate::world::HANDLER_TIMEOUT_MS;
                (rng.random_range(t - 400..t + 200), rng.random_range(0..300))
            } else {
                (rng.random_range(0..15), rng.random_range(0..15))
            };
            let is_poison = (30..35).contains(&roll);
            let mut e = json!({"kind": "conductor:job_requested", "event_id": format!("{job}-evt"),
                "payload": {"job": job, "delay_ms": delay_ms, "gap_ms": gap_ms, "poison": is_poison}});
            if (45..55).contains(&roll) {
                // Written with an offset, as other LumenFlow code may: normalised by the agent.
                raw = true;
                e = json!({"schema_version": 2, "event_id": format!("{job}-evt"), "kind": "conductor:job_requested",
                    "timestamp": "2026-04-20T00:00:00+00:00", "from": "conductor", "payload": e["payload"].clone()});
            }
            if (55..60).contains(&roll) {
                let id = format!("v1-{next}");
                v1.push(id.clone());
                events.push(json!({"schema_version": 1, "kind": "task_created", "timestamp": "2026-04-20T00:00:00.000Z", "task_id": id}));
                raw = true;
                continue;
            }
            if is_poison {
                poison.push(job.clone());
            }
            jobs.push(job);
            events.push(e);
        }
        if raw {
            // A raw publish stores events as given: complete the plain ones.
            for e in &mut events {
                if e.get("schema_version").is_none() {
                    *e = json!({"schema_version": 2, "event_id": e["event_id"], "kind": e["kind"],
                        "timestamp": "2026-04-20T00:00:00.000Z", "from": "conductor", "payload": e["payload"]});
                }
            }
        }
        let body = json!({"workspace_id": ws, "events": events, "raw": raw});
        if let Some((200, _)) = post(&url, TOKEN, &body) {
            let mut s = lock(sent);
            s.jobs.extend(jobs);
            s.poison.extend(poison);
            s.v1_events.extend(v1);
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(80..250)));
    }
}
