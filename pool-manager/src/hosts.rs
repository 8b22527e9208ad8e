//! How the pool reaches a vmhost: create a warm sandbox and pause it,
//! destroy one. Over HTTP in distributed mode ([`HttpHosts`]); the gateway's
//! embedded mode implements [`Hosts`] on its in-process vmhost.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::store::HostInfo;

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The host did not answer (down, unreachable, too slow).
    #[error("host {host_id} did not answer: {message}")]
    Unreachable {
        /// The host.
        host_id: String,
        /// What happened.
        message: String,
    },
    /// The host answered with an error.
    #[error("host {host_id} refused: {status} {code}: {message}")]
    Refused {
        /// The host.
        host_id: String,
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// Its message.
        message: String,
    },
}

/// Operations the pool needs from a vmhost.
pub trait Hosts: Send + Sync + 'static {
    /// Creates a sandbox of `template` on `host`, pauses it, and returns
    /// its id. On failure nothing is left on the host.
    fn create_paused(
        &self,
        host: &HostInfo,
        template: &str,
    ) -> impl Future<Output = Result<String, HostsError>> + Send;

    /// Destroys sandbox `sandbox_id` on `host` (unknown or gone is fine).
    fn destroy(
        &self,
        host: &HostInfo,
        sandbox_id: &str,
    ) -> impl Future<Output = Result<(), HostsError>> + Send;
}

/// vmhosts over their HTTP API.
#[derive(Debug, Clone)]
pub struct HttpHosts {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for HttpHosts {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

impl HttpHosts {
    /// A client whose every call gives up after `timeout`.
    pub fn new(timeout: Duration) -> HttpHosts {
        HttpHosts {
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout,
        }
    }

    async fn call(
        &self,
        host: &HostInfo,
        method: http::Method,
        path: &str,
        body: &str,
    ) -> Result<(u16, Value), HostsError> {
        let unreachable = |message: String| HostsError::Unreachable {
            host_id: host.host_id.clone(),
            message,
        };
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", host.url.trim_end_matches('/')))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| unreachable(format!("bad URL {}: {e}", host.url)))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    fn refused(host: &HostInfo, status: u16, v: &Value) -> HostsError {
        HostsError::Refused {
            host_id: host.host_id.clone(),
            status,
            code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
            message: v["error"]["message"].as_str().unwrap_or("").to_string(),
        }
    }
}

impl Hosts for HttpHosts {
    async fn create_paused(&self, host: &HostInfo, template: &str) -> Result<String, HostsError> {
        let body =
            serde_json::json!({"template": template, "metadata": {"pool": "warm"}}).to_string();
        let (status, v) = self
            .call(host, http::Method::POST, "/sandboxes", &body)
            .await?;
        if status != 201 {
            return Err(Self::refused(host, status, &v));
        }
        let Some(id) = v["sandbox_id"].as_str().map(str::to_string) else {
            return Err(Self::refused(host, status, &v));
        };
        let (status, v) = self
            .call(
                host,
                http::Method::POST,
                &format!("/sandboxes/{id}/pause"),
                "",
            )
            .await?;
        if status != 200 {
            let _ = self.destroy(host, &id).await;
            return Err(Self::refused(host, status, &v));
        }
        Ok(id)
    }

    async fn destroy(&self, host: &HostInfo, sandbox_id: &str) -> Result<(), HostsError> {
        let (status, v) = self
            .call(
                host,
                http::Method::DELETE,
                &format!("/sandboxes/{sandbox_id}"),
                "",
            )
            .await?;
        match status {
            202 | 404 | 409 => Ok(()),
            _ => Err(Self::refused(host, status, &v)),
        }
    }
}
