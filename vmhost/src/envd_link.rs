//! The host end of one sandbox's envd connection.
//!
//! envd *dials* the host: vmhost listens on a per-sandbox Unix socket, and
//! every connection envd makes becomes an HTTP/2 client connection (envd is
//! the server on it; many requests share the one connection). After a
//! restore envd re-dials, so there is never a listening socket inside whose
//! peer vanished.
//!
//! Before a snapshot the link is closed: the socket file is removed, so
//! envd, whose connections `/snapshot/prepare` closed, cannot dial back in
//! before the checkpoint (a connected host socket makes runsc's checkpoint
//! fail).

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why talking to envd failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Binding the host socket failed.
    #[error("listen on {path}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// envd did not connect in time.
    #[error("envd did not connect within {0:?}")]
    NotConnected(Duration),
    /// The link was closed (snapshot or destroy).
    #[error("the link to envd is closed")]
    Closed,
    /// The request failed on the connection.
    #[error("request to envd")]
    Request(#[source] hyper::Error),
}

/// One sandbox's link to its envd.
#[derive(Debug)]
pub struct EnvdLink {
    socket: PathBuf,
    senders: watch::Receiver<Option<(SendRequest<Body>, tokio::task::AbortHandle)>>,
    acceptor: JoinHandle<()>,
}

impl EnvdLink {
    /// Listens on `socket` (its directory must exist) and takes every
    /// connection envd makes, the newest serving requests.
    pub fn listen(socket: &Path) -> Result<EnvdLink, LinkError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| LinkError::Listen {
            path: socket.to_path_buf(),
            source,
        })?;
        let (tx, rx) = watch::channel(None);
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    // Large windows: file transfers stream through here.
                    .initial_stream_window_size(4 << 20)
                    .initial_connection_window_size(8 << 20)
                    .handshake::<_, Body>(TokioIo::new(stream))
                    .await;
                match handshake {
                    Ok((sender, conn)) => {
                        let task = tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "envd connection ended");
                            }
                        });
                        tx.send_replace(Some((sender, task.abort_handle())));
                    }
                    Err(e) => tracing::warn!(error = %e, "envd connection handshake failed"),
                }
            }
        });
        Ok(EnvdLink {
            socket: socket.to_path_buf(),
            senders: rx,
            acceptor,
        })
    }

    /// The host socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client on a live connection, waiting up to `timeout` for envd to
    /// (re-)dial.
    pub async fn client(&self, timeout: Duration) -> Result<SendRequest<Body>, LinkError> {
        if self.acceptor.is_finished() {
            return Err(LinkError::Closed);
        }
        let mut rx = self.senders.clone();
        let wait = async {
            loop {
                if let Some((s, _)) = rx.borrow_and_update().as_ref() {
                    if !s.is_closed() {
                        return Ok(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(LinkError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| LinkError::NotConnected(timeout))?
    }

    /// Sends one request on a live connection.
    pub async fn send(
        &self,
        req: http::Request<Body>,
        connect_timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, LinkError> {
        let mut c = self.client(connect_timeout).await?;
        c.ready().await.map_err(LinkError::Request)?;
        c.send_request(req).await.map_err(LinkError::Request)
    }

    /// Closes the connection in use (one that stopped answering), so envd
    /// dials a new one; the next request waits for it.
    pub fn reset(&self) {
        if let Some((_, task)) = self.senders.borrow().as_ref() {
            task.abort();
        }
    }

    /// Stops taking connections and removes the socket file, so envd cannot
    /// dial back in; connections already made stay until envd closes them.
    pub fn close(&self) {
        self.acceptor.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for EnvdLink {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}
