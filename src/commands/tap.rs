//! `lumenflow-agent tap`: prints the agent's live event feed (`GET /v1/tap`), one line an
//! event, or JSON lines with `--json`. A tap that falls behind loses events (the agent never
//! waits for it) and says how many on stderr.

use super::exit;
use crate::client::{ApiClient, ClientError};
use crate::workspace::Workspace;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;

/// `/v1/tap?kind=…&pack=…`, percent-encoded.
fn tap_path(pattern: Option<&str>, pack: Option<&str>) -> String {
    let enc = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let mut q = Vec::new();
    if let Some(p) = pattern {
        q.push(format!("kind={}", enc(p)));
    }
    if let Some(p) = pack {
        q.push(format!("pack={}", enc(p)));
    }
    if q.is_empty() {
        "/v1/tap".into()
    } else {
        format!("/v1/tap?{}", q.join("&"))
    }
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the epoch.
pub fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// One event as a line: time, stage, pack, kind, event id, detail.
fn human(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("");
    let detail = match s("detail") {
        "" => String::new(),
        d => format!("  {}", super::one_line(d)),
    };
    format!(
        "{}  {:<13} {:<16} {:<32} {}{}",
        clock(v["at_ms"].as_i64().unwrap_or(0)),
        s("stage"),
        if s("pack").is_empty() { "-" } else { s("pack") },
        s("kind"),
        s("event_id"),
        detail
    )
}

pub fn run(
    workspace: Option<&Path>,
    pattern: Option<&str>,
    pack: Option<&str>,
    json: bool,
    limit: Option<u64>,
) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let client = match ApiClient::connect(&ws) {
        Ok(c) => c,
        Err(e @ ClientError::NotRunning(_)) => {
            eprintln!("{e}");
            return Ok(exit::NOT_RUNNING);
        }
        Err(e) => return Err(e.into()),
    };
    let reader = match client.stream(&tap_path(pattern, pack), &ws) {
        Ok(r) => r,
        Err(e @ ClientError::NotRunning(_)) => {
            eprintln!("{e}");
            return Ok(exit::NOT_RUNNING);
        }
        Err(e) => return Err(e.into()),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let (mut seen, mut lost) = (0u64, 0u64);
    for line in reader.lines() {
        let Ok(line) = line else {
            break;
        };
        if line.trim().is_empty() {
            continue; // keep-alive
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(n) = v["lost"].as_u64() {
            lost += n;
            eprintln!("tap: lost {n} events (this tap fell behind; the agent did not wait for it)");
            if json {
                writeln!(out, "{line}")?;
            }
            continue;
        }
        if json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", human(&v))?;
        }
        out.flush()?;
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            if lost > 0 {
                eprintln!("tap: {lost} events lost in all");
            }
            return Ok(exit::OK);
        }
    }
    if lost > 0 {
        eprintln!("tap: {lost} events lost in all");
    }
    eprintln!("tap: the agent stopped");
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_encodes_the_pattern() {
        assert_eq!(tap_path(None, None), "/v1/tap");
        assert_eq!(
            tap_path(Some("acme-demo:*"), Some("hello")),
            "/v1/tap?kind=acme-demo%3A%2A&pack=hello"
        );
        assert_eq!(clock(86_400_000 + 3_723_004), "01:02:03.004");
    }
}
