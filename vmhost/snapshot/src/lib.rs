//! thaw's snapshot engine, driver-independent: the compact memory-file
//! format (`format`), converting raw images into it (`convert`),
//! single-generation merges and working-set layout (`merge`), crash-safe
//! writing (`writer`), and the userfaultfd page server with prefetch
//! (`server`, speaking Firecracker's handshake from `handshake`). `harness`
//! plays Firecracker's side for tests and benchmarks.

pub mod convert;
pub mod format;
pub mod handshake;
pub mod harness;
pub mod merge;
pub mod server;
pub mod writer;
