//! The recipe language of runtimes/: a small Dockerfile-like file, one
//! instruction a line.
//!
//! ```text
//! FROM debian:bookworm                  # first, exactly once
//! RUN apt-get install -y python3        # shell form, or ["exec", "form"]
//! ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1   # KEY=VALUE pairs, "quoted" values
//! USER sandbox                          # created with a home; later steps run as it
//! WORKDIR /home/sandbox                 # created; relative to the previous one
//! COPY runner.py ../shared/x /opt/      # sources…, then the destination
//! LIMIT memory=512M pids=256 timeout=60s
//! START python3 /opt/runner.py          # the process kept in the snapshot
//! READY --timeout=30s test -S /run/thaw-runner/runner.sock
//! ```
//!
//! `#` starts a comment line; a line ending in `\` continues on the next.
//! Keywords are case-insensitive. Every error names the file, the line and
//! what was expected; an unknown instruction is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// The only base this release builds.
pub const BASE: &str = "debian:bookworm";

/// A command in shell form (run by `/bin/sh -c`) or exec form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// `RUN echo hi`.
    Shell(String),
    /// `RUN ["echo", "hi"]`.
    Exec(Vec<String>),
}

impl Command {
    /// The argv to execute.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            Command::Exec(v) => v.clone(),
        }
    }
}

/// Resource limits a template asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// CPUs, in thousandths.
    pub cpu_millis: Option<u64>,
    /// Processes.
    pub pids: Option<u64>,
    /// Disk (the writable overlay), bytes.
    pub disk_bytes: Option<u64>,
    /// Wall time of one job.
    pub timeout_ms: Option<u64>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Instruction {
    /// `FROM debian:bookworm`.
    From {
        /// The base.
        image: String,
    },
    /// `RUN …`.
    Run {
        /// The command.
        command: Command,
    },
    /// `ENV K=V…`.
    Env {
        /// The pairs, in order.
        vars: Vec<(String, String)>,
    },
    /// `USER name`.
    User {
        /// The user.
        name: String,
    },
    /// `WORKDIR path` (already resolved against the previous one).
    Workdir {
        /// Absolute path.
        path: PathBuf,
    },
    /// `COPY src… dest`.
    Copy {
        /// Sources, relative to the context root.
        sources: Vec<String>,
        /// Destination (absolute, resolved against WORKDIR).
        dest: PathBuf,
        /// Whether the destination names a directory (ends in `/` or has
        /// several sources).
        dest_is_dir: bool,
    },
    /// `LIMIT k=v…`.
    Limit {
        /// The limits set here.
        limits: Limits,
    },
    /// `START …`.
    Start {
        /// The long-running process.
        command: Command,
    },
    /// `READY [--timeout=D] …`.
    Ready {
        /// Retried until it succeeds.
        command: Command,
        /// How long to keep trying.
        timeout_ms: u64,
    },
}

/// An instruction and where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// The instruction as written (continuations joined).
    pub text: String,
    /// What it means.
    pub instruction: Instruction,
}

/// A parsed recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recipe {
    /// The file it came from.
    pub file: PathBuf,
    /// Every instruction, in order.
    pub steps: Vec<Step>,
}

/// What a recipe adds up to: the template's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Environment of every process.
    pub env: BTreeMap<String, String>,
    /// The last USER (None: root).
    pub user: Option<String>,
    /// The last WORKDIR.
    pub workdir: Option<PathBuf>,
    /// The START command.
    pub start: Option<Command>,
    /// The READY command and its timeout.
    pub ready: Option<(Command, u64)>,
    /// Limits.
    pub limits: Limits,
}

/// A recipe that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RecipeError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What was expected.
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

const KEYWORDS: &str = "FROM, RUN, ENV, USER, WORKDIR, COPY, LIMIT, START, READY";
/// Default READY timeout.
const READY_TIMEOUT_MS: u64 = 30_000;

/// Parses the recipe at `path`.
pub fn parse_file(path: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
        file: path.to_path_buf(),
        line: 0,
        message: format!("cannot read the recipe: {e}"),
    })?;
    parse(path, &text)
}

/// Joins continuation lines: `(first line number, text)`.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(b) => (b.trim_end(), true),
            None => (trimmed, false),
        };
        let entry = pending.get_or_insert_with(|| (n, String::new()));
        if !entry.1.is_empty() && !body.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body);
        if !continues {
            if let Some(done) = pending.take() {
                out.push(done);
            }
        }
    }
    if let Some(done) = pending.take() {
        out.push(done);
    }
    out
}

/// Parses recipe `text`; `file` is used in error messages.
pub fn parse(file: &Path, text: &str) -> Result<Recipe, RecipeError> {
    let err = |line: usize, message: String| RecipeError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let mut steps = Vec::new();
    let mut workdir = PathBuf::from("/");
    let mut seen_start = false;
    let mut seen_ready = false;
    for (line, text) in logical_lines(text) {
        let (keyword, rest) = match text.split_once(char::is_whitespace) {
            Some((k, r)) => (k, r.trim()),
            None => (text.as_str(), ""),
        };
        let kw = keyword.to_ascii_uppercase();
        if steps.is_empty() && kw != "FROM" {
            return Err(err(
                line,
                format!("expected FROM {BASE} as the first instruction, found {keyword}"),
            ));
        }
        let need = |what: &str| -> Result<(), RecipeError> {
            if rest.is_empty() {
                Err(err(line, format!("{kw} needs {what}")))
            } else {
                Ok(())
            }
        };
        let instruction = match kw.as_str() {
            "FROM" => {
                if !steps.is_empty() {
                    return Err(err(
                        line,
                        "FROM may appear only once, as the first instruction".into(),
                    ));
                }
                if rest != BASE {
                    return Err(err(line, format!("expected FROM {BASE} (the only base this release builds), found {rest:?}")));
                }
                Instruction::From { image: rest.into() }
            }
            "RUN" => {
                need("a command")?;
                Instruction::Run {
                    command: command(rest).map_err(|m| err(line, m))?,
                }
            }
            "ENV" => {
                need("KEY=VALUE pairs")?;
                Instruction::Env {
                    vars: env_pairs(rest).map_err(|m| err(line, m))?,
                }
            }
            "USER" => {
                need("a user name")?;
                if !valid_user(rest) {
                    return Err(err(line, format!("expected a user name of [a-z_][a-z0-9_-]* (at most 32), found {rest:?}")));
                }
                Instruction::User { name: rest.into() }
            }
            "WORKDIR" => {
                need("a directory")?;
                let p = normalize(&workdir.join(unquote(rest)));
                workdir = p.clone();
                Instruction::Workdir { path: p }
            }
            "COPY" => {
                need("sources and a destination")?;
                let words = words(rest).map_err(|m| err(line, m))?;
                if words.len() < 2 {
                    return Err(err(
                        line,
                        "COPY needs at least one source and a destination".into(),
                    ));
                }
                let (dest, sources) = words
                    .split_last()
                    .map(|(d, s)| (d.clone(), s.to_vec()))
                    .unwrap_or_default();
                for s in &sources {
                    if s.is_empty() || Path::new(s).is_absolute() {
                        return Err(err(
                            line,
                            format!(
                                "COPY source {s:?} must be a path relative to the runtime folder"
                            ),
                        ));
                    }
                }
                let dest_is_dir = dest.ends_with('/') || sources.len() > 1;
                Instruction::Copy {
                    sources,
                    dest: normalize(&workdir.join(&dest)),
                    dest_is_dir,
                }
            }
            "LIMIT" => {
                need("limits such as memory=512M")?;
                Instruction::Limit {
                    limits: limits(rest).map_err(|m| err(line, m))?,
                }
            }
            "START" => {
                need("a command")?;
                if seen_start {
                    return Err(err(line, "START may appear only once".into()));
                }
                seen_start = true;
                Instruction::Start {
                    command: command(rest).map_err(|m| err(line, m))?,
                }
            }
            "READY" => {
                need("a command")?;
                if !seen_start {
                    return Err(err(
                        line,
                        "READY must come after START (it checks the started process)".into(),
                    ));
                }
                if seen_ready {
                    return Err(err(line, "READY may appear only once".into()));
                }
                seen_ready = true;
                let (timeout_ms, cmd) = match rest.strip_prefix("--timeout=") {
                    Some(r) => {
                        let (t, c) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
                        let ms = duration_ms(t)
                            .map_err(|m| err(line, format!("READY --timeout: {m}")))?;
                        (ms, c.trim())
                    }
                    None => (READY_TIMEOUT_MS, rest),
                };
                if cmd.is_empty() {
                    return Err(err(line, "READY needs a command after its options".into()));
                }
                Instruction::Ready {
                    command: command(cmd).map_err(|m| err(line, m))?,
                    timeout_ms,
                }
            }
            _ => {
                return Err(err(
                    line,
                    format!("unknown instruction {keyword:?} (expected one of {KEYWORDS})"),
                ));
            }
        };
        steps.push(Step {
            line,
            text: text.clone(),
            instruction,
        });
    }
    if steps.is_empty() {
        return Err(err(1, format!("empty recipe: expected FROM {BASE}")));
    }
    Ok(Recipe {
        file: file.to_path_buf(),
        steps,
    })
}

impl Recipe {
    /// The template metadata the recipe adds up to.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for step in &self.steps {
            match &step.instruction {
                Instruction::Env { vars } => {
                    for (k, v) in vars {
                        s.env.insert(k.clone(), v.clone());
                    }
                }
                Instruction::User { name } => s.user = Some(name.clone()),
                Instruction::Workdir { path } => s.workdir = Some(path.clone()),
                Instruction::Start { command } => s.start = Some(command.clone()),
                Instruction::Ready {
                    command,
                    timeout_ms,
                } => s.ready = Some((command.clone(), *timeout_ms)),
                Instruction::Limit { limits } => {
                    let l = &mut s.limits;
                    l.memory_bytes = limits.memory_bytes.or(l.memory_bytes);
                    l.cpu_millis = limits.cpu_millis.or(l.cpu_millis);
                    l.pids = limits.pids.or(l.pids);
                    l.disk_bytes = limits.disk_bytes.or(l.disk_bytes);
                    l.timeout_ms = limits.timeout_ms.or(l.timeout_ms);
                }
                Instruction::From { .. } | Instruction::Run { .. } | Instruction::Copy { .. } => {}
            }
        }
        s
    }
}

fn command(rest: &str) -> Result<Command, String> {
    if rest.starts_with('[') {
        let v: Vec<String> = serde_json::from_str(rest)
            .map_err(|e| format!("expected a JSON array of strings (exec form): {e}"))?;
        if v.is_empty() || v[0].is_empty() {
            return Err("the exec form needs a program".into());
        }
        Ok(Command::Exec(v))
    } else {
        Ok(Command::Shell(rest.into()))
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

/// Splits on whitespace, honouring double quotes and backslash escapes; a
/// JSON array is taken as is.
fn words(rest: &str) -> Result<Vec<String>, String> {
    if rest.starts_with('[') {
        return serde_json::from_str(rest)
            .map_err(|e| format!("expected a JSON array of strings: {e}"));
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has = false;
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has = true;
            }
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    has = true;
                }
            }
            c if c.is_whitespace() && !in_quotes => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if in_quotes {
        return Err("unterminated double quote".into());
    }
    if has {
        out.push(cur);
    }
    Ok(out)
}

fn env_pairs(rest: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for w in words(rest)? {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!("expected KEY=VALUE, found {w:?}"));
        };
        let ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "expected a variable name of [A-Za-z_][A-Za-z0-9_]*, found {k:?}"
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn valid_user(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Parses sizes like `512M`, `1G`, `4096` (bytes; K/M/G/T are powers of 1024).
pub fn size_bytes(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("expected a size such as 512M, found {s:?}"))
}

/// Parses durations like `30s`, `500ms`, `2m`.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let parsed = if let Some(n) = s.strip_suffix("ms") {
        n.parse::<u64>().ok()
    } else if let Some(n) = s.strip_suffix('s') {
        n.parse::<u64>().ok().and_then(|n| n.checked_mul(1000))
    } else if let Some(n) = s.strip_suffix('m') {
        n.parse::<u64>().ok().and_then(|n| n.checked_mul(60_000))
    } else {
        None
    };
    parsed
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("expected a duration such as 30s, 500ms or 2m, found {s:?}"))
}

fn limits(rest: &str) -> Result<Limits, String> {
    let mut l = Limits::default();
    for w in words(rest)? {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!("expected KEY=VALUE, found {w:?}"));
        };
        match k {
            "memory" => l.memory_bytes = Some(size_bytes(v)?),
            "disk" => l.disk_bytes = Some(size_bytes(v)?),
            "pids" => {
                l.pids = Some(
                    v.parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("expected a number of processes, found {v:?}"))?,
                );
            }
            "cpu" => {
                let cpus: f64 = v.parse().map_err(|_| {
                    format!("expected a number of CPUs such as 1 or 0.5, found {v:?}")
                })?;
                if !(cpus > 0.0 && cpus <= 1024.0) {
                    return Err(format!(
                        "expected a number of CPUs such as 1 or 0.5, found {v:?}"
                    ));
                }
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                // checked range above.
                let millis = (cpus * 1000.0).round() as u64;
                l.cpu_millis = Some(millis);
            }
            "timeout" => l.timeout_ms = Some(duration_ms(v)?),
            other => {
                return Err(format!(
                    "unknown limit {other:?} (expected memory, cpu, pids, disk, timeout)"
                ))
            }
        }
    }
    Ok(l)
}

/// Removes `.` and `..` lexically (never above `/`).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// A READY default, exposed for the builder.
pub fn default_ready_timeout() -> Duration {
    Duration::from_millis(READY_TIMEOUT_MS)
}
