//! `lumenflow-agent validate [PACK_DIR]`: prints every violation of every pack (SPEC §4) and
//! exits 1 when there is any error.

use super::exit;
use crate::config::AgentConfig;
use crate::packs::{scan_packs, PackScan};
use crate::workspace::Workspace;
use lumenflow_pack_sdk::manifest::{load_pack_dir, Diagnostic, PackLoad, Severity};
use lumenflow_pack_sdk::platform::{check_pin, loader_warnings, PackPin};
use std::io::Write;
use std::path::Path;

pub fn run(workspace: Option<&Path>, pack_dir: Option<&Path>) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    if let Some(dir) = pack_dir {
        let cwd = std::env::current_dir()?;
        if !dir.is_dir() {
            anyhow::bail!("{} is not a folder", dir.display());
        }
        let dir = dir.canonicalize()?;
        let base = if dir.starts_with(&cwd) {
            cwd
        } else {
            dir.parent().unwrap_or(&dir).to_path_buf()
        };
        let Some(load) = load_pack_dir(&dir, &base, None).map(|l| platform_checks(l, &[])) else {
            writeln!(
                out,
                "{}: no manifest.json or manifest.yaml in this folder",
                dir.display()
            )?;
            return Ok(exit::INVALID);
        };
        print_load(&mut out, &load)?;
        let ok = load.is_valid();
        writeln!(out, "{}", summary(1, usize::from(ok), &[load]))?;
        return Ok(if ok { exit::OK } else { exit::INVALID });
    }

    let ws = Workspace::locate(workspace)?;
    let (cfg, pins) = match AgentConfig::for_workspace(&ws) {
        Ok((c, yaml)) => (c, yaml.map(|y| y.pins).unwrap_or_default()),
        Err(e) => {
            writeln!(out, "error: {e}")?;
            return Ok(exit::INVALID);
        }
    };
    let PackScan {
        loads,
        conflicts,
        root_missing,
    } = scan_packs(&ws, &cfg);
    let loads: Vec<PackLoad> = loads
        .into_iter()
        .map(|l| platform_checks(l, &pins))
        .collect();
    if root_missing {
        writeln!(
            out,
            "no packs root: {} does not exist (agent.json packs_dir = \"{}\")",
            cfg.packs_dir, cfg.packs_dir
        )?;
        return Ok(exit::OK);
    }
    for load in &loads {
        print_load(&mut out, load)?;
    }
    for c in &conflicts {
        writeln!(out, "error: {c}")?;
    }
    let valid = loads.iter().filter(|l| l.is_valid()).count();
    writeln!(out, "{}", summary(loads.len(), valid, &loads))?;
    Ok(if valid == loads.len() && conflicts.is_empty() {
        exit::OK
    } else {
        exit::INVALID
    })
}

/// What the platform's loader requires beyond the agent: the workspace.yaml pin (an error:
/// the agent does not load such a pack either) and its own manifest rules (warnings: the agent
/// runs the pack, the platform would refuse it).
fn platform_checks(mut load: PackLoad, pins: &[PackPin]) -> PackLoad {
    let warn = |message: String| Diagnostic {
        severity: Severity::Warning,
        file: load.display.clone(),
        field: None,
        message: format!("platform loader: {message}"),
    };
    let mut warnings = Vec::new();
    if load.file.file_name().is_some_and(|n| n != "manifest.yaml") {
        warnings.push(warn(
            "the platform reads only manifest.yaml; it does not see this pack (rename the file, in YAML)".into(),
        ));
    }
    let raw = std::fs::read_to_string(&load.file)
        .ok()
        .and_then(|t| serde_yaml_ng::from_str::<serde_json::Value>(&t).ok());
    if let Some(raw) = raw {
        warnings.extend(loader_warnings(&raw).into_iter().map(warn));
    }
    load.diagnostics.extend(warnings);
    if let Some(pin) = load
        .manifest
        .as_ref()
        .and_then(|m| pins.iter().find(|p| p.id == m.id))
    {
        check_pin(&mut load, pin);
    }
    load
}

fn print_load(out: &mut impl Write, load: &PackLoad) -> std::io::Result<()> {
    for d in load.errors() {
        writeln!(out, "error: {d}")?;
    }
    for d in load.warnings() {
        writeln!(out, "warning: {d}")?;
    }
    if let Some(m) = &load.manifest {
        writeln!(out, "ok: {} {} ({})", m.id, m.version, load.display)?;
    }
    Ok(())
}

fn summary(total: usize, valid: usize, loads: &[PackLoad]) -> String {
    let errors: usize = loads.iter().map(|l| l.errors().count()).sum();
    let warnings: usize = loads.iter().map(|l| l.warnings().count()).sum();
    format!(
        "{total} pack{} checked: {valid} valid, {} invalid ({errors} error{}, {warnings} warning{})",
        if total == 1 { "" } else { "s" },
        total - valid,
        if errors == 1 { "" } else { "s" },
        if warnings == 1 { "" } else { "s" },
    )
}
