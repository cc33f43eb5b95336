use super::*;
use serde_json::json;

fn ctx() -> ValidateCtx {
    ValidateCtx {
        file: "packs/acme-demo/manifest.json".into(),
        folder_name: Some("acme-demo".into()),
        pack_dir: None,
        handled: None,
    }
}

fn good() -> Value {
    json!({
        "id": "acme-demo", "slug": "acme-demo", "version": "0.1.0", "config_key": "acme_demo",
        "task_types": [], "tools": [], "policies": [], "evidence_types": [],
        "state_aliases": {}, "lane_templates": [],
        "emitted_event_kinds": ["acme-demo:job_completed"],
        "subscribed_event_kinds": ["conductor:recovery_requested"],
        "required_approvals": [], "surfaces_required": ["http"],
        "backpressure_policy": {"acme-demo:job_completed": "ephemeral"},
        "runtime": {"command": ["node", "handler.mjs"]}
    })
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v.as_object_mut().unwrap().insert(key.into(), val);
    v
}

fn errors(v: Value) -> Vec<String> {
    let (_, d) = validate(v, &ctx());
    d.into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.to_string())
        .collect()
}

#[test]
fn quickstart_manifest_is_valid() {
    let (m, d) = validate(good(), &ctx());
    let m = m.unwrap_or_else(|| panic!("{d:?}"));
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(
        m.check_emit("acme-demo:job_completed"),
        Ok(DeliveryClass::Ephemeral)
    );
    assert_eq!(m.runtime.unwrap().command, vec!["node", "handler.mjs"]);
    // Existing platform fields are preserved.
    assert_eq!(m.raw.get("config_key"), Some(&json!("acme_demo")));
}

#[test]
fn slug_prefix_mismatch() {
    let v = with(
        good(),
        "emitted_event_kinds",
        json!(["acme-demo:job_completed", "billing:job_completed"]),
    );
    let v = with(
        v,
        "backpressure_policy",
        json!({"acme-demo:job_completed": "ephemeral", "billing:job_completed": "queue"}),
    );
    assert_eq!(
        errors(v),
        vec!["packs/acme-demo/manifest.json: emitted_event_kinds[1]: Pack slug prefix mismatch: kind \"billing:job_completed\" must start with \"acme-demo:\" (rule: <slug>:<event_name_snake_case>)"]
    );
}

#[test]
fn missing_backpressure_policy_entry() {
    let v = with(good(), "backpressure_policy", json!({}));
    assert_eq!(
        errors(v),
        vec!["packs/acme-demo/manifest.json: backpressure_policy: Missing backpressure_policy entry: emitted kind \"acme-demo:job_completed\" needs \"ephemeral\" or \"queue\""]
    );
}

#[test]
fn policy_key_must_be_emitted_and_value_known() {
    let v = with(
        good(),
        "backpressure_policy",
        json!({"acme-demo:job_completed": "queue", "acme-demo:other": "queue", "acme-demo:x": "fast"}),
    );
    let e = errors(v);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].contains("Unknown backpressure_policy key: \"acme-demo:other\""),
        "{e:?}"
    );
    assert!(
        e[1].contains("Invalid backpressure_policy value: \"fast\""),
        "{e:?}"
    );
    // {kind: "queue"} entries are accepted too.
    let v = with(
        good(),
        "backpressure_policy",
        json!({"acme-demo:job_completed": {"kind": "queue"}}),
    );
    assert!(errors(v).is_empty());
}

#[test]
fn missing_handler() {
    let c = ValidateCtx {
        handled: Some(vec![]),
        ..ctx()
    };
    let (m, d) = validate(good(), &c);
    assert!(m.is_none());
    assert_eq!(
        d[0].to_string(),
        "packs/acme-demo/manifest.json: subscribed_event_kinds[0]: Missing handler: subscribed kind \"conductor:recovery_requested\" has no registered handler"
    );
    let c = ValidateCtx {
        handled: Some(vec!["conductor:recovery_requested".into()]),
        ..ctx()
    };
    assert!(validate(good(), &c).0.is_some());
}

#[test]
fn every_violation_is_reported() {
    let v = json!({
        "id": "Acme_Demo", "version": "1.0",
        "emitted_event_kinds": ["billing:x", "acme:BadName", 7],
        "subscribed_event_kinds": ["nocolon"],
        "required_approvals": ["acme:never_emitted"],
        "surfaces_required": ["sidekick-channel"],
        "backpressure_policy": []
    });
    let e = errors(v);
    let joined = e.join("\n");
    for needle in [
        "id: Invalid pack id",
        "id: Pack folder mismatch",
        "version: Invalid version",
        "emitted_event_kinds[1]: Invalid event kind",
        "emitted_event_kinds[2]: Invalid field type",
        "subscribed_event_kinds[0]: Invalid event kind: \"nocolon\" has no ':'",
        "required_approvals[0]: Unknown approval kind",
        "surfaces_required[0]: Unsupported surface: \"sidekick-channel\"",
        "backpressure_policy: Invalid field type",
        "backpressure_policy: Missing backpressure_policy entry: emitted kind \"billing:x\"",
    ] {
        assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
    }
}

#[test]
fn reserved_namespaces() {
    let v = with(good(), "slug", json!("agent"));
    let e = errors(v).join("\n");
    assert!(e.contains("slug: Reserved namespace"), "{e}");
    let v = with(good(), "emitted_event_kinds", json!(["conductor:fake"]));
    let v = with(v, "backpressure_policy", json!({"conductor:fake": "queue"}));
    let e = errors(v).join("\n");
    assert!(
        e.contains("emitted_event_kinds[0]: Reserved namespace"),
        "{e}"
    );
}

#[test]
fn slug_defaults_to_id() {
    let mut v = good();
    v.as_object_mut().unwrap().remove("slug");
    let (m, _) = validate(v, &ctx());
    assert_eq!(m.unwrap().slug, "acme-demo");
}

#[test]
fn unknown_keys_warn_with_suggestion_and_are_kept() {
    let v = with(good(), "subscribed_event_kind", json!(["x:y"]));
    let (m, d) = validate(v, &ctx());
    let m = m.expect("warnings do not fail validation");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].severity, Severity::Warning);
    assert!(
        d[0].message
            .contains("did you mean \"subscribed_event_kinds\"?"),
        "{}",
        d[0]
    );
    assert!(m.raw.contains_key("subscribed_event_kind"));
    let v = with(good(), "zzzz", json!(1));
    let (_, d) = validate(v, &ctx());
    assert!(!d[0].message.contains("did you mean"));
}

#[test]
fn runtime_paths_may_not_leave_the_pack() {
    for (cmd, ok) in [
        (json!(["node", "handler.mjs"]), true),
        (json!(["node", "./src/handler.mjs"]), true),
        (json!(["/usr/bin/node", "handler.mjs"]), true),
        (json!(["./bin/worker"]), true),
        (json!(["node", "../shared/handler.mjs"]), false),
        (json!(["node", "src/../../x.mjs"]), false),
        (json!(["node", "/etc/passwd"]), false),
        (json!(["../worker"]), false),
        (json!([]), false),
        (json!(["node", ""]), false),
        (json!("node handler.mjs"), false),
    ] {
        let v = with(good(), "runtime", json!({"command": cmd}));
        assert_eq!(errors(v.clone()).is_empty(), ok, "{cmd}: {:?}", errors(v));
    }
    let v = with(good(), "runtime", json!({"command": ["node", "../x.mjs"]}));
    assert!(errors(v)[0].contains("runtime.command[1]: Path escapes pack folder: \"../x.mjs\""));
    let v = with(
        good(),
        "runtime",
        json!({"command": ["node", "h.mjs"], "timeout_ms": 0}),
    );
    assert!(errors(v)[0].contains("runtime.timeout_ms"));
}

#[test]
fn runtime_concurrency_is_one_unless_set_within_bounds() {
    let concurrency = |c: Option<Value>| {
        let mut rt = json!({"command": ["node", "h.mjs"]});
        if let Some(c) = c {
            rt["concurrency"] = c;
        }
        let (m, d) = validate(with(good(), "runtime", rt), &ctx());
        m.and_then(|m| m.runtime).map(|r| r.concurrency).ok_or(d)
    };
    assert_eq!(concurrency(None).ok(), Some(1));
    assert_eq!(concurrency(Some(json!(32))).ok(), Some(32));
    assert_eq!(concurrency(Some(json!(256))).ok(), Some(256));
    for bad in [json!(0), json!(257), json!(1.5), json!("8"), json!(-1)] {
        let d = concurrency(Some(bad.clone())).expect_err("refused");
        assert!(
            d.iter()
                .any(|d| d.message.contains("Invalid runtime.concurrency")),
            "{bad}: {d:?}"
        );
    }
}

#[test]
fn existing_platform_manifest_in_yaml_validates() {
    let yaml = r#"
id: software-delivery
version: 3.19.0
config_key: software_delivery
task_types: [wu]
tools:
  - name: wu:status
    entry: tools/wu-status.ts#wuStatus
    permission: read
    required_scopes:
      - type: path
        pattern: "docs/**"
        access: read
      - type: network
        posture: off
    required_env: [LUMENFLOW_TOKEN]
    input_schema: {type: object}
    output_schema: {type: object}
policies: []
evidence_types: [gate-run]
state_aliases: {ready: todo}
lane_templates: []
config_schema: schemas/config.schema.json
capability_factory: src/capabilities.ts#create
"#;
    let value = parse_text(yaml, Format::Yaml, "packs/software-delivery/manifest.yaml").unwrap();
    let c = ValidateCtx {
        file: "packs/software-delivery/manifest.yaml".into(),
        folder_name: Some("software-delivery".into()),
        pack_dir: None,
        handled: Some(vec![]),
    };
    let (m, d) = validate(value, &c);
    assert!(d.is_empty(), "{d:?}");
    let m = m.unwrap();
    assert!(m.emitted_event_kinds.is_empty());
    assert!(m.raw["tools"][0]["input_schema"].is_object());
}

#[test]
fn tool_entry_and_scopes_are_checked() {
    let v = with(
        good(),
        "tools",
        json!([
            {"name": "t", "entry": "../../evil.ts#x", "permission": "root", "required_scopes": []},
            {"name": "u", "entry": "ok.ts", "required_scopes": [{"type": "path", "pattern": "../**", "access": "read"}], "required_env": ["lower"]}
        ]),
    );
    let e = errors(v).join("\n");
    for needle in [
        "tools[0].entry: Path escapes pack folder",
        "tools[0].permission: Invalid tool permission",
        "tools[0].required_scopes: Invalid tool",
        "tools[1].required_scopes[0].pattern: Unsafe path pattern",
        "tools[1].required_env[0]: Invalid environment variable name",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in\n{e}");
    }
    let v = with(good(), "config_schema", json!("../schema.json"));
    assert!(errors(v)[0].contains("config_schema: Path escapes pack folder"));
}

#[test]
fn syntax_errors_have_line_and_column() {
    let d = parse_text(
        "{\n  \"id\": \"x\",\n  oops\n}",
        Format::Json,
        "packs/x/manifest.json",
    )
    .unwrap_err();
    assert_eq!(d.file, "packs/x/manifest.json:3:3");
    assert!(
        d.to_string()
            .starts_with("packs/x/manifest.json:3:3: JSON syntax error: "),
        "{d}"
    );
    let d = parse_text(
        "id: x\nversion: [1\n",
        Format::Yaml,
        "packs/x/manifest.yaml",
    )
    .unwrap_err();
    assert!(d.to_string().starts_with("packs/x/manifest.yaml:"), "{d}");
    assert!(d.message.starts_with("YAML syntax error"), "{d}");
    let d = parse_text("[1]", Format::Json, "m.json").unwrap_err();
    assert!(d.message.contains("top level must be an object"));
}

#[test]
fn hash_is_format_and_order_independent() {
    let a = parse_text(r#"{"id":"a","version":"0.1.0"}"#, Format::Json, "a").unwrap();
    let b = parse_text("version: 0.1.0\nid: a\n", Format::Yaml, "b").unwrap();
    let c = ValidateCtx {
        handled: Some(vec![]),
        ..ValidateCtx::default()
    };
    assert_eq!(
        validate(a, &c).0.unwrap().hash,
        validate(b, &c).0.unwrap().hash
    );
}

#[test]
fn emit_check_messages() {
    let (m, _) = validate(good(), &ctx());
    let m = m.unwrap();
    assert_eq!(
        m.check_emit("acme-demo:job_started").unwrap_err().to_string(),
        "Unknown kind at emit: pack \"acme-demo\" does not declare \"acme-demo:job_started\" in emitted_event_kinds"
    );
    assert!(m
        .check_emit("billing:x")
        .unwrap_err()
        .to_string()
        .contains("Pack slug prefix mismatch"));
}

#[test]
fn load_pack_dir_checks_symlinks_and_folder_name() {
    let tmp = std::env::temp_dir().join(format!("lf-sdk-{}", std::process::id()));
    let dir = tmp.join("packs").join("acme-demo");
    std::fs::create_dir_all(&dir).unwrap();
    #[cfg(unix)]
    {
        let _ = std::fs::remove_file(dir.join("link.mjs"));
        std::os::unix::fs::symlink("/etc/hostname", dir.join("link.mjs")).unwrap();
    }
    let v = with(
        good(),
        "runtime",
        json!({"command": ["node", "./link.mjs"]}),
    );
    std::fs::write(dir.join("manifest.json"), v.to_string()).unwrap();
    let load = load_pack_dir(&dir, &tmp, None).unwrap();
    assert_eq!(load.display, "packs/acme-demo/manifest.json");
    #[cfg(unix)]
    assert!(
        load.errors()
            .any(|d| d.message.contains("a link out of the pack folder")),
        "{:?}",
        load.diagnostics
    );
    assert!(load_pack_dir(&tmp.join("packs"), &tmp, None).is_none());
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_manifest_linked_out_of_its_folder_is_not_read() {
    let tmp = std::env::temp_dir().join(format!("lf-sdk-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let packs = tmp.join("packs");
    let secret = tmp.join("secret");
    std::fs::create_dir_all(packs.join("linked-file")).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("manifest.yaml"), "root:*:19000:0:99999:7:::\n").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(
            secret.join("manifest.yaml"),
            packs.join("linked-file/manifest.yaml"),
        )
        .unwrap();
        std::os::unix::fs::symlink(&secret, packs.join("linked-dir")).unwrap();
        for folder in ["linked-file", "linked-dir"] {
            let load = load_pack_dir(&packs.join(folder), &tmp, None).unwrap();
            let text = format!("{:?}", load.diagnostics);
            assert!(text.contains("Refused"), "{folder}: {text}");
            assert!(
                !text.contains("root:*"),
                "{folder}: the file's content was echoed: {text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let tmp = std::env::temp_dir().join(format!("lf-sdk-deep-{}", std::process::id()));
    let dir = tmp.join("packs").join("deep");
    std::fs::create_dir_all(&dir).unwrap();
    let d = 400_000;
    let text = format!(
        "id: deep\nversion: 1.0.0\nx: {}{}\n",
        "[".repeat(d),
        "]".repeat(d)
    );
    std::fs::write(dir.join("manifest.yaml"), text).unwrap();
    let t = std::time::Instant::now();
    let load = load_pack_dir(&dir, &tmp, None).unwrap();
    let took = t.elapsed();
    assert!(
        load.errors().any(|e| e.message.contains("levels deep")),
        "{:?}",
        load.diagnostics
    );
    // Parsing it would take minutes; the scan is linear (a generous bound for debug builds).
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    let block: String = (0..200)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    assert!(nesting_depth(&block) >= 200);
    assert!(nesting_depth("a: \"[[[[[[[[\"\nb: '{{{{{{{{{{'\n# [[[[[[[[[[\n") <= 1);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn too_many_kinds_are_refused() {
    let kinds: Vec<String> = (0..MAX_KINDS + 1)
        .map(|i| format!("conductor:k{i}"))
        .collect();
    let v = with(good(), "subscribed_event_kinds", json!(kinds));
    let (m, diags) = validate(v, &ctx());
    assert!(m.is_none());
    assert!(
        diags.iter().any(|d| d.message.contains("Too many kinds")),
        "{diags:?}"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// The scan is an upper bound of the real depth, for any document in YAML or JSON: a
    /// manifest within the limit is never refused for its depth.
    #[test]
    fn the_depth_scan_never_underestimates(v in nested_value()) {
        let real = json_depth(&v);
        for text in [serde_yaml_ng::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap(), v.to_string()] {
            let scanned = nesting_depth(&text);
            proptest::prop_assert!(scanned >= real, "scanned {} < real {} for\n{}", scanned, real, text);
        }
    }
}

fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn nested_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z \\[\\]{}#'\"-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(12, 64, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
