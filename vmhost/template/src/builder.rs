//! Building a template's root filesystem from its recipe.
//!
//! - The base (`FROM debian:bookworm`) is `debootstrap --variant=minbase`,
//!   made once and cached under the cache directory (a lock keeps two
//!   builds from making it twice).
//! - The recipe's layer is cached by the hash of everything that goes into
//!   it (base, recipe text, every COPY source's bytes): an unchanged recipe
//!   rebuilds in well under a second.
//! - Every step that touches the file system (RUN, USER, WORKDIR, COPY) runs
//!   inside a runsc sandbox whose root is the tree being built, so a step
//!   cannot change the host outside that tree; COPY reads the build context
//!   through a read-only bind mount, so a symlink a RUN step planted cannot
//!   redirect a copy onto the host.
//! - The tree is synced before it is frozen (renamed into the cache).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::context::{Context, ContextError};
use crate::recipe::{parse_file, Instruction, Recipe, RecipeError, Summary, BASE};
use crate::sandbox::{run_step, Runsc, SandboxError, StepSpec, StepUser};

/// Lines of output kept for a failed step's message.
const TAIL_LINES: usize = 20;
/// Where COPY sees the build context inside the build sandbox.
const CONTEXT_MOUNT: &str = "/.thaw-context";

/// Where and how templates are built.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The folder holding one folder per runtime (`runtimes/`).
    pub runtimes_dir: PathBuf,
    /// Cache of bases and built layers (`/var/cache/thaw`).
    pub cache_dir: PathBuf,
    /// State directory; templates' metadata go to `<data>/templates/<name>/`.
    pub data_dir: PathBuf,
    /// runsc.
    pub runsc: Runsc,
    /// Debian mirror for debootstrap.
    pub mirror: String,
    /// An uploaded tar, tar.gz or zip archive COPY reads from instead of
    /// the runtime's folder.
    pub context_archive: Option<PathBuf>,
}

impl BuildConfig {
    /// A configuration with this machine's defaults: `runsc` on PATH with
    /// the ptrace platform (state under the cache), Debian's main mirror,
    /// COPY reading from the runtime folders.
    pub fn new(runtimes_dir: &Path, cache_dir: &Path, data_dir: &Path) -> BuildConfig {
        BuildConfig {
            runtimes_dir: runtimes_dir.to_path_buf(),
            runsc: Runsc {
                binary: PathBuf::from("runsc"),
                platform: "ptrace".into(),
                state_dir: cache_dir.join("runsc-state"),
            },
            cache_dir: cache_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            mirror: DEFAULT_MIRROR.into(),
            context_archive: None,
        }
    }
}

/// Debian's mirror, for the base.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// Progress of a build, as it happens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// The build began.
    Started {
        /// Template name.
        template: String,
        /// Steps in the recipe.
        steps: usize,
        /// Hash of everything that goes into it.
        hash: String,
    },
    /// The base root filesystem is being made (first build only).
    Base {
        /// A line of debootstrap's output.
        line: String,
    },
    /// A step began.
    Step {
        /// 1-based step number.
        n: usize,
        /// Steps in all.
        total: usize,
        /// The instruction as written.
        text: String,
    },
    /// A line of a step's output.
    Output {
        /// Step number.
        n: usize,
        /// The line.
        line: String,
    },
    /// A step finished.
    StepDone {
        /// Step number.
        n: usize,
        /// How long it took.
        elapsed_ms: u64,
    },
    /// The layer was already built: nothing to do.
    Cached {
        /// Template name.
        template: String,
    },
    /// The build finished.
    Finished {
        /// Template name.
        template: String,
        /// The root filesystem.
        rootfs: PathBuf,
        /// Wall time.
        elapsed_ms: u64,
    },
}

/// A built template: its root filesystem and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    /// Name (the runtime's folder).
    pub name: String,
    /// Hash of everything that went into it.
    pub hash: String,
    /// The root filesystem (read-only, shared by every sandbox of it).
    pub rootfs: PathBuf,
    /// Default user, env, workdir, START, READY, limits.
    pub summary: Summary,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The recipe does not parse.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// A COPY source is refused.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// A sandbox could not be run.
    #[error("build sandbox")]
    Sandbox(#[from] SandboxError),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// debootstrap failed.
    #[error("debootstrap of {BASE} failed (exit {code:?}); last lines:\n{tail}")]
    Base {
        /// Its exit status.
        code: Option<i32>,
        /// Its last lines.
        tail: String,
    },
    /// A step failed.
    #[error("step {n} ({text}) failed with exit status {code:?}; last lines:\n{tail}")]
    StepFailed {
        /// Step number.
        n: usize,
        /// The instruction.
        text: String,
        /// Its exit status (`None`: killed).
        code: Option<i32>,
        /// Its last lines of output.
        tail: String,
    },
}

/// Takes an exclusive lock on `path` (created if missing), held until the
/// returned guard drops.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, BuildError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("open", path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        BuildError::Io {
            op: "lock",
            path: path.to_path_buf(),
            source: e.into(),
        }
    })
}

/// A directory removed when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { op, path, source }
}

fn elapsed_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Quotes a string for `/bin/sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Builds (or finds in the cache) the template `name`.
pub fn build(
    name: &str,
    cfg: &BuildConfig,
    progress: &mut dyn FnMut(&BuildEvent),
) -> Result<Template, BuildError> {
    let started = Instant::now();
    let folder = cfg.runtimes_dir.join(name);
    let recipe = parse_file(&folder.join("recipe"))?;
    // An uploaded archive is unpacked (refusing entries that climb out)
    // into a scratch directory that lives as long as the build.
    let unpacked = match &cfg.context_archive {
        Some(archive) => {
            let dir = cfg
                .cache_dir
                .join("contexts")
                .join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Some((Context::from_archive(archive, &dir)?, ScratchDir(dir)))
        }
        None => None,
    };
    let ctx = match &unpacked {
        Some((ctx, _)) => ctx.clone(),
        None => Context::new(&cfg.runtimes_dir, &folder)?,
    };
    let hash = layer_hash(&recipe, &ctx)?;
    progress(&BuildEvent::Started {
        template: name.into(),
        steps: recipe.steps.len(),
        hash: hash.clone(),
    });
    let layers = cfg.cache_dir.join("layers");
    let rootfs = layers.join(&hash);
    let done_marker = layers.join(format!("{hash}.done"));
    let template = Template {
        name: name.into(),
        hash: hash.clone(),
        rootfs: rootfs.clone(),
        summary: recipe.summary(),
    };
    // One build of a layer at a time (another build, or a test thread,
    // may be making the same one): whoever waited finds it done.
    std::fs::create_dir_all(&layers).map_err(io("create", &layers))?;
    let _lock = lock(&layers.join(format!("{hash}.lock")))?;
    if done_marker.exists() && rootfs.is_dir() {
        progress(&BuildEvent::Cached {
            template: name.into(),
        });
    } else {
        let base = ensure_base(cfg, progress)?;
        build_layer(&recipe, &ctx, &base, &rootfs, &hash, cfg, progress)?;
        std::fs::write(&done_marker, b"").map_err(io("mark", &done_marker))?;
    }
    write_metadata(cfg, &template)?;
    progress(&BuildEvent::Finished {
        template: name.into(),
        rootfs,
        elapsed_ms: elapsed_ms(started),
    });
    Ok(template)
}

/// The hash naming a layer: base, recipe text, and every COPY source.
fn layer_hash(recipe: &Recipe, ctx: &Context) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    h.update(b"thaw-template-v2\0");
    h.update(BASE.as_bytes());
    h.update(b"\0minbase\0");
    let text = std::fs::read(&recipe.file).map_err(io("read", &recipe.file))?;
    h.update(&text);
    for step in &recipe.steps {
        if let Instruction::Copy { sources, .. } = &step.instruction {
            for s in sources {
                let resolved = ctx.resolve(s)?;
                for f in ctx.files_under(&resolved)? {
                    h.update(
                        f.strip_prefix(ctx.root())
                            .unwrap_or(&f)
                            .as_os_str()
                            .as_encoded_bytes(),
                    );
                    h.update(b"\0");
                    let meta = std::fs::symlink_metadata(&f).map_err(io("stat", &f))?;
                    if meta.file_type().is_symlink() {
                        let target = std::fs::read_link(&f).map_err(io("read link", &f))?;
                        h.update(target.as_os_str().as_encoded_bytes());
                    } else {
                        let mut file = std::fs::File::open(&f).map_err(io("open", &f))?;
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            let n = file.read(&mut buf).map_err(io("read", &f))?;
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                        }
                    }
                    h.update(b"\0");
                }
            }
        }
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

/// Makes (once) the debootstrap base, under a lock.
fn ensure_base(
    cfg: &BuildConfig,
    progress: &mut dyn FnMut(&BuildEvent),
) -> Result<PathBuf, BuildError> {
    let dir = cfg.cache_dir.join("base");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let base = dir.join("bookworm-minbase");
    let _lock = lock(&dir.join("lock"))?;
    if base.join(".thaw-base-done").exists() {
        return Ok(base);
    }
    let tmp = dir.join(format!("bookworm-minbase.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut child = Process::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&tmp)
        .arg(&cfg.mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("start debootstrap for", &tmp))?;
    let mut tail: Vec<String> = Vec::new();
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(e) = stderr {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                lines.push(l);
            }
        }
        lines
    });
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            progress(&BuildEvent::Base { line: line.clone() });
            push_tail(&mut tail, line);
        }
    }
    for l in err_thread.join().unwrap_or_default() {
        push_tail(&mut tail, l);
    }
    let status = child.wait().map_err(io("wait for debootstrap of", &tmp))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(BuildError::Base {
            code: status.code(),
            tail: tail.join("\n"),
        });
    }
    // The packages debootstrap downloaded are not part of the image.
    if let Ok(rd) = std::fs::read_dir(tmp.join("var/cache/apt/archives")) {
        for e in rd.filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Build steps resolve names with the host's resolver settings.
    let resolv = tmp.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::copy("/etc/resolv.conf", &resolv).map_err(io("copy resolv.conf into", &resolv))?;
    std::fs::write(tmp.join(".thaw-base-done"), b"").map_err(io("mark", &tmp))?;
    let _ = std::fs::remove_dir_all(&base);
    std::fs::rename(&tmp, &base).map_err(io("rename into", &base))?;
    Ok(base)
}

fn push_tail(tail: &mut Vec<String>, line: String) {
    tail.push(line);
    if tail.len() > TAIL_LINES {
        tail.remove(0);
    }
}

/// Reads a user from the tree's /etc/passwd (never following a symlink).
fn lookup_user(rootfs: &Path, name: &str) -> Result<Option<StepUser>, BuildError> {
    let passwd = rootfs.join("etc/passwd");
    let meta = std::fs::symlink_metadata(&passwd).map_err(io("stat", &passwd))?;
    if !meta.is_file() {
        return Err(BuildError::Io {
            op: "read (not a regular file)",
            path: passwd,
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        });
    }
    let text = std::fs::read_to_string(&passwd).map_err(io("read", &passwd))?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 7 && f[0] == name {
            let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) else {
                continue;
            };
            return Ok(Some(StepUser {
                name: name.into(),
                uid,
                gid,
                home: f[5].into(),
            }));
        }
    }
    Ok(None)
}

#[allow(clippy::too_many_arguments)]
fn build_layer(
    recipe: &Recipe,
    ctx: &Context,
    base: &Path,
    rootfs: &Path,
    hash: &str,
    cfg: &BuildConfig,
    progress: &mut dyn FnMut(&BuildEvent),
) -> Result<(), BuildError> {
    let work = cfg
        .cache_dir
        .join("work")
        .join(format!("{hash}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("create", &work))?;
    let tree = work.join("rootfs");
    let status = Process::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&tree)
        .status()
        .map_err(io("copy the base into", &tree))?;
    if !status.success() {
        return Err(BuildError::Io {
            op: "copy the base into",
            path: tree,
            source: std::io::Error::other(format!("cp exited with {status}")),
        });
    }
    let _ = std::fs::remove_file(tree.join(".thaw-base-done"));
    let total = recipe.steps.len();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut user = StepUser::root();
    let mut workdir = String::from("/");
    let short = &hash[..8.min(hash.len())];
    for (i, step) in recipe.steps.iter().enumerate() {
        let n = i + 1;
        let t = Instant::now();
        progress(&BuildEvent::Step {
            n,
            total,
            text: step.text.clone(),
        });
        let mut tail: Vec<String> = Vec::new();
        let mut run = |argv: Vec<String>,
                       as_user: &StepUser,
                       binds: Vec<(PathBuf, String)>,
                       cwd: &str|
         -> Result<(), BuildError> {
            let spec = StepSpec {
                rootfs: &tree,
                argv,
                env: env.clone(),
                cwd: cwd.to_string(),
                user: as_user.clone(),
                binds,
                network: "host",
                readonly_root: false,
            };
            let id = format!("thaw-build-{short}-{}-{n}", std::process::id());
            let code = run_step(
                &cfg.runsc,
                &work.join(format!("bundle-{n}")),
                &id,
                &spec,
                &mut |line| {
                    progress(&BuildEvent::Output {
                        n,
                        line: line.to_string(),
                    });
                    push_tail(&mut tail, line.to_string());
                },
            )?;
            if code == Some(0) {
                Ok(())
            } else {
                Err(BuildError::StepFailed {
                    n,
                    text: step.text.clone(),
                    code,
                    tail: tail.join("\n"),
                })
            }
        };
        match &step.instruction {
            Instruction::From { .. }
            | Instruction::Limit { .. }
            | Instruction::Start { .. }
            | Instruction::Ready { .. } => {}
            Instruction::Run { command } => run(command.argv(), &user, Vec::new(), &workdir)?,
            Instruction::Env { vars } => {
                for (k, v) in vars {
                    env.retain(|(key, _)| key != k);
                    env.push((k.clone(), v.clone()));
                }
            }
            Instruction::User { name } => {
                if lookup_user(&tree, name)?.is_none() {
                    let argv = vec![
                        "useradd".into(),
                        "--create-home".into(),
                        "--shell".into(),
                        "/bin/bash".into(),
                        name.clone(),
                    ];
                    run(argv, &StepUser::root(), Vec::new(), "/")?;
                }
                user = lookup_user(&tree, name)?.ok_or_else(|| BuildError::StepFailed {
                    n,
                    text: step.text.clone(),
                    code: None,
                    tail: format!("user {name} is missing after useradd"),
                })?;
            }
            Instruction::Workdir { path } => {
                let d = sh_quote(&path.to_string_lossy());
                let script = format!(
                    "[ -d {d} ] || {{ mkdir -p {d} && chown {}:{} {d}; }}",
                    user.uid, user.gid
                );
                run(
                    vec!["/bin/sh".into(), "-c".into(), script],
                    &StepUser::root(),
                    Vec::new(),
                    "/",
                )?;
                workdir = path.to_string_lossy().into_owned();
            }
            Instruction::Copy {
                sources,
                dest,
                dest_is_dir,
            } => {
                let mut inside = Vec::new();
                for s in sources {
                    let resolved = ctx.resolve(s)?;
                    ctx.files_under(&resolved)?;
                    let rel = resolved
                        .strip_prefix(ctx.root())
                        .unwrap_or(&resolved)
                        .to_path_buf();
                    inside.push(format!("{CONTEXT_MOUNT}/{}", rel.display()));
                }
                let d = sh_quote(&dest.to_string_lossy());
                let srcs: Vec<String> = inside.iter().map(|s| sh_quote(s)).collect();
                let owner = format!("{}:{}", user.uid, user.gid);
                let script = if *dest_is_dir {
                    let chowns: Vec<String> = inside
                        .iter()
                        .map(|s| {
                            let base = Path::new(s)
                                .file_name()
                                .map(|b| b.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            format!(
                                "chown -R {owner} {}",
                                sh_quote(&format!("{}/{base}", dest.to_string_lossy()))
                            )
                        })
                        .collect();
                    format!(
                        "mkdir -p {d} && cp -a --no-preserve=ownership {} {d}/ && {}",
                        srcs.join(" "),
                        chowns.join(" && ")
                    )
                } else {
                    format!(
                        "mkdir -p \"$(dirname {d})\" && cp -a --no-preserve=ownership {} {d} && chown -R {owner} {d}",
                        srcs.join(" ")
                    )
                };
                run(
                    vec!["/bin/sh".into(), "-c".into(), script],
                    &StepUser::root(),
                    vec![(ctx.root().to_path_buf(), CONTEXT_MOUNT.into())],
                    "/",
                )?;
                // The mount point runsc made is not part of the image (an
                // empty directory; `remove_dir` never follows a symlink).
                let _ = std::fs::remove_dir(tree.join(CONTEXT_MOUNT.trim_start_matches('/')));
            }
        }
        progress(&BuildEvent::StepDone {
            n,
            elapsed_ms: elapsed_ms(t),
        });
    }
    // The mount point runsc made for the context is not part of the image.
    let _ = std::fs::remove_dir(tree.join(CONTEXT_MOUNT.trim_start_matches('/')));
    // Nothing written by a step may be lost to the page cache.
    nix::unistd::sync();
    std::fs::create_dir_all(rootfs.parent().unwrap_or(Path::new("/")))
        .map_err(io("create", rootfs))?;
    let _ = std::fs::remove_dir_all(rootfs);
    std::fs::rename(&tree, rootfs).map_err(io("freeze into", rootfs))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn write_metadata(cfg: &BuildConfig, t: &Template) -> Result<(), BuildError> {
    let dir = cfg.data_dir.join("templates").join(&t.name);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let path = dir.join("template.json");
    let tmp = dir.join("template.json.tmp");
    let body = serde_json::to_vec_pretty(t).map_err(|e| BuildError::Io {
        op: "encode",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&tmp, body).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename into", &path))
}

/// Size of a tree in bytes (files' apparent sizes, symlinks not followed).
pub fn tree_size(root: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(Result::ok).map(|e| e.path()));
            }
        } else {
            total += meta.len();
        }
    }
    total
}

/// Formats an event as the one line `vmhost template build` prints.
pub fn describe(e: &BuildEvent) -> Option<String> {
    Some(match e {
        BuildEvent::Started {
            template,
            steps,
            hash,
        } => format!("==> {template}: {steps} steps (layer {hash})"),
        BuildEvent::Base { line } => format!("    [base] {line}"),
        BuildEvent::Step { n, total, text } => format!("--> step {n}/{total}: {text}"),
        BuildEvent::Output { line, .. } => format!("    {line}"),
        BuildEvent::StepDone { n, elapsed_ms } => {
            format!("    step {n} done in {:.1}s", *elapsed_ms as f64 / 1e3)
        }
        BuildEvent::Cached { template } => {
            format!("    {template}: unchanged, using the cached layer")
        }
        BuildEvent::Finished {
            template,
            rootfs,
            elapsed_ms,
        } => {
            format!(
                "==> {template}: built in {:.1}s → {}",
                *elapsed_ms as f64 / 1e3,
                rootfs.display()
            )
        }
    })
}
