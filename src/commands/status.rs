//! `lumenflow-agent status [--json]`: the live state of the running agent; when none runs,
//! says so (exit 3) and shows the durable state read from SQLite.

use super::exit;
use crate::client::{ApiClient, ClientError};
use crate::workspace::Workspace;
use lumenflow_actors::store::open_reader;
use serde_json::{json, Value};
use std::path::Path;

pub fn run(workspace: Option<&Path>, as_json: bool) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let live = ApiClient::connect(&ws).and_then(|c| c.get("/v1/status", &ws));
    match live {
        Ok(reply) if reply.status == 200 => {
            if as_json {
                println!("{}", serde_json::to_string_pretty(&reply.body)?);
            } else {
                print_live(&reply.body);
            }
            Ok(exit::OK)
        }
        Ok(reply) => anyhow::bail!("the agent answered {}: {}", reply.status, reply.message()),
        Err(ClientError::NotRunning(_)) => {
            let durable = durable_state(&ws);
            let pid = crate::agent::running_pid(&ws);
            if as_json {
                let doc = json!({"agent": {"running": false, "workspace": ws.root.display().to_string(), "lock_held_by_pid": pid}, "durable": durable});
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                match &pid {
                    Some(p) => println!("lumenflow-agent holds the lock in {} (pid {p}) but its API does not answer", ws.root.display()),
                    None => println!("lumenflow-agent is not running in {}", ws.root.display()),
                }
                print_durable(&durable);
            }
            Ok(exit::NOT_RUNNING)
        }
        Err(e) => Err(e.into()),
    }
}

/// What SQLite holds, read without the agent.
pub fn durable_state(ws: &Workspace) -> Value {
    let path = ws.db_file();
    if !path.exists() {
        return json!({"database": null, "note": "no state yet: the agent has never run here"});
    }
    let read = || -> Result<Value, Box<dyn std::error::Error>> {
        let c = open_reader(&path)?;
        let one =
            |sql: &str| -> Result<i64, rusqlite::Error> { c.query_row(sql, [], |r| r.get(0)) };
        let mut packs = Vec::new();
        let mut stmt = c.prepare("SELECT pack, cursor FROM pack_cursor ORDER BY pack")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (pack, cursor) = row?;
            let pending: i64 = c.query_row(
                "SELECT count(*) FROM inbound WHERE seq > ?1",
                [cursor],
                |r| r.get(0),
            )?;
            packs.push(json!({"id": pack, "cursor": cursor, "inbound_after_cursor": pending}));
        }
        let now = lumenflow_actors::store::now_ms();
        let oldest = one("SELECT coalesce(min(created_ms), 0) FROM outbox")?;
        Ok(json!({
            "database": ws.display(&path),
            "queue": {"durable_depth": one("SELECT count(*) FROM outbox")?, "oldest_age_s": if oldest > 0 { (now - oldest) as f64 / 1000.0 } else { 0.0 }},
            "inbound_log": one("SELECT count(*) FROM inbound")?,
            "replay_log": {"entries": one("SELECT count(*) FROM replay_log")?},
            "dead_letters": one("SELECT count(*) FROM dead_letters")?,
            "mem_inbox": one("SELECT count(*) FROM mem_inbox")?,
            "approvals": lumenflow_actors::approvals::held::pending(&c, 20)
                .map(|(pending, held)| json!({"pending": pending, "held": held}))
                .unwrap_or(Value::Null),
            "packs": packs,
        }))
    };
    read().unwrap_or_else(|e| json!({"database": ws.display(&path), "error": e.to_string()}))
}

/// Held events waiting for a decision: each with its age and the time left to its deadline.
fn print_approvals(a: &Value) {
    let pending = a["pending"].as_i64().unwrap_or(0);
    let decided = ["approved", "rejected", "expired"]
        .iter()
        .map(|k| format!("{} {k}", a[k].as_u64().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ");
    if pending == 0
        && a["approved"].as_u64().unwrap_or(0)
            + a["rejected"].as_u64().unwrap_or(0)
            + a["expired"].as_u64().unwrap_or(0)
            == 0
    {
        return;
    }
    println!(
        "approvals: {pending} held event(s) waiting; since start {decided}{}",
        a["relay_error"]
            .as_str()
            .map(|e| format!("; control plane: {}", super::one_line(e)))
            .unwrap_or_default()
    );
    for h in a["held"].as_array().into_iter().flatten() {
        let left = h["deadline_in_s"].as_f64().unwrap_or(0.0);
        println!(
            "  {} {} from {} (event {}): waiting {}, {} ({}) then {}",
            dash(&h["approval_id"]),
            dash(&h["kind"]),
            dash(&h["pack"]),
            dash(&h["event_id"]),
            age(h["age_s"].as_f64().unwrap_or(0.0) as i64),
            if left > 0.0 {
                format!("deadline in {}", age(left as i64))
            } else {
                "deadline passed".to_string()
            },
            dash(&h["deadline"]),
            if h["on_expiry"] == "allow" {
                "delivered"
            } else {
                "expired"
            },
        );
    }
    if pending > 0 {
        println!("  decide with `lumenflow-agent approvals approve ID` or `approvals deny ID --reason ...`");
    }
}

fn print_durable(d: &Value) {
    if let Some(e) = d.get("error") {
        println!(
            "durable state: cannot read {}: {e}",
            d["database"].as_str().unwrap_or("?")
        );
        return;
    }
    if d["database"].is_null() {
        println!("durable state: none yet (the agent has never run here)");
        return;
    }
    println!("durable state ({}):", d["database"].as_str().unwrap_or(""));
    println!(
        "  queue: {} durable events waiting for the upstream (oldest {:.1} s)",
        d["queue"]["durable_depth"],
        d["queue"]["oldest_age_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  dead letters: {}   replay log: {} entries   mem:inbox: {} events",
        d["dead_letters"], d["replay_log"]["entries"], d["mem_inbox"]
    );
    if d["approvals"]["pending"].as_i64().unwrap_or(0) > 0 {
        print_approvals(&d["approvals"]);
    }
    for p in d["packs"].as_array().into_iter().flatten() {
        println!(
            "  pack {}: {} inbound events after its cursor",
            p["id"].as_str().unwrap_or(""),
            p["inbound_after_cursor"]
        );
    }
}

fn dash(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `42s`, `3m05s`, `2h07m`.
fn age(s: i64) -> String {
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// A rate in a table cell: `0`, `0.4`, `12`, `1.3k`.
fn rate(r: f64) -> String {
    if r >= 1000.0 {
        format!("{:.1}k", r / 1000.0)
    } else if r >= 10.0 || r == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// The pack's state as `status` says it: a pack with nothing to run is `idle (no handlers)`.
fn state_words(p: &Value) -> String {
    match p["state"].as_str() {
        Some("idle") => "idle (no handlers)".into(),
        _ => dash(&p["state"]),
    }
}

/// `   last error 12s ago: …` of the upstream, or nothing.
fn last_error(u: &Value) -> String {
    let Some(e) = u["last_error"].as_str() else {
        return String::new();
    };
    let when = u["last_error_ms"]
        .as_i64()
        .filter(|t| *t > 0)
        .map(|t| {
            format!(
                " {} ago",
                age((lumenflow_actors::store::now_ms() - t).max(0) / 1000)
            )
        })
        .unwrap_or_default();
    format!("   last error{when}: {}", super::one_line(e))
}

fn print_live(s: &Value) {
    let a = &s["agent"];
    let up = a["uptime_s"].as_u64().unwrap_or(0);
    println!(
        "lumenflow-agent {} running (pid {}, up {}h{:02}m{:02}s) in {}",
        dash(&a["version"]),
        a["pid"],
        up / 3600,
        (up / 60) % 60,
        up % 60,
        dash(&a["workspace"])
    );
    let u = &s["upstream"];
    println!(
        "identity {}   upstream {} ({}; from {}){}",
        dash(&a["identity"]),
        dash(&u["endpoint"]),
        dash(&u["state"]),
        dash(&u["source"]),
        last_error(u)
    );
    let r = &s["rates"];
    let per_s = |w: &str, k: &str| rate(r[w][k].as_f64().unwrap_or(0.0));
    println!(
        "events/s (last 10 s | 1 min): inbound {} | {}   accepted {} | {}   delivered {} | {}   pushed {} | {}",
        per_s("10s", "inbound"),
        per_s("1m", "inbound"),
        per_s("10s", "accepted"),
        per_s("1m", "accepted"),
        per_s("10s", "delivered"),
        per_s("1m", "delivered"),
        per_s("10s", "pushed"),
        per_s("1m", "pushed"),
    );
    println!();
    println!(
        "{:<24} {:<10} {:<18} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8}  {:<8} {:>9}  LAST ERROR",
        "PACK",
        "VERSION",
        "STATE",
        "IN/s",
        "OUT/s",
        "HANDLED",
        "REPLAYED",
        "IGNORED",
        "FAILED",
        "PENDING",
        "RESTARTS",
        "MANIFEST",
        "LOADED"
    );
    let packs = s["packs"].as_array().cloned().unwrap_or_default();
    if packs.is_empty() {
        println!("(no packs)");
    }
    let now_ms = lumenflow_actors::store::now_ms();
    for p in &packs {
        let hash: String = p["manifest_hash"]
            .as_str()
            .map(|h| h.chars().take(8).collect())
            .unwrap_or_else(|| "-".into());
        // 0: never loaded (an invalid manifest from the start), not 1970.
        let loaded = p["loaded_at_ms"]
            .as_i64()
            .filter(|t| *t > 0)
            .map(|t| format!("{} ago", age((now_ms - t).max(0) / 1000)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<10} {:<18} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8}  {:<8} {:>9}  {}",
            dash(&p["id"]),
            dash(&p["version"]),
            state_words(p),
            rate(p["rates"]["in_10s"].as_f64().unwrap_or(0.0)),
            rate(p["rates"]["out_10s"].as_f64().unwrap_or(0.0)),
            dash(&p["handled"]),
            dash(&p["replayed"]),
            dash(&p["ignored"]),
            dash(&p["failed"]),
            dash(&p["pending"]),
            dash(&p["restarts"]),
            hash,
            loaded,
            super::one_line(&dash(&p["last_error"]))
        );
    }
    println!();
    let q = &s["queue"];
    println!("queue: {} durable waiting (oldest {:.1} s), {} ephemeral dropped, {} backpressure refusals",
        q["durable_depth"], q["oldest_age_s"].as_f64().unwrap_or(0.0), q["ephemeral_dropped"], q["backpressure_rejections"]);
    let i = &s["inbound"];
    println!(
        "upstream: {} pushed   inbound: {} accepted, {} agent:* events, {} for no loaded pack (kept for packs that are away), {} unreadable (dead-lettered)",
        u["pushed"],
        i["accepted"],
        i["agent"].as_u64().unwrap_or(0),
        i["unrouted"].as_u64().unwrap_or(0),
        i["dead_lettered"].as_u64().unwrap_or(0)
    );
    // NATS: which server, which stream, each consumer's lag, when the last publish was acked.
    let n = &u["nats"];
    if n.is_object() {
        let server = &n["connected_to"];
        let last_ack = n["last_ack_ms"]
            .as_i64()
            .map(|ms| {
                format!(
                    "{} ago",
                    age((lumenflow_actors::store::now_ms() - ms) / 1000)
                )
            })
            .unwrap_or_else(|| "never".into());
        println!(
            "nats: server {} ({}:{} v{}), stream {} (duplicate window {} s, {} replica(s)), last publish ack {last_ack}, {} consumer recoveries",
            server["name"].as_str().unwrap_or("-"),
            server["host"].as_str().unwrap_or("-"),
            server["port"],
            server["version"].as_str().unwrap_or("?"),
            n["stream"]["name"].as_str().unwrap_or("-"),
            n["stream"]["duplicate_window_s"],
            n["stream"]["replicas"],
            n["consumer_recoveries"],
        );
        for (name, c) in n["consumers"].as_object().into_iter().flatten() {
            println!(
                "  consumer {name} on {}: {} pending, {} unacked, {} delivered{}",
                c["filter"].as_str().unwrap_or("?"),
                c["pending"],
                c["ack_pending"],
                c["delivered"],
                c["last_error"]
                    .as_str()
                    .map(|e| format!(" ({})", super::one_line(e)))
                    .unwrap_or_default()
            );
        }
    }
    // The platform's sync port: records on their way to the control plane, and where the
    // policies and config it serves came from (a cache while the control plane is away).
    let sp = &s["sync_port"];
    if sp["mode"] == "relay" {
        let mut line = format!(
            "sync port (relayed): {} records waiting, {} forwarded, {} refused",
            u["records_waiting"], u["records_forwarded"], u["records_refused"]
        );
        for (path, p) in sp["pulls"].as_object().into_iter().flatten() {
            line.push_str(&format!(
                "; {path} from {}{}",
                p["source"].as_str().unwrap_or("?"),
                p["age_s"]
                    .as_i64()
                    .map(|a| format!(" ({} old)", age(a)))
                    .unwrap_or_default()
            ));
        }
        println!("{line}");
    }
    println!(
        "replay log: {} entries   dead letters: {}   reloads: {}{}",
        s["replay_log"]["entries"],
        s["dead_letters"],
        s["reload"]["count"],
        s["reload"]["last_error"]
            .as_str()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default()
    );
    if let Some(off) = s["reload"]["off"].as_str() {
        println!("hot reload: not watching: {}", super::one_line(off));
    }
    print_approvals(&s["approvals"]);
    // What one local process or pack can take of the agent, and what confines the packs.
    let files = &s["limits"]["open_files"];
    let a = &s["api"];
    println!(
        "limits: open files {}{}; API connections {} of {} ({} refused); confinement here: {}",
        files["limit"],
        match (files["started_with"].as_u64(), files["limit"].as_u64()) {
            (Some(from), Some(to)) if from < to => format!(" (raised from {from})"),
            _ => String::new(),
        },
        a["connections"],
        a["max_connections"],
        a["refused"],
        s["limits"]["sandbox_support"].as_str().unwrap_or("-"),
    );
    for p in s["packs"].as_array().into_iter().flatten() {
        if let Some(sb) = p["sandbox"].as_str().filter(|sb| !sb.starts_with("none")) {
            println!("  {} confined: {sb}", dash(&p["id"]));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(super::age(42), "42s");
        assert_eq!(super::age(185), "3m05s");
        assert_eq!(super::age(7620), "2h07m");
    }
}
