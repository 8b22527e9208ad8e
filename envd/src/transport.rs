//! How the host reaches envd: by envd listening (TCP or a Unix socket, for
//! tests and direct use) or by envd dialing out to a host Unix socket and
//! serving HTTP/1.1 or HTTP/2 on each connection it dialed.
//!
//! Dialing out is what survives a snapshot restore: there is no listening
//! socket inside the sandbox whose peers vanished. Several connections are
//! kept open; a dropped one is re-dialed with a short backoff.
//!
//! After `/snapshot/prepare` every connection closes (gracefully: the
//! answer in flight goes out first) and the dialers wait until the host
//! socket has gone away — refused, missing, or replaced by a new socket —
//! before dialing again, so that no connection exists while the host takes
//! its checkpoint. The host must stop accepting (close its listener) after
//! it has the prepare answer.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// First re-dial delay.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest re-dial delay (bounds how late envd answers after a restore).
const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// How long a closing connection may take to finish its requests.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(1);
/// How often a quiesced dialer looks at the host socket.
const QUIESCED_PROBE: Duration = Duration::from_millis(10);

/// Where envd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, e.g. `127.0.0.1:49983`.
    Tcp(SocketAddr),
    /// A Unix socket path, written `unix:/path`.
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/envd.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:PATH ({e})"))
    }
}

/// Serves HTTP/1.1 and HTTP/2 on one connection until it closes, envd
/// quiesces (graceful close), or envd shuts down.
pub async fn serve_connection<IO>(io: IO, app: Router, state: AppState, shutdown: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut generation = state.quiesce.generation.subscribe();
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = generation.changed() => {}
        () = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout(GRACEFUL_CLOSE, conn).await.is_err() {
        tracing::debug!("connection did not finish in time; dropped");
    }
}

/// Accepts connections on `addr` until shutdown.
pub async fn listen(
    addr: ListenAddr,
    app: Router,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    match addr {
        ListenAddr::Tcp(a) => {
            let listener = TcpListener::bind(a).await?;
            tracing::info!(addr = %a, "listening");
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => r?,
                    () = shutdown.cancelled() => return Ok(()),
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    state.clone(),
                    shutdown.clone(),
                ));
            }
        }
        ListenAddr::Unix(path) => {
            // A stale socket file from an earlier run would make bind fail.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                std::fs::remove_file(&path)?;
            }
            let listener = UnixListener::bind(&path)?;
            tracing::info!(path = %path.display(), "listening");
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => r?,
                    () = shutdown.cancelled() => return Ok(()),
                };
                tokio::spawn(serve_connection(
                    stream,
                    app.clone(),
                    state.clone(),
                    shutdown.clone(),
                ));
            }
        }
    }
}

/// Keeps `connections` dialed connections to the host socket at `path`.
pub async fn dial(
    path: PathBuf,
    connections: usize,
    app: Router,
    state: AppState,
    shutdown: CancellationToken,
) {
    tracing::info!(path = %path.display(), connections, "dialing the host");
    let slots: Vec<_> = (0..connections.max(1))
        .map(|slot| {
            tokio::spawn(dial_slot(
                slot,
                path.clone(),
                app.clone(),
                state.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    for s in slots {
        let _ = s.await;
    }
}

async fn dial_slot(
    slot: usize,
    path: PathBuf,
    app: Router,
    state: AppState,
    shutdown: CancellationToken,
) {
    let mut seen = *state.quiesce.generation.borrow();
    let mut backoff = BACKOFF_MIN;
    while !shutdown.is_cancelled() {
        let generation = *state.quiesce.generation.borrow();
        if generation != seen && state.quiesce.is_quiesced() {
            wait_for_host_restart(&path, &state, &shutdown).await;
        }
        seen = generation;
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                tracing::debug!(slot, "connected to the host");
                backoff = BACKOFF_MIN;
                serve_connection(stream, app.clone(), state.clone(), shutdown.clone()).await;
            }
            Err(e) => {
                tracing::trace!(slot, error = %e, "dial failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// What tells two host sockets apart: device and inode, and the change
/// time to the nanosecond, because a new socket may reuse the inode number
/// of the one it replaced (seen: a restore's fresh socket with the deleted
/// one's inode, so envd kept probing instead of dialing).
fn socket_identity(path: &Path) -> Option<(u64, u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// After a prepare: returns once the host socket stopped answering (refused
/// or missing) or was replaced by a new one, or envd was re-initialised.
/// Probes that still connect are closed at once.
async fn wait_for_host_restart(path: &Path, state: &AppState, shutdown: &CancellationToken) {
    let prepared = socket_identity(path);
    loop {
        if !state.quiesce.is_quiesced() || shutdown.is_cancelled() {
            return;
        }
        match socket_identity(path) {
            None => return,
            Some(id) if Some(id) != prepared => return,
            Some(_) => {}
        }
        match UnixStream::connect(path).await {
            Err(_) => return,
            Ok(probe) => drop(probe),
        }
        tokio::time::sleep(QUIESCED_PROBE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/tmp/e.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix(PathBuf::from("/tmp/e.sock")))
        );
        assert!(matches!(
            "127.0.0.1:49983".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp(_))
        ));
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }
}
