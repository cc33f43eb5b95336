//! `GET /v1/tap`: the live event feed (`lumenflow-agent tap`) as newline-delimited JSON.
//!
//! Query: `kind=PATTERN` (`*` globs), `pack=ID`. Each line is an event as seen at one stage
//! (`{"stage", "at_ms", "pack", "detail", "kind", "event_id", "event"}`); `{"lost": n}` says
//! the reader fell behind the agent's ring and n entries were skipped; a blank line every few
//! seconds keeps an idle stream alive (and finds a reader that went away).
//!
//! A reader that does not read costs the agent nothing but its place in the ring (`tap`): the
//! stream's writes wait on the socket, never on the agent; the connection's write timeout
//! (`api_server`) ends one that stopped reading altogether.

use crate::api::{error, ApiState};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use lumenflow_actors::tap::{kind_matches, Next, TapEvent};
use serde_json::json;
use std::time::Duration;

/// A blank line after this long without events.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Entries written in one chunk at most (what is there at once goes in one write).
const CHUNK_EVENTS: usize = 256;

struct Filter {
    kind: Option<String>,
    pack: Option<String>,
}

impl Filter {
    fn wants(&self, e: &TapEvent) -> bool {
        self.kind
            .as_deref()
            .is_none_or(|p| kind_matches(p, &e.envelope.kind))
            && self
                .pack
                .as_deref()
                .is_none_or(|p| e.pack.as_deref() == Some(p))
    }
}

/// `%XX` and `+` decoded (a pattern such as `acme-demo:*` arrives encoded).
fn decode(v: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn filter_of(query: Option<&str>) -> Filter {
    let mut f = Filter {
        kind: None,
        pack: None,
    };
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        match k {
            "kind" if !v.is_empty() => f.kind = Some(v),
            "pack" if !v.is_empty() => f.pack = Some(v),
            _ => {}
        }
    }
    f
}

/// One line of the feed, serialized straight from the agent's envelope (no copy of it).
#[derive(serde::Serialize)]
struct Line<'a> {
    stage: lumenflow_actors::tap::Stage,
    at_ms: i64,
    pack: Option<&'a str>,
    detail: Option<&'a str>,
    kind: &'a str,
    event_id: &'a str,
    event: &'a lumenflow_pack_sdk::Envelope,
}

fn line(e: &TapEvent, out: &mut Vec<u8>) {
    let l = Line {
        stage: e.stage,
        at_ms: e.at_ms,
        pack: e.pack.as_deref(),
        detail: e.detail.as_deref(),
        kind: &e.envelope.kind,
        event_id: &e.envelope.event_id,
        event: &e.envelope,
    };
    let _ = serde_json::to_writer(&mut *out, &l);
    out.push(b'\n');
}

fn lost(n: u64, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, &json!({ "lost": n }));
    out.push(b'\n');
}

/// Renders what a read took into one chunk (what is there at once goes in one write).
fn chunk(taken: Vec<Next>, filter: &Filter) -> Vec<u8> {
    let mut out = Vec::new();
    for item in taken {
        match item {
            Next::Lost(k) => lost(k, &mut out),
            Next::Event(e) if filter.wants(&e) => line(&e, &mut out),
            Next::Event(_) => {}
        }
    }
    out
}

pub async fn tap(State(state): State<ApiState>, req: Request) -> Response {
    if state.shutdown.load(std::sync::atomic::Ordering::Relaxed) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        );
    }
    let filter = filter_of(req.uri().query());
    let reader = state.stats.tap.subscribe();
    let stream =
        futures_util::stream::unfold((reader, filter), |(mut reader, filter)| async move {
            loop {
                let taken = match tokio::time::timeout(KEEPALIVE, reader.next(CHUNK_EVENTS)).await {
                    Err(_) => {
                        return Some((
                            Ok::<_, std::io::Error>(Bytes::from_static(b"\n")),
                            (reader, filter),
                        ))
                    }
                    Ok(t) => t,
                };
                let out = chunk(taken, &filter);
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), (reader, filter)));
                }
            }
        });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_a_pattern_and_a_pack() {
        let f = filter_of(Some("kind=acme-demo%3A*&pack=hello"));
        assert_eq!(f.kind.as_deref(), Some("acme-demo:*"));
        assert_eq!(f.pack.as_deref(), Some("hello"));
        let f = filter_of(None);
        assert!(f.kind.is_none() && f.pack.is_none());
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("%41b"), "Ab");
    }
}
