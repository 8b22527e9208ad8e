//! One build step in a runsc sandbox: an OCI bundle whose root is the root
//! filesystem being built, so a RUN step can change that directory and
//! nothing else of the host (gVisor's kernel stands between it and the
//! host). The network is the host's (`--network=host`: packages are fetched
//! at build time only); the step's output is read line by line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde_json::json;

/// Capabilities of a root build step: what package installs need
/// (chown, setuid/setgid for apt's sandbox user, …), as a container runtime
/// gives them. A non-root step gets none.
const ROOT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// The default `PATH` of build steps.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to run runsc.
#[derive(Debug, Clone)]
pub struct Runsc {
    /// The runsc binary.
    pub binary: PathBuf,
    /// Its platform (`ptrace` here; `systrap` on newer releases).
    pub platform: String,
    /// State directory (`--root`).
    pub state_dir: PathBuf,
}

/// Who a step runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUser {
    /// Name (for `USER`/`HOME`).
    pub name: String,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

impl StepUser {
    /// root.
    pub fn root() -> StepUser {
        StepUser {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: "/root".into(),
        }
    }
}

/// One step to run.
#[derive(Debug, Clone)]
pub struct StepSpec<'a> {
    /// The root filesystem (read-write).
    pub rootfs: &'a Path,
    /// argv.
    pub argv: Vec<String>,
    /// Environment after PATH/HOME/USER.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// User.
    pub user: StepUser,
    /// Read-only bind mounts: (host path, sandbox path).
    pub binds: Vec<(PathBuf, String)>,
    /// Network: `host` for build steps.
    pub network: &'a str,
    /// Keep the root read-only, writes going to memory (for running a
    /// built image without changing it); build steps write the tree.
    pub readonly_root: bool,
}

/// Why a step could not run (its own failure is an exit status, not this).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Writing the bundle or starting runsc failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let op = op.into();
    move |source| SandboxError::Io { op, source }
}

/// Writes the OCI bundle of a step into `bundle`.
pub fn write_bundle(bundle: &Path, spec: &StepSpec<'_>) -> Result<(), SandboxError> {
    let caps: Vec<&str> = if spec.user.uid == 0 {
        ROOT_CAPS.to_vec()
    } else {
        Vec::new()
    };
    let mut env = vec![
        format!("PATH={PATH}"),
        format!("HOME={}", spec.user.home),
        format!("USER={}", spec.user.name),
        format!("LOGNAME={}", spec.user.name),
        "DEBIAN_FRONTEND=noninteractive".to_string(),
    ];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        // Scratch space: nothing a step leaves in /tmp ends up in the image.
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}),
    ];
    for (host, inside) in &spec.binds {
        mounts.push(json!({"destination": inside, "type": "bind", "source": host, "options": ["rbind", "ro"]}));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if spec.network != "host" {
        namespaces.push(json!({"type": "network"}));
    }
    let config = json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": spec.user.uid, "gid": spec.user.gid},
            "args": spec.argv,
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
            "noNewPrivileges": false,
        },
        "root": {"path": spec.rootfs, "readonly": spec.readonly_root},
        "hostname": "thaw-build",
        "mounts": mounts,
        "linux": {"namespaces": namespaces},
    });
    std::fs::create_dir_all(bundle).map_err(io(format!("create bundle {}", bundle.display())))?;
    let body = serde_json::to_vec_pretty(&config).map_err(|e| SandboxError::Io {
        op: "encode config.json".into(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(bundle.join("config.json"), body)
        .map_err(io(format!("write {}/config.json", bundle.display())))
}

/// Runs one step to completion; every output line goes to `on_line`.
/// Returns the step's exit status (`None`: killed by a signal).
pub fn run_step(
    runsc: &Runsc,
    bundle: &Path,
    id: &str,
    spec: &StepSpec<'_>,
    on_line: &mut dyn FnMut(&str),
) -> Result<Option<i32>, SandboxError> {
    write_bundle(bundle, spec)?;
    std::fs::create_dir_all(&runsc.state_dir).map_err(io("create runsc state dir"))?;
    let mut child = Command::new(&runsc.binary)
        .arg(format!("--root={}", runsc.state_dir.display()))
        .arg(format!("--platform={}", runsc.platform))
        .arg(format!("--network={}", spec.network))
        .arg(if spec.readonly_root {
            "--overlay2=root:memory"
        } else {
            "--overlay2=none"
        })
        .arg("--ignore-cgroups")
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("start {}", runsc.binary.display())))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    drop(tx);
    for line in rx {
        on_line(&line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(io("wait for runsc"))?;
    // A finished `runsc run` removes its container; make sure of it.
    let _ = Command::new(&runsc.binary)
        .arg(format!("--root={}", runsc.state_dir.display()))
        .args(["delete", "-force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    Ok(status.code())
}
