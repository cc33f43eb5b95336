//! Talking to the running agent from the CLI: `api.json` gives the URL and token.

use crate::workspace::Workspace;
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answers in this workspace.
    #[error("lumenflow-agent is not running in {0} (start it with `lumenflow-agent start`)")]
    NotRunning(String),
    #[error("{0}")]
    Other(String),
}

pub struct ApiClient {
    url: String,
    token: String,
    agent: ureq::Agent,
}

/// A reply: status code and parsed JSON body.
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Reply {
    /// The `error.message` of an error reply.
    pub fn message(&self) -> String {
        self.body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.body.to_string())
    }
}

impl ApiClient {
    pub fn connect(ws: &Workspace) -> Result<Self, ClientError> {
        let not_running = || ClientError::NotRunning(ws.root.display().to_string());
        let text = std::fs::read_to_string(ws.api_file()).map_err(|_| not_running())?;
        let v: Value = serde_json::from_str(&text).map_err(|_| not_running())?;
        let url = v["url"].as_str().ok_or_else(not_running)?.to_string();
        let token = v["token"].as_str().ok_or_else(not_running)?.to_string();
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build();
        Ok(ApiClient {
            url,
            token,
            agent: config.into(),
        })
    }

    fn finish(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        ws_hint: &str,
    ) -> Result<Reply, ClientError> {
        let mut resp = r.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::NotRunning(ws_hint.to_string())
            }
            other => ClientError::Other(format!("request to the agent failed: {other}")),
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| ClientError::Other(format!("reading the agent's reply: {e}")))?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    /// A streamed GET (`/v1/tap`): the body as it arrives, with no time limit on it.
    pub fn stream(
        &self,
        path: &str,
        ws: &Workspace,
    ) -> Result<Box<dyn std::io::BufRead + Send>, ClientError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let r = agent
            .get(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        let hint = ws.root.display().to_string();
        let resp = r.map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                ClientError::NotRunning(hint.clone())
            }
            other => ClientError::Other(format!("request to the agent failed: {other}")),
        })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.into_body().read_to_string().unwrap_or_default();
            return Err(ClientError::Other(format!(
                "the agent answered {status}: {text}"
            )));
        }
        let reader = resp.into_body().into_reader();
        Ok(Box::new(std::io::BufReader::new(reader)))
    }

    pub fn get(&self, path: &str, ws: &Workspace) -> Result<Reply, ClientError> {
        let r = self
            .agent
            .get(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(r, &ws.root.display().to_string())
    }

    pub fn post(&self, path: &str, body: &Value, ws: &Workspace) -> Result<Reply, ClientError> {
        let r = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .send(body.to_string());
        self.finish(r, &ws.root.display().to_string())
    }
}

/// POSTs to the agent running in `ws`: `Ok(None)` when none runs (the caller then works on
/// the database itself), its reply whatever the status otherwise.
pub fn post_if_running(
    ws: &Workspace,
    path: &str,
    body: &Value,
) -> Result<Option<Reply>, ClientError> {
    let client = match ApiClient::connect(ws) {
        Ok(c) => c,
        Err(ClientError::NotRunning(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    match client.post(path, body, ws) {
        Ok(r) => Ok(Some(r)),
        Err(ClientError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e),
    }
}
