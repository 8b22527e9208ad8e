//! vmhost, the host agent: one per machine.
//!
//! It owns the sandboxes of its machine behind one [`driver::Driver`] seam
//! (the gVisor driver here; a Firecracker driver on KVM hosts), turns
//! templates into snapshots ([`templates`]), and serves the host API
//! ([`api::router`]). [`host::Host`] is the core every route calls.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod driver;
pub mod envd_link;
pub mod error;
pub mod host;
pub mod hostinfo;
pub mod metrics;
pub mod snapshots;
pub mod sys;
pub mod templates;
