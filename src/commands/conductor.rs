//! `lumenflow-agent conductor serve | publish`.

use super::exit;
use crate::cli::ConductorAction;
use serde_json::{json, Value};

pub fn run(action: &ConductorAction) -> anyhow::Result<u8> {
    match action {
        ConductorAction::Serve { listen, token, db } => {
            crate::conductor::serve(listen, token.clone(), db)?;
            Ok(exit::OK)
        }
        ConductorAction::Publish {
            kind,
            payload,
            workspace_id,
            url,
            token,
            event_id,
        } => {
            let payload: Value = serde_json::from_str(payload)
                .map_err(|e| anyhow::anyhow!("--payload is not valid JSON: {e}"))?;
            let token = token
                .clone()
                .or_else(|| std::env::var("LUMENFLOW_CONTROL_PLANE_TOKEN").ok())
                .unwrap_or_else(|| "dev-token".into());
            let mut event = json!({"kind": kind, "payload": payload});
            if let Some(id) = event_id {
                event["event_id"] = json!(id);
            }
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut r = agent
                .post(format!("{}/admin/publish", url.trim_end_matches('/')))
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .send(json!({"workspace_id": workspace_id, "events": [event]}).to_string())?;
            let text = r.body_mut().read_to_string()?;
            if r.status().as_u16() != 200 {
                anyhow::bail!("the conductor answered {}: {text}", r.status());
            }
            let v: Value = serde_json::from_str(&text)?;
            println!("{}", v["event_ids"][0].as_str().unwrap_or_default());
            Ok(exit::OK)
        }
    }
}
