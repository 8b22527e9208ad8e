//! gateway, thaw's public API (the `thaw` binary).
//!
//! It will own `POST /run`, stateful sandboxes, files, processes, PTY over
//! WebSocket, API keys, limits, `/metrics` and the OpenAPI document. Nothing
//! is built yet.
