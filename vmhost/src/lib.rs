//! vmhost, the host agent: one per machine.
//!
//! It will own the sandboxes of its machine behind one `Driver` seam (a
//! gVisor driver here, a Firecracker driver on KVM hosts), templates as
//! snapshots, the snapshot engine and the host's HTTP API. Nothing is built
//! yet.
