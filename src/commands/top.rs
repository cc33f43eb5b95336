//! `lumenflow-agent top`: a live table of every pack (state, events/s in and out, counters,
//! what is in flight and for how long, restarts, dead letters, the next retry), with the queue
//! and the upstream above it. It reads `GET /v1/status` once a refresh, like `status`, so it
//! costs the agent one small request a second and takes nothing from its actors.
//!
//! Rates are the change of each pack's counters between two refreshes (the first frame shows
//! the agent's own 10 s rates). Keys: `q`/Esc quit, `s` next sort column, `r` reverse, `/`
//! filter by pack id, `p` pause. A narrow terminal drops the least useful columns first.
//! `--once` prints one frame as text and exits.

use super::exit;
use crate::client::{ApiClient, ClientError};
use crate::workspace::Workspace;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Columns of the pack table, in display order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Pack,
    State,
    In,
    Out,
    Handled,
    Replayed,
    Failed,
    InFlight,
    Restarts,
    Dlq,
    NextRetry,
}

impl Col {
    const ALL: [Col; 11] = [
        Col::Pack,
        Col::State,
        Col::In,
        Col::Out,
        Col::Handled,
        Col::Replayed,
        Col::Failed,
        Col::InFlight,
        Col::Restarts,
        Col::Dlq,
        Col::NextRetry,
    ];
    /// Which columns stay as the terminal narrows: first ones first.
    const PRIORITY: [Col; 11] = [
        Col::Pack,
        Col::State,
        Col::In,
        Col::Out,
        Col::InFlight,
        Col::Dlq,
        Col::Failed,
        Col::Restarts,
        Col::Handled,
        Col::NextRetry,
        Col::Replayed,
    ];
    /// What `s` cycles through.
    const SORTS: [Col; 8] = [
        Col::In,
        Col::Out,
        Col::InFlight,
        Col::Failed,
        Col::Dlq,
        Col::Restarts,
        Col::Pack,
        Col::State,
    ];
    fn title(self) -> &'static str {
        match self {
            Col::Pack => "PACK",
            Col::State => "STATE",
            Col::In => "IN/s",
            Col::Out => "OUT/s",
            Col::Handled => "HANDLED",
            Col::Replayed => "REPLAYED",
            Col::Failed => "FAILED",
            Col::InFlight => "IN FLIGHT",
            Col::Restarts => "RESTARTS",
            Col::Dlq => "DLQ",
            Col::NextRetry => "RETRY IN",
        }
    }
    fn width(self) -> u16 {
        match self {
            Col::Pack => 14,
            Col::State => 10,
            Col::In | Col::Out => 8,
            Col::Handled | Col::Replayed | Col::Restarts | Col::NextRetry => 9,
            Col::Failed => 7,
            Col::InFlight => 11,
            Col::Dlq => 6,
        }
    }
}

/// One pack as the table shows it.
#[derive(Debug, Clone, Default)]
struct PackRow {
    id: String,
    state: String,
    rate_in: f64,
    rate_out: f64,
    handled: u64,
    replayed: u64,
    failed: u64,
    in_flight: i64,
    in_flight_age_s: f64,
    restarts: u64,
    dlq: u64,
    next_retry_in_s: Option<f64>,
}

/// What one refresh read, and what the previous one read (for rates).
#[derive(Default)]
struct View {
    workspace: String,
    status: Option<Value>,
    rows: Vec<PackRow>,
    /// Per pack: (in, out) totals and when they were read.
    previous: HashMap<String, (u64, u64)>,
    previous_at: Option<Instant>,
    /// Agent-wide totals at the previous refresh: inbound, pushed.
    previous_totals: Option<(u64, u64)>,
    rate_inbound: f64,
    rate_pushed: f64,
    error: Option<String>,
    sort: usize,
    reverse: bool,
    filter: String,
    editing: bool,
    paused: bool,
    interval: Duration,
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

impl View {
    /// Takes a new status reply: rows with rates since the previous one.
    fn update(&mut self, status: Value, now: Instant) {
        let dt = self
            .previous_at
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|dt| *dt > 0.05);
        let mut next = HashMap::new();
        self.rows = status["packs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(|p| {
                let id = p["id"].as_str().unwrap_or("").to_string();
                let total_in =
                    u(&p["handled"]) + u(&p["replayed"]) + u(&p["ignored"]) + u(&p["failed"]);
                let total_out = u(&p["emitted"]);
                let (rate_in, rate_out) = match (dt, self.previous.get(&id)) {
                    (Some(dt), Some((i, o))) => (
                        total_in.saturating_sub(*i) as f64 / dt,
                        total_out.saturating_sub(*o) as f64 / dt,
                    ),
                    _ => (
                        p["rates"]["in_10s"].as_f64().unwrap_or(0.0),
                        p["rates"]["out_10s"].as_f64().unwrap_or(0.0),
                    ),
                };
                next.insert(id.clone(), (total_in, total_out));
                PackRow {
                    state: p["state"].as_str().unwrap_or("").to_string(),
                    rate_in,
                    rate_out,
                    handled: u(&p["handled"]),
                    replayed: u(&p["replayed"]),
                    failed: u(&p["failed"]),
                    in_flight: p["in_flight"].as_i64().unwrap_or(0),
                    in_flight_age_s: p["in_flight_age_s"].as_f64().unwrap_or(0.0),
                    restarts: u(&p["restarts"]),
                    dlq: u(&p["dead_lettered"]),
                    next_retry_in_s: p["next_retry_in_s"].as_f64(),
                    id,
                }
            })
            .collect();
        let totals = (
            u(&status["inbound"]["accepted"]),
            u(&status["upstream"]["pushed"]),
        );
        match (dt, self.previous_totals) {
            (Some(dt), Some((i, p))) => {
                self.rate_inbound = totals.0.saturating_sub(i) as f64 / dt;
                self.rate_pushed = totals.1.saturating_sub(p) as f64 / dt;
            }
            _ => {
                self.rate_inbound = status["rates"]["10s"]["inbound"].as_f64().unwrap_or(0.0);
                self.rate_pushed = status["rates"]["10s"]["pushed"].as_f64().unwrap_or(0.0);
            }
        }
        self.previous_totals = Some(totals);
        self.previous = next;
        self.previous_at = Some(now);
        self.status = Some(status);
        self.error = None;
    }

    fn sort_col(&self) -> Col {
        Col::SORTS[self.sort % Col::SORTS.len()]
    }

    /// The rows to show: filtered, sorted.
    fn shown(&self) -> Vec<&PackRow> {
        let mut rows: Vec<&PackRow> = self
            .rows
            .iter()
            .filter(|r| self.filter.is_empty() || r.id.contains(&self.filter))
            .collect();
        let col = self.sort_col();
        let key = |r: &PackRow| -> f64 {
            match col {
                Col::In => r.rate_in,
                Col::Out => r.rate_out,
                Col::InFlight => r.in_flight as f64,
                Col::Failed => r.failed as f64,
                Col::Dlq => r.dlq as f64,
                Col::Restarts => r.restarts as f64,
                _ => 0.0,
            }
        };
        rows.sort_by(|a, b| {
            let by = match col {
                Col::Pack => a.id.cmp(&b.id),
                Col::State => a.state.cmp(&b.state).then(a.id.cmp(&b.id)),
                // Largest first (then by id, so equal rows keep still).
                _ => key(b)
                    .partial_cmp(&key(a))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.id.cmp(&b.id)),
            };
            if self.reverse {
                by.reverse()
            } else {
                by
            }
        });
        rows
    }

    /// A key press; `false` to quit.
    fn key(&mut self, code: KeyCode, mods: KeyModifiers) -> bool {
        if self.editing {
            match code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('c') if mods.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Char('s') => self.sort = (self.sort + 1) % Col::SORTS.len(),
            KeyCode::Char('r') => self.reverse = !self.reverse,
            KeyCode::Char('p') => self.paused = !self.paused,
            KeyCode::Char('/') => {
                self.editing = true;
                self.filter.clear();
            }
            _ => {}
        }
        true
    }
}

/// `1.2k`, `340`, `0.5`: a rate in at most 6 characters.
fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.0}k", r / 1000.0)
    } else if r >= 1000.0 {
        format!("{:.1}k", r / 1000.0)
    } else if r >= 10.0 || r == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

fn seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!("{:.0}h{:02.0}m", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    } else if s >= 60.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1}s")
    }
}

fn cell(r: &PackRow, col: Col) -> Cell<'static> {
    let text = match col {
        Col::Pack => r.id.clone(),
        Col::State => r.state.clone(),
        Col::In => rate(r.rate_in),
        Col::Out => rate(r.rate_out),
        Col::Handled => r.handled.to_string(),
        Col::Replayed => r.replayed.to_string(),
        Col::Failed => r.failed.to_string(),
        Col::InFlight if r.in_flight > 0 => {
            format!("{} {}", r.in_flight, seconds(r.in_flight_age_s))
        }
        Col::InFlight => "-".into(),
        Col::Restarts => r.restarts.to_string(),
        Col::Dlq => r.dlq.to_string(),
        Col::NextRetry => r.next_retry_in_s.map(seconds).unwrap_or_else(|| "-".into()),
    };
    let style = match (col, r.state.as_str()) {
        (Col::State, "crashed" | "invalid") => Style::new().fg(Color::Red),
        (Col::State, "restarting") => Style::new().fg(Color::Yellow),
        (Col::State, "running") => Style::new().fg(Color::Green),
        (Col::Dlq, _) if r.dlq > 0 => Style::new().fg(Color::Red),
        _ => Style::new(),
    };
    Cell::from(text).style(style)
}

/// The columns that fit `width`, in display order.
fn columns_for(width: u16) -> Vec<Col> {
    let mut used: u16 = 0;
    let mut keep = Vec::new();
    for c in Col::PRIORITY {
        let w = c.width() + 1;
        if used + w <= width.max(Col::Pack.width() + Col::State.width() + 2) {
            used += w;
            keep.push(c);
        }
    }
    Col::ALL.into_iter().filter(|c| keep.contains(c)).collect()
}

fn header_lines(v: &View) -> Vec<Line<'static>> {
    let dim = Style::new().add_modifier(Modifier::DIM);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let sort = format!(
        "sort: {}{}",
        v.sort_col().title(),
        if v.reverse { " (reversed)" } else { "" }
    );
    let mut first = vec![
        Span::styled("lumenflow-agent top", bold),
        Span::raw(format!("  {}", v.workspace)),
    ];
    if let Some(s) = &v.status {
        let up = u(&s["agent"]["uptime_s"]);
        let up = match up {
            0..60 => format!("{up}s"),
            60..3600 => format!("{}m{:02}s", up / 60, up % 60),
            _ => format!("{}h{:02}m", up / 3600, up / 60 % 60),
        };
        first.push(Span::raw(format!("  up {up}")));
    }
    first.push(Span::styled(format!("  {sort}"), dim));
    if !v.filter.is_empty() || v.editing {
        first.push(Span::raw(format!("  filter: {}", v.filter)));
    }
    if v.paused {
        first.push(Span::styled("  PAUSED", Style::new().fg(Color::Yellow)));
    }
    let mut lines = vec![Line::from(first)];
    if let Some(e) = &v.error {
        lines.push(Line::from(Span::styled(
            e.clone(),
            Style::new().fg(Color::Red),
        )));
    }
    if let Some(s) = &v.status {
        let up = &s["upstream"];
        let state = up["state"].as_str().unwrap_or("");
        let state_style = if state == "connected" {
            Style::new().fg(Color::Green)
        } else {
            Style::new().fg(Color::Yellow)
        };
        let mut l2 = vec![
            Span::styled("upstream ", bold),
            Span::raw(format!("{} ", up["mode"].as_str().unwrap_or(""))),
            Span::styled(state.to_string(), state_style),
            Span::raw(format!(
                "  pushed {}/s  pulled {}",
                rate(v.rate_pushed),
                u(&up["pulled"])
            )),
        ];
        if let Some(err) = up["last_error"].as_str() {
            l2.push(Span::styled(
                format!("  last error: {}", super::one_line(err)),
                Style::new().fg(Color::Red),
            ));
        }
        lines.push(Line::from(l2));
        let q = &s["queue"];
        lines.push(Line::from(vec![
            Span::styled("queue    ", bold),
            Span::raw(format!(
                "depth {}  oldest {}  backpressure {}",
                u(&q["durable_depth"]),
                seconds(q["oldest_age_s"].as_f64().unwrap_or(0.0)),
                u(&q["backpressure_rejections"])
            )),
        ]));
        lines.push(Line::from(vec![
            Span::styled("inbound  ", bold),
            Span::raw(format!(
                "{}/s (and {} agent:*)   ",
                rate(v.rate_inbound),
                u(&s["inbound"]["agent"])
            )),
            Span::styled("dead letters ", bold),
            Span::raw(format!("{}", s["dead_letters"].as_i64().unwrap_or(0))),
            Span::raw(format!("   taps {}", u(&s["taps"]))),
        ]));
    }
    lines
}

fn footer(v: &View) -> Line<'static> {
    let dim = Style::new().add_modifier(Modifier::DIM);
    if v.editing {
        return Line::from(vec![
            Span::raw(format!("filter: {}_", v.filter)),
            Span::styled("  Enter apply  Esc clear", dim),
        ]);
    }
    Line::from(Span::styled(
        "q quit  s sort  r reverse  / filter  p pause",
        dim,
    ))
}

fn render(f: &mut Frame, v: &View) {
    let head = header_lines(v);
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(head.len() as u16 + 1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(head), top);
    render_table(f.buffer_mut(), body, v);
    f.render_widget(Paragraph::new(footer(v)), bottom);
}

fn render_table(buf: &mut Buffer, area: Rect, v: &View) {
    let cols = columns_for(area.width);
    let sort = v.sort_col();
    let header = Row::new(cols.iter().map(|c| {
        let s = Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED);
        let title = if *c == sort {
            format!("{}{}", c.title(), if v.reverse { "▲" } else { "▼" })
        } else {
            c.title().to_string()
        };
        Cell::from(title).style(s)
    }));
    let rows = v
        .shown()
        .into_iter()
        .map(|r| Row::new(cols.iter().map(|c| cell(r, *c))));
    let widths = cols.iter().map(|c| {
        if *c == Col::Pack {
            Constraint::Min(c.width())
        } else {
            Constraint::Length(c.width())
        }
    });
    let table = Table::new(rows, widths).header(header).column_spacing(1);
    ratatui::widgets::Widget::render(table, area, buf);
}

/// Reads the status once; an agent that is not running is an error shown in the view.
fn poll(ws: &Workspace, v: &mut View) {
    match ApiClient::connect(ws).and_then(|c| c.get("/v1/status", ws)) {
        Ok(reply) if reply.status == 200 => v.update(reply.body, Instant::now()),
        Ok(reply) => {
            v.error = Some(format!(
                "the agent answered {}: {}",
                reply.status,
                reply.message()
            ))
        }
        Err(ClientError::NotRunning(_)) => {
            v.error = Some(format!(
                "lumenflow-agent is not running in {} (waiting for it; q quits)",
                v.workspace
            ))
        }
        Err(e) => v.error = Some(e.to_string()),
    }
}

pub fn run(workspace: Option<&Path>, interval_ms: u64, once: bool) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let mut v = View {
        workspace: ws.root.display().to_string(),
        interval: Duration::from_millis(interval_ms.clamp(100, 60_000)),
        ..Default::default()
    };
    if once {
        poll(&ws, &mut v);
        if v.status.is_none() {
            eprintln!("{}", v.error.unwrap_or_default());
            return Ok(exit::NOT_RUNNING);
        }
        let height = header_lines(&v).len() as u16 + v.rows.len() as u16 + 4;
        print!("{}", frame_text(&v, terminal_width(), height));
        return Ok(exit::OK);
    }
    let mut terminal = ratatui::try_init()?;
    let result = run_loop(&mut terminal, &ws, &mut v);
    ratatui::restore();
    result?;
    Ok(exit::OK)
}

fn run_loop(
    terminal: &mut ratatui::DefaultTerminal,
    ws: &Workspace,
    v: &mut View,
) -> anyhow::Result<()> {
    let mut next_poll = Instant::now();
    loop {
        if Instant::now() >= next_poll {
            if !v.paused {
                poll(ws, v);
            }
            next_poll = Instant::now() + v.interval;
        }
        terminal.draw(|f| render(f, v))?;
        let wait = next_poll.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(k) = event::read()? {
                if k.kind == KeyEventKind::Press && !v.key(k.code, k.modifiers) {
                    return Ok(());
                }
            }
        }
    }
}

fn terminal_width() -> u16 {
    ratatui::crossterm::terminal::size()
        .map(|(w, _)| w)
        .ok()
        .or_else(|| std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()))
        .unwrap_or(100)
}

/// One frame drawn off-screen, as text (`--once`, tests).
fn frame_text(v: &View, width: u16, height: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(width, height);
    let Ok(mut t) = ratatui::Terminal::new(backend);
    if t.draw(|f| render(f, v)).is_err() {
        return String::new();
    }
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(handled: u64) -> Value {
        json!({
            "agent": {"uptime_s": 75},
            "packs": [
                {"id": "hello", "state": "running", "handled": handled, "replayed": 0, "ignored": 0, "failed": 1,
                 "emitted": handled / 2, "in_flight": 2, "in_flight_age_s": 0.4, "restarts": 1, "dead_lettered": 1,
                 "next_retry_in_s": null, "rates": {"in_10s": 5.0, "out_10s": 0.0}},
                {"id": "tools", "state": "idle", "handled": 0, "replayed": 0, "ignored": 0, "failed": 0,
                 "emitted": 0, "in_flight": 0, "in_flight_age_s": 0.0, "restarts": 0, "dead_lettered": 0,
                 "rates": {"in_10s": 0.0, "out_10s": 0.0}}
            ],
            "queue": {"durable_depth": 3, "oldest_age_s": 1.5, "backpressure_rejections": 0},
            "upstream": {"mode": "mem:inbox", "state": "connected", "pushed": 10, "pulled": 0},
            "inbound": {"accepted": 100, "agent": 2},
            "dead_letters": 1,
            "rates": {"10s": {"inbound": 1.0, "pushed": 0.0}}
        })
    }

    #[test]
    fn rates_come_from_the_change_between_refreshes() {
        let mut v = View::default();
        let t0 = Instant::now();
        v.update(status(100), t0);
        assert_eq!(
            v.rows[0].rate_in, 5.0,
            "the first frame shows the agent's 10 s rate"
        );
        v.update(status(300), t0 + Duration::from_secs(2));
        let hello = v.rows.iter().find(|r| r.id == "hello").unwrap();
        assert_eq!(hello.rate_in, 100.0);
        assert_eq!(hello.rate_out, 50.0);
    }

    #[test]
    fn a_frame_shows_the_packs_and_a_narrow_one_keeps_the_essentials() {
        let mut v = View {
            workspace: "/w".into(),
            ..Default::default()
        };
        v.update(status(100), Instant::now());
        let wide = frame_text(&v, 120, 12);
        assert!(wide.contains("HANDLED"), "{wide}");
        assert!(wide.contains("hello") && wide.contains("idle"), "{wide}");
        assert!(wide.contains("2 0.4s"), "in flight and its age: {wide}");
        let narrow = frame_text(&v, 40, 12);
        assert!(
            narrow.contains("hello") && narrow.contains("IN/s"),
            "{narrow}"
        );
        assert!(!narrow.contains("HANDLED"), "{narrow}");
    }

    #[test]
    fn keys_sort_filter_and_quit() {
        let mut v = View::default();
        v.update(status(100), Instant::now());
        assert_eq!(v.shown()[0].id, "hello", "busiest first");
        assert!(v.key(KeyCode::Char('/'), KeyModifiers::NONE));
        for c in "too".chars() {
            v.key(KeyCode::Char(c), KeyModifiers::NONE);
        }
        v.key(KeyCode::Enter, KeyModifiers::NONE);
        assert_eq!(v.shown().len(), 1);
        assert_eq!(v.shown()[0].id, "tools");
        assert!(v.key(KeyCode::Char('s'), KeyModifiers::NONE));
        assert!(!v.key(KeyCode::Char('q'), KeyModifiers::NONE));
    }
}
