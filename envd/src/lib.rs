//! envd, the guest agent of every thaw sandbox.
//!
//! It will own, inside the sandbox: the HTTP API the host drives (health,
//! init, snapshot prepare, processes with optional PTY, files, ports and
//! tunnels, metrics), reached either on a listening socket or by dialing out
//! to a host Unix socket. Nothing is built yet.
