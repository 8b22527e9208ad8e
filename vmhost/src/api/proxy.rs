//! Requests forwarded to a sandbox's envd: processes, files, ports and
//! metrics as they are (streams stay streams, both ways), and `run`, which
//! hands one job to the warm runner and makes sure its stream ends with a
//! terminal event even when the sandbox dies under it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use serde_json::{json, Value};

use crate::error::HostError;
use crate::host::Host;

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
];

fn copy_headers(from: &http::HeaderMap, to: &mut http::HeaderMap) {
    for (k, v) in from {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// How long a forwarded request waits for envd to (re-)dial.
const CONNECT: Duration = Duration::from_secs(5);

/// `ANY /sandboxes/{id}/{processes,files,ports,metrics}…`: forwarded to
/// envd with the `/sandboxes/{id}` prefix removed.
pub async fn forward(State(h): State<Arc<Host>>, req: Request) -> Result<Response, HostError> {
    let path = req.uri().path().to_string();
    let Some((id, tail)) = path
        .strip_prefix("/sandboxes/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Err(HostError::BadRequest(format!("path: {path}")));
    };
    let sb = h.running(id)?;
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (parts, body) = req.into_parts();
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(format!("http://envd/{tail}{query}"))
        .body(body)
        .map_err(|e| HostError::BadRequest(format!("path: {e}")))?;
    copy_headers(&parts.headers, out.headers_mut());
    let resp = sb
        .link()
        .send(out, CONNECT)
        .await
        .map_err(|e| HostError::Envd(format!("{e}")))?;
    let (rparts, rbody) = resp.into_parts();
    let mut back = Response::new(Body::new(rbody));
    *back.status_mut() = rparts.status;
    copy_headers(&rparts.headers, back.headers_mut());
    Ok(back)
}

/// `POST /sandboxes/{id}/run`: one job for the sandbox's warm runner
/// (envd's `/run` body: code, args, env, cwd, stdin, timeout_ms). The
/// answer is envd's NDJSON stream; if it breaks off (the sandbox was
/// killed for memory, its wall time, …) a last `error` event says why.
pub async fn run(
    State(h): State<Arc<Host>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, HostError> {
    let sb = h.running(&id)?;
    let mut job: serde_json::Map<String, Value> = super::error::parse(&body)?;
    for field in ["runner", "socket"] {
        if job.contains_key(field) {
            return Err(HostError::BadRequest(format!(
                "{field}: chosen by the host, not the request"
            )));
        }
    }
    h.take_runner(&sb)?;
    job.insert("runner".into(), json!("runner"));
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("http://envd/run")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(Value::Object(job).to_string()))
        .map_err(|e| HostError::Internal(e.to_string()))?;
    let resp = match sb.link().send(req, CONNECT).await {
        Ok(r) => r,
        Err(e) => {
            h.set_runner_ready(&sb, true);
            return Err(HostError::Envd(format!("{e}")));
        }
    };
    let status = resp.status();
    if status == http::StatusCode::BAD_REQUEST {
        // envd refused the body before touching the runner.
        h.set_runner_ready(&sb, true);
    }
    if !status.is_success() {
        let (parts, body) = resp.into_parts();
        let mut back = Response::new(Body::new(body));
        *back.status_mut() = parts.status;
        copy_headers(&parts.headers, back.headers_mut());
        return Ok(back);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let host = h.clone();
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut watcher = TerminalWatcher::default();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                watcher.feed(&data);
                if tx.send(Ok(data)).await.is_err() {
                    return;
                }
            }
        }
        if !watcher.ended() {
            let reason = host.exit_reason_within(&id, Duration::from_secs(3)).await;
            let (code, message) = match reason {
                Some(r) => (
                    r.as_str(),
                    format!("the sandbox stopped during the job: {}", r.as_str()),
                ),
                None => (
                    "envd_unavailable",
                    "the job's output ended without an exit".to_string(),
                ),
            };
            let mut line = json!({"type": "error", "error": {"code": code, "message": message}})
                .to_string()
                .into_bytes();
            line.push(b'\n');
            let _ = tx.send(Ok(Bytes::from(line))).await;
        }
    });
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

/// Follows an NDJSON stream and tells whether its last complete line was
/// a terminal event (`exit`, `error` or `result`).
#[derive(Debug, Default)]
struct TerminalWatcher {
    partial: Vec<u8>,
    terminal: bool,
}

impl TerminalWatcher {
    fn feed(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                self.terminal = matches!(v["type"].as_str(), Some("exit" | "error" | "result"));
            }
        }
        // A single line is bounded by envd's chunking; keep memory bounded
        // anyway if a peer never sends a newline.
        if self.partial.len() > 16 << 20 {
            self.partial.clear();
        }
    }

    fn ended(&self) -> bool {
        self.terminal && self.partial.is_empty()
    }
}

/// `GET /sandboxes/{id}/ports/{port}/tunnel` with `Connection: upgrade`
/// and `Upgrade: tcp`: answers 101, then the connection carries raw bytes
/// to `127.0.0.1:PORT` inside the sandbox, through an HTTP/2 CONNECT
/// stream on the envd link (the same connection every other request uses).
pub async fn tunnel(
    State(h): State<Arc<Host>>,
    Path((id, port)): Path<(String, String)>,
    mut req: Request,
) -> Result<Response, HostError> {
    let port: u16 =
        port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
            HostError::BadRequest(format!("port: {port:?} is not a port (1-65535)"))
        })?;
    let wants_tcp = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("tcp"));
    if !wants_tcp {
        return Err(HostError::BadRequest(
            "upgrade: a tunnel needs `Connection: upgrade` and `Upgrade: tcp`".into(),
        ));
    }
    let sb = h.running(&id)?;
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{port}"))
        .body(Body::empty())
        .map_err(|e| HostError::Internal(e.to_string()))?;
    let mut resp = sb
        .link()
        .send(connect, CONNECT)
        .await
        .map_err(|e| HostError::Envd(format!("{e}")))?;
    if resp.status() != http::StatusCode::OK {
        // envd's own error (nothing listens there, …), passed on as it is.
        let (parts, body) = resp.into_parts();
        let mut back = Response::new(Body::new(body));
        *back.status_mut() = parts.status;
        copy_headers(&parts.headers, back.headers_mut());
        return Ok(back);
    }
    let inner = hyper::upgrade::on(&mut resp);
    let outer = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(inner), Ok(outer)) = (inner.await, outer.await) else {
            return;
        };
        let mut inner = hyper_util::rt::TokioIo::new(inner);
        let mut outer = hyper_util::rt::TokioIo::new(outer);
        let _ = tokio::io::copy_bidirectional(&mut outer, &mut inner).await;
    });
    Ok(Response::builder()
        .status(http::StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "tcp")
        .body(Body::empty())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_ends_only_on_a_terminal_line() {
        let mut w = TerminalWatcher::default();
        w.feed(b"{\"type\":\"stdout\",\"data\":\"MQo=\"}\n{\"type\":\"ex");
        assert!(!w.ended());
        w.feed(b"it\",\"code\":0}\n");
        assert!(w.ended());
        let mut w = TerminalWatcher::default();
        w.feed(b"{\"type\":\"stdout\",\"data\":\"\"}\n");
        assert!(!w.ended());
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut from = http::HeaderMap::new();
        from.insert("connection", "close".parse().unwrap());
        from.insert("content-type", "application/json".parse().unwrap());
        let mut to = http::HeaderMap::new();
        copy_headers(&from, &mut to);
        assert!(to.get("connection").is_none());
        assert_eq!(to.get("content-type").unwrap(), "application/json");
    }
}
