//! `thaw-snapshot`: the snapshot engine from the command line: convert raw
//! memory images, merge diffs, inspect and verify files, and serve a
//! restore over userfaultfd.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use snapshot::convert::{convert, RawKind};
use snapshot::format::{ExtentKind, MemoryFile};
use snapshot::merge::{merge, relayout};
use snapshot::server::{serve, ServeOptions};

/// thaw's snapshot engine: compact memory files, single-generation diff
/// merges, and a userfaultfd page server with working-set prefetch.
#[derive(Debug, Parser)]
#[command(name = "thaw-snapshot", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert a raw memory image (Firecracker's memory file) into a compact
    /// memory file: zero pages are dropped, holes are not read.
    Convert {
        /// The raw image.
        raw: PathBuf,
        /// The memory file to write (replaced atomically).
        out: PathBuf,
        /// The image is a sparse diff (holes = unchanged pages).
        #[arg(long)]
        diff: bool,
        /// Generation number recorded for every page.
        #[arg(long, default_value_t = 1)]
        generation: u32,
    },
    /// Merge a diff layer (a converted `--diff` file) onto its base into one
    /// single-generation file (OUT may be BASE itself).
    Merge {
        /// The base memory file.
        base: PathBuf,
        /// The diff memory file.
        diff: PathBuf,
        /// The merged file to write (replaced atomically).
        out: PathBuf,
    },
    /// Print a memory file's header and map summary as JSON.
    Info {
        /// The memory file.
        file: PathBuf,
    },
    /// Check every checksum of a memory file.
    Verify {
        /// The memory file.
        file: PathBuf,
    },
    /// Serve one restore: listen on SOCKET, take Firecracker's handshake,
    /// serve page faults until the peer closes the socket, print figures.
    Serve {
        /// The memory file.
        file: PathBuf,
        /// Unix socket to listen on (Firecracker's `backend_path`).
        #[arg(long)]
        socket: PathBuf,
        /// Install the recorded working set ahead of the guest.
        #[arg(long)]
        prefetch: bool,
        /// After the working set, install every other stored page too.
        #[arg(long)]
        prefetch_all: bool,
        /// Record the pages faulted in during the first N ms.
        #[arg(long)]
        record_ms: Option<u64>,
        /// Threads installing the working set.
        #[arg(long, default_value_t = 2)]
        prefetch_threads: usize,
        /// Pages installed per demand fault (1 = no fault-around).
        #[arg(long, default_value_t = 16)]
        fault_around: u32,
        /// Write a copy of FILE laid out with the recorded working set first.
        #[arg(long, requires = "record_ms")]
        save_working_set: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("thaw-snapshot: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(match cmd {
        Command::Convert {
            raw,
            out,
            diff,
            generation,
        } => {
            let kind = if diff { RawKind::Diff } else { RawKind::Full };
            let (layout, s) = convert(&raw, &out, kind, generation)?;
            serde_json::json!({
                "raw_bytes": s.raw_bytes, "read_bytes": s.read_bytes,
                "data_pages": s.data_pages, "zero_pages": s.zero_pages,
                "stored_bytes": s.stored_bytes, "extents": layout.extents.len(),
                "elapsed_ms": s.elapsed.as_secs_f64() * 1e3,
            })
        }
        Command::Merge { base, diff, out } => {
            let base = MemoryFile::open(&base)?;
            let diff = MemoryFile::open(&diff)?;
            let (layout, s) = merge(&base, &diff, &out)?;
            serde_json::json!({
                "diff_bytes": s.diff_bytes, "carried_bytes": s.carried_bytes,
                "reflinked": s.reflinked, "compacted": s.compacted,
                "live_bytes": s.live_bytes, "garbage_bytes": s.garbage_bytes,
                "extents": layout.extents.len(),
                "elapsed_ms": s.elapsed.as_secs_f64() * 1e3,
            })
        }
        Command::Info { file } => {
            let f = MemoryFile::open(&file)?;
            let l = &f.layout;
            let zero = l
                .extents
                .iter()
                .filter(|e| e.kind == ExtentKind::Zero)
                .count();
            serde_json::json!({
                "guest_size": l.guest_size, "data_offset": l.data_offset,
                "data_len": l.data_len, "referenced_bytes": l.referenced_bytes(),
                "extents": l.extents.len(), "zero_extents": zero,
                "working_set_runs": l.working_set.len(),
                "working_set_pages": l.working_set.iter().map(|r| r.pages).sum::<u64>(),
                "generations": l.extents.iter().map(|e| e.generation).collect::<std::collections::BTreeSet<_>>(),
            })
        }
        Command::Verify { file } => {
            MemoryFile::open(&file)?.verify()?;
            serde_json::json!({"ok": true})
        }
        Command::Serve {
            file,
            socket,
            prefetch,
            prefetch_all,
            record_ms,
            prefetch_threads,
            fault_around,
            save_working_set,
        } => {
            let mem = Arc::new(MemoryFile::open(&file)?);
            // Bound and listening under a temporary name, then renamed: the
            // socket appears only once it accepts, so a peer that waits for
            // the file is never refused.
            let tmp = socket.with_extension("binding");
            let _ = std::fs::remove_file(&tmp);
            let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
            std::fs::rename(&tmp, &socket)?;
            let (conn, _) = listener.accept()?;
            let opts = ServeOptions {
                prefetch,
                prefetch_all,
                record_for: record_ms.map(Duration::from_millis),
                fault_around,
                prefetch_threads,
            };
            let stats = serve(mem.clone(), conn, &opts)?;
            if let Some(out) = save_working_set {
                relayout(&mem, &stats.recorded, &out)?;
            }
            serde_json::to_value(&stats)?
        }
    })
}
