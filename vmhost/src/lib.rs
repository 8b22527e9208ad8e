//! vmhost, the host agent: one per machine.
//!
//! It will own the sandboxes of its machine behind one `Driver` seam (a
//! gVisor driver here, a Firecracker driver on KVM hosts), templates as
//! snapshots and the host's HTTP API. Nothing of that is built yet; the
//! snapshot engine it will use is the `snapshot` crate in `vmhost/snapshot/`.
