//! `lumenflow-agent graph`: the routing table as Graphviz DOT. Read from the workspace's files
//! (the manifests under the packs root, the upstream of agent.json, workspace.yaml or the
//! enrollment), so it works whether or not the agent runs.
//!
//! Nodes: each pack (a box; red when its manifest is invalid), each kind (an ellipse), the
//! upstream (a cylinder). Edges: pack -> kind it emits; kind -> pack that subscribes; kind ->
//! upstream, labelled with its delivery class (`queue` solid, `ephemeral` dashed); upstream ->
//! kind for subscribed kinds no local pack emits (they come from the upstream).

use super::exit;
use crate::cli::GraphFormat;
use crate::config::AgentConfig;
use crate::packs::scan_packs;
use crate::workspace::Workspace;
use lumenflow_pack_sdk::DeliveryClass;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

/// A DOT string literal.
fn q(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// What the graph shows of one pack.
pub struct PackNode {
    pub id: String,
    pub version: String,
    pub valid: bool,
    pub runtime: bool,
    pub emits: Vec<(String, DeliveryClass)>,
    pub subscribes: Vec<String>,
}

/// The DOT text of the routing table.
pub fn dot(packs: &[PackNode], upstream: &str) -> String {
    let mut out = String::new();
    out.push_str("digraph lumenflow {\n  rankdir=LR;\n  node [fontname=\"Helvetica\", fontsize=11];\n  edge [fontname=\"Helvetica\", fontsize=9];\n");
    out.push_str(&format!(
        "  upstream [label={}, shape=cylinder];\n",
        q(&format!("upstream\n{upstream}"))
    ));
    let mut kinds: BTreeSet<&str> = BTreeSet::new();
    let mut emitted: BTreeSet<&str> = BTreeSet::new();
    for p in packs {
        let what = match (p.valid, p.runtime || !p.subscribes.is_empty()) {
            (false, _) => "invalid",
            (true, false) => "no handlers",
            (true, true) => "",
        };
        let label = if what.is_empty() {
            format!("{}\n{}", p.id, p.version)
        } else {
            format!("{}\n{} ({what})", p.id, p.version)
        };
        let style = if p.valid {
            ""
        } else {
            ", color=red, fontcolor=red"
        };
        out.push_str(&format!(
            "  {} [label={}, shape=box{style}];\n",
            q(&format!("pack:{}", p.id)),
            q(&label)
        ));
        for (k, _) in &p.emits {
            kinds.insert(k);
            emitted.insert(k);
        }
        for k in &p.subscribes {
            kinds.insert(k);
        }
    }
    for k in &kinds {
        out.push_str(&format!(
            "  {} [label={}, shape=ellipse];\n",
            q(&format!("kind:{k}")),
            q(k)
        ));
    }
    // Each emitted kind goes to the upstream once, with its class.
    let mut classes: BTreeMap<&str, DeliveryClass> = BTreeMap::new();
    for p in packs {
        for (k, class) in &p.emits {
            out.push_str(&format!(
                "  {} -> {} [label=\"emits\"];\n",
                q(&format!("pack:{}", p.id)),
                q(&format!("kind:{k}"))
            ));
            classes.entry(k).or_insert(*class);
        }
    }
    for (k, class) in &classes {
        let (name, style) = match class {
            DeliveryClass::Queue => ("queue", "solid"),
            DeliveryClass::Ephemeral => ("ephemeral", "dashed"),
        };
        out.push_str(&format!(
            "  {} -> upstream [label={}, style={style}];\n",
            q(&format!("kind:{k}")),
            q(name)
        ));
    }
    for p in packs {
        for k in &p.subscribes {
            out.push_str(&format!(
                "  {} -> {} [label=\"subscribes\"];\n",
                q(&format!("kind:{k}")),
                q(&format!("pack:{}", p.id))
            ));
        }
    }
    for k in kinds.difference(&emitted) {
        out.push_str(&format!(
            "  upstream -> {} [label=\"inbound\"];\n",
            q(&format!("kind:{k}"))
        ));
    }
    out.push_str("}\n");
    out
}

pub fn run(
    workspace: Option<&Path>,
    format: GraphFormat,
    output: Option<&Path>,
) -> anyhow::Result<u8> {
    let ws = Workspace::locate(workspace)?;
    let (cfg, _) = AgentConfig::for_workspace(&ws)?;
    let upstream = match crate::enrollment::Enrollment::load(&ws)? {
        Some(e) => e.endpoint,
        None => cfg.upstream.clone(),
    };
    let scan = scan_packs(&ws, &cfg);
    let packs: Vec<PackNode> = scan
        .loads
        .iter()
        .map(|l| {
            let valid = l.is_valid();
            match &l.manifest {
                Some(m) => PackNode {
                    id: m.id.clone(),
                    version: m.version.clone(),
                    valid,
                    runtime: m.runtime.is_some(),
                    emits: m
                        .emitted_event_kinds
                        .iter()
                        .map(|k| {
                            let class = m
                                .backpressure_policy
                                .get(k)
                                .copied()
                                .unwrap_or(DeliveryClass::Queue);
                            (k.clone(), class)
                        })
                        .collect(),
                    subscribes: m.subscribed_event_kinds.clone(),
                },
                None => PackNode {
                    id: l
                        .dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    version: "?".into(),
                    valid: false,
                    runtime: false,
                    emits: Vec::new(),
                    subscribes: Vec::new(),
                },
            }
        })
        .collect();
    let text = dot(&packs, &upstream);
    let bytes = match format {
        GraphFormat::Dot => text.into_bytes(),
        GraphFormat::Svg | GraphFormat::Png => render(&text, format)?,
    };
    match output {
        Some(path) => std::fs::write(path, bytes)
            .map_err(|e| anyhow::anyhow!("--output {}: {e}", path.display()))?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes)?;
            out.flush()?;
        }
    }
    Ok(exit::OK)
}

/// Runs Graphviz's `dot` on the text.
fn render(text: &str, format: GraphFormat) -> anyhow::Result<Vec<u8>> {
    let flag = if format == GraphFormat::Svg {
        "-Tsvg"
    } else {
        "-Tpng"
    };
    let mut child = std::process::Command::new("dot")
        .arg(flag)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("--format {}: cannot run Graphviz's `dot` ({e}); install graphviz, or pipe `lumenflow-agent graph` into a renderer", &flag[2..]))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "dot {flag} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_link_emitters_subscribers_and_the_upstream() {
        let packs = vec![
            PackNode {
                id: "a".into(),
                version: "1.0.0".into(),
                valid: true,
                runtime: true,
                emits: vec![
                    ("a:done".into(), DeliveryClass::Queue),
                    ("a:tick".into(), DeliveryClass::Ephemeral),
                ],
                subscribes: vec!["ext:job".into()],
            },
            PackNode {
                id: "b\"q".into(),
                version: "0.1.0".into(),
                valid: false,
                runtime: false,
                emits: vec![],
                subscribes: vec!["a:done".into()],
            },
        ];
        let d = dot(&packs, "mem:inbox");
        assert!(d.contains("\"pack:a\" -> \"kind:a:done\""));
        assert!(d.contains("\"kind:a:done\" -> upstream [label=\"queue\", style=solid]"));
        assert!(d.contains("\"kind:a:tick\" -> upstream [label=\"ephemeral\", style=dashed]"));
        assert!(d.contains("\"kind:a:done\" -> \"pack:b\\\"q\""));
        assert!(d.contains("upstream -> \"kind:ext:job\""));
        assert!(!d.contains("upstream -> \"kind:a:done\""));
        assert!(d.contains("color=red"));
    }
}
