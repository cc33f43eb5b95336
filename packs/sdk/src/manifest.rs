//! Pack manifests (SPEC §4): parsing (JSON or YAML, with line and column on syntax errors) and
//! validation.
//!
//! Validation never stops at the first problem: it returns every violation as a [`Diagnostic`]
//! that names the file, the field and begins with the phrase users search for (for example
//! `Missing backpressure_policy entry`). Every field of the manifest is kept in `raw`, including
//! the existing DomainPackManifest fields and keys we do not know (those only warn, with a
//! "did you mean" suggestion), so nothing a pack author wrote is silently dropped.

use crate::canonical::canonical_hash;
use crate::kind::{is_kebab_slug, namespace_of, parse_kind, DeliveryClass, MAX_SLUG_LEN};
use crate::{PROVIDED_SURFACES, RESERVED_NAMESPACES};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Keys the manifest may have. The first group are the existing DomainPackManifest fields.
pub const KNOWN_KEYS: &[&str] = &[
    "id",
    "version",
    "config_key",
    "task_types",
    "tools",
    "policies",
    "evidence_types",
    "state_aliases",
    "lane_templates",
    "config_schema",
    "capability_factory",
    "policy_factory",
    "slug",
    "emitted_event_kinds",
    "subscribed_event_kinds",
    "required_approvals",
    "surfaces_required",
    "backpressure_policy",
    "runtime",
];

/// Manifest file names, in order of preference.
pub const MANIFEST_FILES: &[&str] = &["manifest.json", "manifest.yaml", "manifest.yml"];

/// Upper bound on a manifest file; anything larger is not a manifest.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Deepest nesting a manifest may have (flow brackets and block indentation together).
/// YAML parses deep flow nesting in quadratic time (40k levels: 2.4 s); real manifests
/// nest 5 or 6 levels.
pub const MAX_MANIFEST_DEPTH: usize = 64;
/// Most kinds one manifest may list in `emitted_event_kinds` or `subscribed_event_kinds`.
pub const MAX_KINDS: usize = 1024;

/// An upper bound of the nesting depth of YAML or JSON `text`, found without parsing it:
/// brackets outside quotes and comments, plus the levels of block indentation (and `- `
/// markers) they sit in. Cheap and linear, so a hostile file is refused before the parser
/// sees it.
pub fn nesting_depth(text: &str) -> usize {
    let (mut max, mut flow) = (0usize, 0usize);
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|b| **b == b' ').count();
        let content = &bytes[indent..];
        let blank_or_comment = content.is_empty() || content[0] == b'#';
        if flow == 0 && !blank_or_comment {
            // A sequence may sit at its key's indentation (`a:` then `- x`): a marker line
            // ranks just deeper than a key line of the same indentation.
            let dash = |c: &[u8]| c.len() >= 2 && c[0] == b'-' && c[1] == b' ';
            let rank = 2 * indent + usize::from(dash(content));
            while indents.last().is_some_and(|i| *i >= rank) {
                indents.pop();
            }
            indents.push(rank);
            // Each `- ` marker opens an item (whose content is one level deeper again).
            let mut rest = content;
            while dash(rest) {
                indents.push(rank);
                rest = &rest[2..];
                while rest.first() == Some(&b' ') {
                    rest = &rest[1..];
                }
            }
            max = max.max(indents.len());
        }
        let (mut quote, mut prev) = (None::<u8>, b' ');
        for &b in content {
            match quote {
                Some(q) => {
                    if b == q && !(q == b'"' && prev == b'\\') {
                        quote = None;
                    }
                }
                None => match b {
                    b'"' | b'\'' => quote = Some(b),
                    b'#' if prev == b' ' || prev == b'\t' => break,
                    b'[' | b'{' => {
                        flow += 1;
                        max = max.max(indents.len() + flow);
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = if prev == b'\\' && b == b'\\' { b' ' } else { b };
        }
    }
    max
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about one manifest: `<file>: <field>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}: {}", self.file, field, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// How a pack's handlers run (`runtime`); absent for native packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
    /// Events in progress at once (`runtime.concurrency`, 1 to [`MAX_CONCURRENCY`]; 1 when
    /// absent). Above 1 the worker may run that many handlers at the same time, their outcomes
    /// are committed together, and a crash re-runs the effects of at most that many events.
    pub concurrency: u32,
}

/// The largest `runtime.concurrency`.
pub const MAX_CONCURRENCY: u64 = 256;

/// A manifest that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub id: String,
    pub slug: String,
    pub version: String,
    pub emitted_event_kinds: Vec<String>,
    pub subscribed_event_kinds: Vec<String>,
    pub required_approvals: Vec<String>,
    pub surfaces_required: Vec<String>,
    pub backpressure_policy: BTreeMap<String, DeliveryClass>,
    pub runtime: Option<Runtime>,
    /// Every field as written (existing platform fields and unknown keys included).
    pub raw: Map<String, Value>,
    /// SHA-256 of the canonical JSON of `raw`: equal for equal content in JSON or YAML.
    pub hash: String,
}

/// Why an emit is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    #[error("Unknown kind at emit: pack \"{pack}\" does not declare \"{kind}\" in emitted_event_kinds{hint}")]
    UnknownKind {
        pack: String,
        kind: String,
        hint: String,
    },
}

impl Manifest {
    /// The delivery class of `kind` if this pack may emit it; the SPEC's error otherwise.
    pub fn check_emit(&self, kind: &str) -> Result<DeliveryClass, EmitError> {
        if self.emitted_event_kinds.iter().any(|k| k == kind) {
            if let Some(class) = self.backpressure_policy.get(kind) {
                return Ok(*class);
            }
        }
        let hint = match namespace_of(kind) {
            Some(ns) if ns != self.slug => format!(
                " (Pack slug prefix mismatch: kind \"{kind}\" must start with \"{}:\")",
                self.slug
            ),
            None => " (rule: <slug>:<event_name_snake_case>)".to_string(),
            _ => String::new(),
        };
        Err(EmitError::UnknownKind {
            pack: self.id.clone(),
            kind: kind.to_string(),
            hint,
        })
    }

    /// Parses and validates a manifest held in memory (e.g. a native pack's `include_str!`).
    /// `handled` lists the kinds with a registered handler.
    pub fn from_json_str(text: &str, handled: &[&str]) -> Result<Manifest, Vec<Diagnostic>> {
        let file = "<native manifest>";
        let value = parse_text(text, Format::Json, file).map_err(|d| vec![d])?;
        let handled: Vec<String> = handled.iter().map(|s| s.to_string()).collect();
        let ctx = ValidateCtx {
            file: file.to_string(),
            folder_name: None,
            pack_dir: None,
            handled: Some(handled),
        };
        let (m, diags) = validate(value, &ctx);
        match m {
            Some(m) if !diags.iter().any(|d| d.severity == Severity::Error) => Ok(m),
            _ => Err(diags
                .into_iter()
                .filter(|d| d.severity == Severity::Error)
                .collect()),
        }
    }
}

/// Checks that every subscribed kind has a handler (`Missing handler: …`).
pub fn check_handlers(manifest: &Manifest, handled: &[String], file: &str) -> Vec<Diagnostic> {
    manifest
        .subscribed_event_kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| !handled.iter().any(|h| h == *k))
        .map(|(i, k)| Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            field: Some(format!("subscribed_event_kinds[{i}]")),
            message: format!("Missing handler: subscribed kind \"{k}\" has no registered handler"),
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    pub fn of_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => Format::Yaml,
            _ => Format::Json,
        }
    }
}

/// Parses manifest text into JSON; syntax errors carry line and column.
pub fn parse_text(text: &str, format: Format, file: &str) -> Result<Value, Diagnostic> {
    let syntax = |line: usize, column: usize, what: &str, msg: String| Diagnostic {
        severity: Severity::Error,
        file: format!("{file}:{line}:{column}"),
        field: None,
        message: format!("{what} syntax error: {msg}"),
    };
    let value = match format {
        Format::Json => serde_json::from_str::<Value>(text).map_err(|e| {
            let msg = strip_location(&e.to_string());
            syntax(e.line(), e.column(), "JSON", msg)
        })?,
        Format::Yaml => serde_yaml_ng::from_str::<Value>(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            syntax(line, column, "YAML", strip_location(&e.to_string()))
        })?,
    };
    if !value.is_object() {
        return Err(Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            field: None,
            message: format!(
                "Invalid manifest: the top level must be an object, found {}",
                type_name(&value)
            ),
        });
    }
    Ok(value)
}

/// serde's messages end with " at line L column C"; we already put that in the prefix.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What validation knows about the pack's surroundings.
#[derive(Debug, Clone, Default)]
pub struct ValidateCtx {
    /// File name shown in messages (e.g. `packs/acme-demo/manifest.json`).
    pub file: String,
    /// The pack folder's name; must equal `id` when known.
    pub folder_name: Option<String>,
    /// The pack folder on disk, to resolve paths (symlinks included).
    pub pack_dir: Option<PathBuf>,
    /// Kinds with a registered handler; `None` when they are only known later (exec packs
    /// declare theirs in the `initialize` reply).
    pub handled: Option<Vec<String>>,
}

struct Collector<'a> {
    file: &'a str,
    diags: Vec<Diagnostic>,
}

impl Collector<'_> {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            file: self.file.to_string(),
            field: Some(field.into()),
            message: message.into(),
        });
    }
    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Warning,
            file: self.file.to_string(),
            field: Some(field.into()),
            message: message.into(),
        });
    }

    fn string(&mut self, obj: &Map<String, Value>, field: &str, required: bool) -> Option<String> {
        match obj.get(field) {
            None | Some(Value::Null) if required => {
                self.error(field, format!("Missing field: \"{field}\" is required"));
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.error(
                    field,
                    format!(
                        "Invalid field type: expected a string, found {}",
                        type_name(other)
                    ),
                );
                None
            }
        }
    }

    fn string_list(&mut self, obj: &Map<String, Value>, field: &str) -> Vec<String> {
        match obj.get(field) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                let mut seen = BTreeSet::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => {
                            if !seen.insert(s.clone()) {
                                self.warn(
                                    format!("{field}[{i}]"),
                                    format!("Duplicate entry: \"{s}\" is listed more than once"),
                                );
                                continue;
                            }
                            out.push(s.clone());
                        }
                        other => self.error(
                            format!("{field}[{i}]"),
                            format!(
                                "Invalid field type: expected a string, found {}",
                                type_name(other)
                            ),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.error(
                    field,
                    format!(
                        "Invalid field type: expected an array of strings, found {}",
                        type_name(other)
                    ),
                );
                Vec::new()
            }
        }
    }

    fn expect_type(&mut self, obj: &Map<String, Value>, field: &str, want_array: bool) {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(_)) if want_array => {}
            Some(Value::Object(_)) if !want_array => {}
            Some(other) => self.error(
                field,
                format!(
                    "Invalid field type: expected {}, found {}",
                    if want_array { "an array" } else { "an object" },
                    type_name(other)
                ),
            ),
        }
    }
}

/// Checks that a relative path stays inside the pack folder, lexically and (when the folder is
/// known and the path exists) after resolving symlinks.
pub fn check_path_inside(pack_dir: Option<&Path>, path: &str) -> Result<(), String> {
    if path.contains('\0') {
        return Err(format!(
            "Unsafe path: \"{}\" contains a NUL byte",
            path.escape_debug()
        ));
    }
    let p = Path::new(path);
    let escape =
        || format!("Path escapes pack folder: \"{path}\" resolves outside the pack folder");
    if p.is_absolute() {
        return Err(escape());
    }
    let mut depth: i64 = 0;
    for c in p.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(escape()),
        }
        if depth < 0 {
            return Err(escape());
        }
    }
    if let Some(dir) = pack_dir {
        let full = dir.join(p);
        if let (Ok(real), Ok(root)) = (full.canonicalize(), dir.canonicalize()) {
            if !real.starts_with(&root) {
                return Err(format!(
                    "Path escapes pack folder: \"{path}\" resolves to {} (a link out of the pack folder)",
                    real.display()
                ));
            }
        }
    }
    Ok(())
}

/// `path[#export]` as used by tool `entry` and the factories.
fn entry_path(entry: &str) -> &str {
    entry.split_once('#').map(|(p, _)| p).unwrap_or(entry)
}

/// Similarity used for "did you mean" suggestions (Jaro-Winkler, 0..=1).
pub fn similarity(a: &str, b: &str) -> f64 {
    strsim::jaro_winkler(a, b)
}

fn did_you_mean(key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .map(|k| (*k, similarity(key, k)))
        .filter(|(_, score)| *score >= 0.85)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k)
}

/// Validates a parsed manifest. Returns the manifest when it has no errors, and all findings.
pub fn validate(value: Value, ctx: &ValidateCtx) -> (Option<Manifest>, Vec<Diagnostic>) {
    let Value::Object(obj) = value else {
        let d = Diagnostic {
            severity: Severity::Error,
            file: ctx.file.clone(),
            field: None,
            message: "Invalid manifest: the top level must be an object".into(),
        };
        return (None, vec![d]);
    };
    let mut c = Collector {
        file: &ctx.file,
        diags: Vec::new(),
    };

    for key in obj.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            let hint = did_you_mean(key)
                .map(|k| format!(" (did you mean \"{k}\"?)"))
                .unwrap_or_default();
            c.warn(
                key.as_str(),
                format!("Unknown key \"{key}\"{hint}; it is kept but not used by the agent"),
            );
        }
    }

    let kebab_rule = format!(
        "lowercase kebab-case (^[a-z0-9]+(-[a-z0-9]+)*$), at most {MAX_SLUG_LEN} characters"
    );
    let id = c.string(&obj, "id", true);
    if let Some(id) = &id {
        if !is_kebab_slug(id) {
            c.error(
                "id",
                format!("Invalid pack id: \"{id}\" must be {kebab_rule}"),
            );
        }
        if let Some(folder) = &ctx.folder_name {
            if folder != id {
                c.error(
                    "id",
                    format!("Pack folder mismatch: folder \"{folder}\" must be named like the manifest id \"{id}\""),
                );
            }
        }
    }
    let slug = c.string(&obj, "slug", false).or_else(|| id.clone());
    if let Some(slug) = &slug {
        if obj.contains_key("slug") && !is_kebab_slug(slug) {
            c.error(
                "slug",
                format!("Invalid slug: \"{slug}\" must be {kebab_rule}"),
            );
        }
        if RESERVED_NAMESPACES.contains(&slug.as_str()) {
            let field = if obj.contains_key("slug") {
                "slug"
            } else {
                "id"
            };
            c.error(
                field,
                format!("Reserved namespace: \"{slug}:\" belongs to the control plane or the agent; a pack may not use it as its slug"),
            );
        }
    }
    let version = match obj.get("version") {
        // YAML reads `version: 1.0` as a number; say how to write it.
        Some(Value::Number(n)) => {
            c.error("version", format!("Invalid version: {n} is a number; write a semver string such as \"{n}.0\" (quote it in YAML)"));
            None
        }
        _ => c.string(&obj, "version", true),
    };
    if let Some(v) = &version {
        if semver::Version::parse(v).is_err() {
            c.error(
                "version",
                format!("Invalid version: \"{v}\" is not semver (for example \"0.1.0\")"),
            );
        }
    }
    if let Some(ck) = c.string(&obj, "config_key", false) {
        if ck.is_empty() {
            c.error("config_key", "Invalid config_key: must not be empty");
        }
    }

    let emitted = c.string_list(&obj, "emitted_event_kinds");
    let subscribed = c.string_list(&obj, "subscribed_event_kinds");
    let approvals = c.string_list(&obj, "required_approvals");
    let surfaces = c.string_list(&obj, "surfaces_required");

    let slug_ok = slug.as_deref().filter(|s| is_kebab_slug(s));
    for (i, kind) in emitted.iter().enumerate() {
        let field = format!("emitted_event_kinds[{i}]");
        match parse_kind(kind) {
            Err(e) => c.error(field, e.to_string()),
            Ok((ns, _)) => {
                if RESERVED_NAMESPACES.contains(&ns) {
                    c.error(
                        field,
                        format!("Reserved namespace: packs may subscribe to \"{ns}:\" kinds but never emit them (kind \"{kind}\")"),
                    );
                } else if let Some(slug) = slug_ok {
                    if ns != slug {
                        c.error(
                            field,
                            format!("Pack slug prefix mismatch: kind \"{kind}\" must start with \"{slug}:\" (rule: <slug>:<event_name_snake_case>)"),
                        );
                    }
                }
            }
        }
    }
    for (field, list) in [
        ("emitted_event_kinds", &emitted),
        ("subscribed_event_kinds", &subscribed),
    ] {
        if list.len() > MAX_KINDS {
            c.error(
                field,
                format!(
                    "Too many kinds: {} listed, more than the limit of {MAX_KINDS}",
                    list.len()
                ),
            );
        }
    }
    for (i, kind) in subscribed.iter().enumerate() {
        if let Err(e) = parse_kind(kind) {
            c.error(format!("subscribed_event_kinds[{i}]"), e.to_string());
        }
    }
    for (i, kind) in approvals.iter().enumerate() {
        if !emitted.contains(kind) {
            c.error(
                format!("required_approvals[{i}]"),
                format!("Unknown approval kind: \"{kind}\" is not in emitted_event_kinds"),
            );
        }
    }
    for (i, s) in surfaces.iter().enumerate() {
        if !PROVIDED_SURFACES.contains(&s.as_str()) {
            c.error(
                format!("surfaces_required[{i}]"),
                format!(
                    "Unsupported surface: \"{s}\" is not provided by this agent (provided: {})",
                    PROVIDED_SURFACES.join(", ")
                ),
            );
        }
    }

    let mut policy = BTreeMap::new();
    match obj.get("backpressure_policy") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let field = format!("backpressure_policy.\"{k}\"");
                let class = match v {
                    Value::String(s) => DeliveryClass::parse(s),
                    // `{"kind": "queue"}` per entry is accepted too.
                    Value::Object(o) => o.get("kind").and_then(|k| k.as_str()).and_then(DeliveryClass::parse),
                    _ => None,
                };
                match class {
                    Some(class) => {
                        if !emitted.contains(k) {
                            c.error(
                                field,
                                format!("Unknown backpressure_policy key: \"{k}\" is not in emitted_event_kinds"),
                            );
                        }
                        policy.insert(k.clone(), class);
                    }
                    None => c.error(
                        field,
                        format!("Invalid backpressure_policy value: {v} for \"{k}\" must be \"ephemeral\" or \"queue\""),
                    ),
                }
            }
        }
        Some(other) => c.error(
            "backpressure_policy",
            format!(
                "Invalid field type: expected an object mapping each emitted kind to \"ephemeral\" or \"queue\", found {}",
                type_name(other)
            ),
        ),
    }
    for kind in &emitted {
        let has_entry = obj
            .get("backpressure_policy")
            .and_then(|p| p.as_object())
            .is_some_and(|m| m.contains_key(kind));
        if !has_entry {
            c.error(
                "backpressure_policy",
                format!("Missing backpressure_policy entry: emitted kind \"{kind}\" needs \"ephemeral\" or \"queue\""),
            );
        }
    }

    let pack_dir = ctx.pack_dir.as_deref();
    let runtime = validate_runtime(&obj, pack_dir, &mut c);

    // Existing DomainPackManifest fields: shape checks and path safety.
    for field in [
        "task_types",
        "policies",
        "evidence_types",
        "lane_templates",
        "tools",
    ] {
        c.expect_type(&obj, field, true);
    }
    c.expect_type(&obj, "state_aliases", false);
    if let Some(Value::Array(tools)) = obj.get("tools") {
        for (i, tool) in tools.iter().enumerate() {
            validate_tool(i, tool, pack_dir, &mut c);
        }
    }
    for field in ["capability_factory", "policy_factory"] {
        if let Some(entry) = c.string(&obj, field, false) {
            if let Err(e) = check_path_inside(pack_dir, entry_path(&entry)) {
                c.error(field, e);
            }
        }
    }
    match obj.get("config_schema") {
        Some(Value::String(p)) => {
            if let Err(e) = check_path_inside(pack_dir, p) {
                c.error("config_schema", e);
            }
        }
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(other) => c.error(
            "config_schema",
            format!(
                "Invalid field type: expected a path or a JSON schema object, found {}",
                type_name(other)
            ),
        ),
    }

    if let Some(handled) = &ctx.handled {
        for (i, k) in subscribed.iter().enumerate() {
            if !handled.contains(k) {
                c.error(
                    format!("subscribed_event_kinds[{i}]"),
                    format!("Missing handler: subscribed kind \"{k}\" has no registered handler"),
                );
            }
        }
    }
    let diags = c.diags;
    if diags.iter().any(|d| d.severity == Severity::Error) {
        return (None, diags);
    }
    let (Some(id), Some(slug), Some(version)) = (id, slug, version) else {
        return (None, diags);
    };
    let hash = canonical_hash(&Value::Object(obj.clone()));
    let manifest = Manifest {
        id,
        slug,
        version,
        emitted_event_kinds: emitted,
        subscribed_event_kinds: subscribed,
        required_approvals: approvals,
        surfaces_required: surfaces,
        backpressure_policy: policy,
        runtime,
        raw: obj,
        hash,
    };
    (Some(manifest), diags)
}

fn validate_runtime(
    obj: &Map<String, Value>,
    pack_dir: Option<&Path>,
    c: &mut Collector<'_>,
) -> Option<Runtime> {
    let rt = match obj.get("runtime") {
        None | Some(Value::Null) => return None,
        Some(Value::Object(rt)) => rt,
        Some(other) => {
            c.error(
                "runtime",
                format!(
                    "Invalid field type: expected an object like {{\"command\": [\"node\", \"handler.mjs\"]}}, found {}",
                    type_name(other)
                ),
            );
            return None;
        }
    };
    for key in rt.keys() {
        if !["command", "env", "timeout_ms", "concurrency"].contains(&key.as_str()) {
            c.warn(
                format!("runtime.{key}"),
                format!("Unknown key \"{key}\" in runtime (known: command, env, timeout_ms, concurrency)"),
            );
        }
    }
    let mut ok = true;
    let mut command = Vec::new();
    match rt.get("command") {
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let field = format!("runtime.command[{i}]");
                match item.as_str() {
                    Some(s) if !s.is_empty() => {
                        // argv[0] may be a program on PATH or an absolute interpreter path;
                        // anything else that looks like a path must stay in the pack folder.
                        let looks_like_path = s.contains('/') || s.starts_with('.');
                        let absolute_program = i == 0 && Path::new(s).is_absolute();
                        if looks_like_path && !absolute_program {
                            if let Err(e) = check_path_inside(pack_dir, s) {
                                c.error(field, e);
                                ok = false;
                            }
                        }
                        command.push(s.to_string());
                    }
                    _ => {
                        c.error(
                            field,
                            "Invalid runtime.command: every entry must be a non-empty string",
                        );
                        ok = false;
                    }
                }
            }
        }
        _ => {
            c.error(
                "runtime.command",
                "Invalid runtime.command: expected a non-empty array, e.g. [\"node\", \"handler.mjs\"]",
            );
            ok = false;
        }
    }
    let mut env = BTreeMap::new();
    match rt.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(s) if !k.is_empty() && !k.contains('=') && !k.contains('\0') => {
                        env.insert(k.clone(), s.to_string());
                    }
                    _ => {
                        c.error(
                            format!("runtime.env.{k}"),
                            "Invalid runtime.env: names must be non-empty without '=' and values must be strings",
                        );
                        ok = false;
                    }
                }
            }
        }
        Some(other) => {
            c.error(
                "runtime.env",
                format!(
                    "Invalid field type: expected an object of strings, found {}",
                    type_name(other)
                ),
            );
            ok = false;
        }
    }
    let timeout_ms = match rt.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=86_400_000).contains(&n) => Some(n),
            _ => {
                c.error(
                    "runtime.timeout_ms",
                    format!("Invalid runtime.timeout_ms: {v} must be a whole number of milliseconds from 1 to 86400000"),
                );
                ok = false;
                None
            }
        },
    };
    let concurrency = match rt.get("concurrency") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_CONCURRENCY).contains(&n) => n as u32,
            _ => {
                c.error(
                    "runtime.concurrency",
                    format!("Invalid runtime.concurrency: {v} must be a whole number of events from 1 to {MAX_CONCURRENCY} (1: one event at a time)"),
                );
                ok = false;
                1
            }
        },
    };
    ok.then_some(Runtime {
        command,
        env,
        timeout_ms,
        concurrency,
    })
}

fn validate_tool(i: usize, tool: &Value, pack_dir: Option<&Path>, c: &mut Collector<'_>) {
    let base = format!("tools[{i}]");
    let Value::Object(t) = tool else {
        c.error(
            base,
            format!(
                "Invalid tool: expected an object, found {}",
                type_name(tool)
            ),
        );
        return;
    };
    if !matches!(t.get("name"), Some(Value::String(s)) if !s.is_empty()) {
        c.error(
            format!("{base}.name"),
            "Invalid tool: \"name\" must be a non-empty string",
        );
    }
    match t.get("entry") {
        Some(Value::String(entry)) if !entry.is_empty() => {
            if let Err(e) = check_path_inside(pack_dir, entry_path(entry)) {
                c.error(format!("{base}.entry"), e);
            }
        }
        _ => c.error(
            format!("{base}.entry"),
            "Invalid tool: \"entry\" must be a path[#export] inside the pack folder",
        ),
    }
    if let Some(p) = t.get("permission") {
        if !matches!(p.as_str(), Some("read" | "write" | "admin")) {
            c.error(
                format!("{base}.permission"),
                format!("Invalid tool permission: {p} must be \"read\", \"write\" or \"admin\""),
            );
        }
    }
    if let Some(scopes) = t.get("required_scopes") {
        match scopes {
            Value::Array(list) if !list.is_empty() => {
                for (j, scope) in list.iter().enumerate() {
                    if let Some(pattern) = scope.get("pattern").and_then(|p| p.as_str()) {
                        let unsafe_pattern = pattern.contains('\0')
                            || pattern.split(['/', '\\']).any(|seg| seg == "..");
                        if unsafe_pattern {
                            c.error(
                                format!("{base}.required_scopes[{j}].pattern"),
                                format!("Unsafe path pattern: \"{}\" has a \"..\" segment or a NUL byte", pattern.escape_debug()),
                            );
                        }
                    }
                }
            }
            _ => c.error(
                format!("{base}.required_scopes"),
                "Invalid tool: \"required_scopes\" must be a non-empty array",
            ),
        }
    }
    if let Some(Value::Array(envs)) = t.get("required_env") {
        for (j, name) in envs.iter().enumerate() {
            let ok = name.as_str().is_some_and(|s| {
                let b = s.as_bytes();
                !b.is_empty()
                    && b[0].is_ascii_uppercase()
                    && b.iter()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
            });
            if !ok {
                c.error(
                    format!("{base}.required_env[{j}]"),
                    format!(
                        "Invalid environment variable name: {name} must match ^[A-Z][A-Z0-9_]*$"
                    ),
                );
            }
        }
    }
}

/// The result of loading one pack folder.
#[derive(Debug, Clone)]
pub struct PackLoad {
    pub dir: PathBuf,
    /// The manifest file that was read.
    pub file: PathBuf,
    /// Displayed file name used in diagnostics.
    pub display: String,
    pub manifest: Option<Manifest>,
    pub diagnostics: Vec<Diagnostic>,
}

impl PackLoad {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }
    pub fn is_valid(&self) -> bool {
        self.manifest.is_some()
    }
    /// The folder name (what the pack id must be).
    pub fn folder_name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Refuses a pack folder or manifest that resolves (through a symbolic link) outside the
/// packs root, the folder `dir` is in. A `manifest.yaml` linked to `/etc/shadow` would
/// otherwise be read and its lines echoed back as unknown keys.
fn inside_the_packs_root(dir: &Path, file: &Path) -> Result<(), String> {
    let Some(root) = dir.parent().and_then(|r| r.canonicalize().ok()) else {
        return Ok(());
    };
    let real_dir = dir
        .canonicalize()
        .map_err(|e| format!("Cannot read the pack folder: {e}"))?;
    if !real_dir.starts_with(&root) {
        return Err(format!(
            "Refused: the pack folder is a link to {}, outside the packs root {}",
            real_dir.display(),
            root.display()
        ));
    }
    let real = file
        .canonicalize()
        .map_err(|e| format!("Cannot read manifest: {e}"))?;
    if !real.starts_with(&real_dir) {
        return Err(format!(
            "Refused: the manifest is a link to {}, outside its pack folder",
            real.display()
        ));
    }
    Ok(())
}

/// The manifest's text: inside the packs root, at most [`MAX_MANIFEST_BYTES`], UTF-8.
fn read_manifest_text(dir: &Path, file: &Path) -> Result<String, String> {
    inside_the_packs_root(dir, file)?;
    let meta = std::fs::metadata(file).map_err(|e| format!("Cannot read manifest: {e}"))?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "Invalid manifest: {} bytes is larger than the limit of {MAX_MANIFEST_BYTES}",
            meta.len()
        ));
    }
    let bytes = std::fs::read(file).map_err(|e| format!("Cannot read manifest: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "Invalid manifest: the file is not UTF-8".to_string())
}

/// Finds the manifest file of a pack folder, if any.
pub fn manifest_file(dir: &Path) -> Option<PathBuf> {
    MANIFEST_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// Loads and validates the pack in `dir`. `None` when the folder has no manifest (a shared
/// library folder, for example). `display_base` is the folder paths are shown relative to.
/// `handled`: see [`ValidateCtx::handled`]; `None` means "decide from the manifest": a pack
/// with a `runtime` declares its handlers later, one without has none unless a native pack is
/// registered under its id.
pub fn load_pack_dir(
    dir: &Path,
    display_base: &Path,
    handled: Option<Vec<String>>,
) -> Option<PackLoad> {
    let file = manifest_file(dir)?;
    let display = file
        .strip_prefix(display_base)
        .unwrap_or(&file)
        .display()
        .to_string();
    let folder_name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut load = PackLoad {
        dir: dir.to_path_buf(),
        file: file.clone(),
        display: display.clone(),
        manifest: None,
        diagnostics: Vec::new(),
    };
    let text = read_manifest_text(dir, &file);
    let text = match text {
        Ok(t) => t,
        Err(message) => {
            load.diagnostics.push(Diagnostic {
                severity: Severity::Error,
                file: display,
                field: None,
                message,
            });
            return Some(load);
        }
    };
    let depth = nesting_depth(&text);
    if depth > MAX_MANIFEST_DEPTH {
        load.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: display,
            field: None,
            message: format!("Invalid manifest: nested {depth} levels deep, more than the limit of {MAX_MANIFEST_DEPTH}"),
        });
        return Some(load);
    }
    let value = match parse_text(&text, Format::of_path(&file), &display) {
        Ok(v) => v,
        Err(d) => {
            load.diagnostics.push(d);
            return Some(load);
        }
    };
    let has_runtime = value.get("runtime").is_some_and(|r| !r.is_null());
    let handled = handled.or(if has_runtime { None } else { Some(Vec::new()) });
    let ctx = ValidateCtx {
        file: display,
        folder_name,
        pack_dir: Some(dir.to_path_buf()),
        handled,
    };
    let (manifest, mut diags) = validate(value, &ctx);
    if !has_runtime {
        // The real cause of a missing handler in a pack folder: nothing runs its handlers.
        for d in diags
            .iter_mut()
            .filter(|d| d.message.starts_with("Missing handler:"))
        {
            d.message.push_str(" (the manifest has no `runtime`: add `runtime: {command: [node, handler.mjs]}` or the command that starts your worker; only a pack registered from Rust code needs none)");
        }
    }
    load.manifest = manifest;
    load.diagnostics = diags;
    Some(load)
}

/// Every pack folder of a packs root, loaded and validated.
#[derive(Debug, Clone, Default)]
pub struct PackScan {
    pub loads: Vec<PackLoad>,
    /// Problems between packs (two packs with one slug).
    pub conflicts: Vec<String>,
    pub root_missing: bool,
    /// Folders that look like a pack but have no manifest the agent reads (skipped), each
    /// with what to do.
    pub lookalikes: Vec<String>,
}

/// Files that say a folder is meant to be a pack, when it has no manifest.yaml|json.
const PACK_LOOKALIKE_FILES: &[&str] = &["manifest.ts", "src/manifest.ts", "manifest.yml"];

/// Why a folder without a manifest the agent reads looks like a pack, if it does.
pub fn lookalike(dir: &Path, display_base: &Path) -> Option<String> {
    let found = PACK_LOOKALIKE_FILES
        .iter()
        .find(|f| dir.join(f).is_file())?;
    let shown = dir.strip_prefix(display_base).unwrap_or(dir).display();
    Some(format!(
        "{shown}: skipped: it has {found} but no manifest.yaml or manifest.json, the only files the agent and the platform read (write the manifest as manifest.yaml)"
    ))
}

/// Loads every folder of `root` that has a manifest (folders without one, and hidden ones, are
/// skipped: a library the packs share, for example).
pub fn scan_packs_root(root: &Path, display_base: &Path) -> PackScan {
    let mut scan = PackScan::default();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(_) => {
            scan.root_missing = true;
            return scan;
        }
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    dirs.sort();
    for dir in dirs {
        match load_pack_dir(&dir, display_base, None) {
            Some(load) => scan.loads.push(load),
            None => scan.lookalikes.extend(lookalike(&dir, display_base)),
        }
    }
    let mut slugs: BTreeMap<String, String> = BTreeMap::new();
    for load in &scan.loads {
        if let Some(m) = &load.manifest {
            if let Some(other) = slugs.insert(m.slug.clone(), load.display.clone()) {
                scan.conflicts.push(format!(
                    "{}: slug: Duplicate slug: \"{}\" is already used by {other}; event kinds would be ambiguous",
                    load.display, m.slug
                ));
            }
        }
    }
    scan
}

#[cfg(test)]
mod tests;
