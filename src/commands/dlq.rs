//! `lumenflow-agent dlq list | retry ID|--all | purge [ID] [--yes]`.
//!
//! `list` reads SQLite directly. `retry` and `purge` go through the running agent (so its
//! counters stay right and retried events are delivered at once); when no agent runs they
//! write the database directly, and the next `start` delivers what was retried.

use super::exit;
use crate::cli::DlqAction;
use crate::client::post_if_running;
use crate::workspace::Workspace;
use lumenflow_actors::dead_letters;
use lumenflow_actors::store::{open_connection, open_reader, Durability};
use serde_json::{json, Value};
use std::path::Path;

pub fn run(workspace: Option<&Path>, action: &DlqAction) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let db = ws.db_file();
    match action {
        DlqAction::List { json } => {
            let rows = if db.exists() {
                dead_letters::list(&open_reader(&db)?, 1_000_000)?
            } else {
                Vec::new()
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>5}  {:<8} {:<20} {:<34} {:<38} {:>8}  ERROR",
                    "ID", "ORIGIN", "PACK", "KIND", "EVENT ID", "ATTEMPTS"
                );
                for r in &rows {
                    println!(
                        "{:>5}  {:<8} {:<20} {:<34} {:<38} {:>8}  {}",
                        r.id,
                        r.origin,
                        r.pack,
                        r.kind,
                        r.event_id,
                        r.attempts,
                        super::one_line(&r.error)
                    );
                }
                println!(
                    "{} dead letter(s); `lumenflow-agent dlq retry ID|--all` delivers them again",
                    rows.len()
                );
            }
            Ok(exit::OK)
        }
        DlqAction::Retry { id, all } => {
            if id.is_none() && !*all {
                anyhow::bail!("name a dead letter (`dlq retry ID`) or use `dlq retry --all`");
            }
            let body = match id {
                Some(id) => json!({"id": id}),
                None => json!({"all": true}),
            };
            match via_agent(&ws, "/v1/dlq/retry", &body)? {
                Some(v) => println!("{}", v["summary"].as_str().unwrap_or_default()),
                None => {
                    let ids = id.map(|i| vec![i]);
                    let conn = open_connection(&db, Durability::Full)?;
                    let tx = conn.unchecked_transaction()?;
                    let report = dead_letters::retry(&tx, ids.as_deref())?;
                    tx.commit()?;
                    println!("{}; the agent is not running: they are delivered at the next `lumenflow-agent start`", report.summary());
                }
            }
            Ok(exit::OK)
        }
        DlqAction::Purge { id, yes } => {
            let what = match id {
                Some(id) => format!("dead letter {id}"),
                None => "every dead letter".to_string(),
            };
            if !*yes && !confirm(&format!("Delete {what} for good? [y/N] "))? {
                println!("nothing deleted");
                return Ok(exit::INVALID);
            }
            match via_agent(&ws, "/v1/dlq/purge", &json!({"id": id}))? {
                Some(v) => println!("purged {} dead letter(s)", v["purged"]),
                None => {
                    let n = if db.exists() {
                        dead_letters::purge(&open_connection(&db, Durability::Full)?, *id)?
                    } else {
                        0
                    };
                    println!("purged {n} dead letter(s)");
                }
            }
            Ok(exit::OK)
        }
    }
}

/// Asks on the terminal; without one, refuses (a script must say `--yes`).
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("`dlq purge` deletes for good and stdin is not a terminal to ask: add --yes");
    }
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// `Some(reply)` from the running agent, `None` when none runs.
fn via_agent(ws: &Workspace, path: &str, body: &Value) -> anyhow::Result<Option<Value>> {
    match post_if_running(ws, path, body)? {
        Some(r) if r.status == 200 => Ok(Some(r.body)),
        Some(r) => anyhow::bail!("{}", r.message()),
        None => Ok(None),
    }
}
