//! `lumenflow-agent validate [PACK_DIR]`: prints every violation of every pack (SPEC §4) and
//! exits 1 when there is any error.

use super::exit;
use crate::config::AgentConfig;
use crate::packs::{scan_packs, PackScan};
use crate::workspace::Workspace;
use lumenflow_actors::sandbox;
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
            let why = lumenflow_pack_sdk::manifest::lookalike(&dir, &base).unwrap_or_else(|| {
                format!(
                    "{}: no manifest.json or manifest.yaml in this folder",
                    dir.display()
                )
            });
            writeln!(out, "{why}")?;
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
        lookalikes,
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
    for l in &lookalikes {
        writeln!(out, "warning: {l}")?;
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
    // The manifest as written, from the one parse that passed the limits (never a second
    // read: the file may have changed, or be a link the load refused).
    if let Some(m) = &load.manifest {
        let raw = serde_json::Value::Object(m.raw.clone());
        warnings.extend(loader_warnings(&raw).into_iter().map(warn));
    }
    load.diagnostics.extend(warnings);
    runtime_checks(&mut load);
    if let Some(pin) = load
        .manifest
        .as_ref()
        .and_then(|m| pins.iter().find(|p| p.id == m.id))
    {
        check_pin(&mut load, pin);
    }
    load
}

/// Scripts a `runtime.command` argument names, by their extension.
const SCRIPT_EXTENSIONS: &[&str] = &["mjs", "js", "cjs", "ts", "mts", "py", "sh", "rb"];

/// That the worker can start: `runtime.command`'s program is on PATH or in the pack folder,
/// and a script it names exists. Found here, not at `start` deep in the log.
fn runtime_checks(load: &mut PackLoad) {
    let Some(command) = load
        .manifest
        .as_ref()
        .and_then(|m| m.runtime.as_ref())
        .map(|r| r.command.clone())
    else {
        return;
    };
    let mut errors = Vec::new();
    if let Some(scopes) = confinement(load) {
        if let Err(e) = sandbox::check_enforceable(&scopes) {
            errors.push(("tools[].required_scopes".to_string(), e.to_string()));
        }
    }
    if let Some(program) = command.first() {
        if !program_resolves(program, &load.dir) {
            errors.push((
                "runtime.command[0]".to_string(),
                format!("Worker program not found: \"{program}\" is not on PATH and not in the pack folder (install it, or fix runtime.command)"),
            ));
        }
    }
    for (i, arg) in command.iter().enumerate().skip(1) {
        let is_script = !arg.starts_with('-')
            && Path::new(arg)
                .extension()
                .is_some_and(|e| SCRIPT_EXTENSIONS.contains(&e.to_string_lossy().as_ref()));
        if is_script && !load.dir.join(arg).is_file() {
            errors.push((
                format!("runtime.command[{i}]"),
                format!("Worker script not found: \"{arg}\" is not in the pack folder"),
            ));
        }
    }
    for (field, message) in errors {
        load.diagnostics.push(Diagnostic {
            severity: Severity::Error,
            file: load.display.clone(),
            field: Some(field),
            message,
        });
        load.manifest = None;
    }
}

fn program_resolves(program: &str, pack_dir: &Path) -> bool {
    if program.contains('/') {
        return pack_dir.join(program).is_file();
    }
    let path = std::env::var_os("PATH");
    lumenflow_actors::exec_worker::find_on_path(Path::new(program), path.as_deref()).is_some()
}

/// What confines an exec pack's worker, if its tools declare scopes (paths resolved against
/// the workspace its packs root sits in).
fn confinement(load: &PackLoad) -> Option<sandbox::Scopes> {
    let m = load.manifest.as_ref().filter(|m| m.runtime.is_some())?;
    let workspace = load
        .dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&load.dir);
    sandbox::scopes_of(m, workspace)
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
        if let Some(scopes) = confinement(load) {
            writeln!(
                out,
                "    confined: {} (this kernel: {})",
                sandbox::describe(Some(&scopes)),
                sandbox::kernel_support()
            )?;
        }
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
