//! Ports: which TCP ports listen inside the sandbox (from /proc/net/tcp and
//! tcp6), a background scanner that keeps the list fresh, and tunnels that
//! carry a byte stream from the host to `127.0.0.1:PORT` inside, over an
//! upgraded HTTP/1.1 connection or an HTTP CONNECT.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::error::ApiError;
use crate::state::AppState;

/// How often the background scanner refreshes its list.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// A listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ListeningPort {
    /// Port.
    pub port: u16,
    /// Address it is bound to.
    pub address: IpAddr,
}

fn parse_addr(hex: &str) -> Option<IpAddr> {
    // /proc prints each 32-bit word of the address in host byte order.
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    match words.as_slice() {
        [a] => Some(IpAddr::V4(Ipv4Addr::from(a.to_ne_bytes()))),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Parses a /proc/net/tcp or tcp6 table, keeping the LISTEN rows.
pub fn parse_proc_net_tcp(table: &str) -> Vec<ListeningPort> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let state = cols.nth(1)?;
            if state != "0A" {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(ListeningPort {
                port: u16::from_str_radix(port, 16).ok()?,
                address: parse_addr(addr)?,
            })
        })
        .collect()
}

/// Every TCP port listening now.
pub fn scan() -> Vec<ListeningPort> {
    let mut all: Vec<ListeningPort> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_proc_net_tcp(&t))
        .collect();
    all.sort();
    all.dedup();
    all
}

/// The background scanner: stopped by `/snapshot/prepare`, started by
/// `/init` and at start-up.
#[derive(Debug, Default)]
pub struct PortScanner {
    running: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last: Arc<Mutex<Vec<ListeningPort>>>,
}

impl PortScanner {
    /// A stopped scanner.
    pub fn new() -> Arc<PortScanner> {
        Arc::new(PortScanner::default())
    }

    /// Starts scanning (no-op when running). Needs a tokio runtime.
    pub fn start(&self) {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let last = self.last.clone();
        *task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SCAN_INTERVAL);
            loop {
                tick.tick().await;
                let ports = tokio::task::spawn_blocking(scan).await.unwrap_or_default();
                *last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = ports;
            }
        }));
        self.running.store(true, Ordering::SeqCst);
    }

    /// Stops scanning.
    pub fn stop(&self) {
        if let Some(t) = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            t.abort();
        }
        self.running.store(false, Ordering::SeqCst);
    }

    /// Whether it is scanning.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

/// `GET /ports`: a fresh scan.
pub async fn list() -> Result<Json<serde_json::Value>, ApiError> {
    let ports = tokio::task::spawn_blocking(scan)
        .await
        .map_err(|e| ApiError::internal(format!("port scan failed: {e}")))?;
    Ok(Json(serde_json::json!({ "ports": ports })))
}

async fn dial(port: u16) -> Result<TcpStream, ApiError> {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "port_unreachable",
                format!("nothing answers on 127.0.0.1:{port} inside the sandbox: {e}"),
            )
        })
}

/// Copies bytes both ways between the upgraded host connection and the
/// port until either side closes or envd quiesces for a snapshot (a tunnel
/// is a host connection too, and must not survive into a checkpoint).
fn splice(state: &AppState, mut req: Request, mut upstream: TcpStream, port: u16) {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mut generation = state.quiesce.generation.subscribe();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(port, error = %e, "tunnel upgrade failed");
                return;
            }
        };
        let mut host = TokioIo::new(upgraded);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut host, &mut upstream) => {
                tracing::debug!(port, result = ?r, "tunnel closed");
            }
            _ = generation.changed() => {
                tracing::debug!(port, "tunnel closed for a snapshot");
            }
        }
    });
}

/// `GET /ports/{port}/tunnel` with `Connection: upgrade`, `Upgrade: tcp`:
/// 101, then the connection carries raw bytes to `127.0.0.1:PORT`.
pub async fn tunnel(
    State(state): State<AppState>,
    Path(port): Path<u16>,
    req: Request,
) -> Result<Response, ApiError> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("tcp"));
    if !wants_upgrade {
        return Err(ApiError::bad_request(
            "upgrade_required",
            "a tunnel needs `Connection: upgrade` and `Upgrade: tcp` (HTTP/1.1), or use CONNECT 127.0.0.1:PORT",
        ));
    }
    if port == 0 {
        return Err(ApiError::bad_request(
            "invalid_port",
            "port: must be 1-65535",
        ));
    }
    let upstream = dial(port).await?;
    splice(&state, req, upstream, port);
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    Ok(resp)
}

/// `CONNECT 127.0.0.1:PORT` (HTTP/1.1 or HTTP/2): 200, then the stream
/// carries raw bytes. Only loopback targets: the tunnel reaches the
/// sandbox's own ports, nothing beyond.
pub async fn connect(state: AppState, req: Request) -> Result<Response, ApiError> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Err(ApiError::bad_request(
            "invalid_connect",
            "CONNECT needs an authority such as 127.0.0.1:8888",
        ));
    };
    if !matches!(authority.host(), "127.0.0.1" | "localhost" | "[::1]") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_target",
            "CONNECT reaches only 127.0.0.1 inside the sandbox",
        ));
    }
    let Some(port) = authority.port_u16().filter(|p| *p != 0) else {
        return Err(ApiError::bad_request(
            "invalid_port",
            "CONNECT needs a port 1-65535",
        ));
    };
    let upstream = dial(port).await?;
    splice(&state, req, upstream, port);
    Ok(StatusCode::OK.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_rows_of_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n";
        assert_eq!(
            parse_proc_net_tcp(v4),
            vec![ListeningPort {
                port: 8080,
                address: IpAddr::V4(Ipv4Addr::LOCALHOST)
            }]
        );
        let v6 = "  sl  local_address remote_address st\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(
            parse_proc_net_tcp(v6),
            vec![ListeningPort {
                port: 22,
                address: IpAddr::V6(Ipv6Addr::LOCALHOST)
            }]
        );
    }
}
