//! The build context of a recipe: where COPY sources come from, and the
//! rule that none may leave it. Sources are relative to the runtime's own
//! folder; the context root is the folder holding all runtimes, so a
//! runtime may share a file with another (`COPY ../python/runner.py …`),
//! but nothing outside the root is reachable: not by `..`, not by an
//! absolute path, not through a symlink.

use std::path::{Component, Path, PathBuf};

/// Why a COPY source was refused.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The source is absolute.
    #[error("COPY source {0:?} must be relative to the runtime folder")]
    Absolute(String),
    /// The source leaves the context by `..`.
    #[error("COPY source {0:?} leaves the build context")]
    Escapes(String),
    /// The source resolves (through a symlink) outside the context.
    #[error("COPY source {source_path:?} resolves through a symlink to {target}, outside the build context")]
    SymlinkEscapes {
        /// The source as written.
        source_path: String,
        /// Where it leads.
        target: PathBuf,
    },
    /// The source does not exist.
    #[error("COPY source {source_path:?} does not exist ({path})")]
    Missing {
        /// The source as written.
        source_path: String,
        /// The path looked for.
        path: PathBuf,
    },
    /// An archive entry would land outside the context, or is of a kind
    /// an upload may not carry (device, hard link).
    #[error("archive entry {name:?} refused: {why}")]
    ArchiveEntry {
        /// The entry's name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// The archive cannot be read.
    #[error("archive {path}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The context root is unusable.
    #[error("build context {path}")]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A build context: the root every source must stay in, and the folder
/// sources are relative to.
#[derive(Debug, Clone)]
pub struct Context {
    root: PathBuf,
    base: PathBuf,
}

/// Checks an archive entry's name: relative, no `..`, not empty.
fn entry_path(name: &str) -> Result<PathBuf, ContextError> {
    let refuse = |why| ContextError::ArchiveEntry {
        name: name.into(),
        why,
    };
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(refuse("it climbs out with `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("it is an absolute path"))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(refuse("it has no name"));
    }
    Ok(out)
}

/// Checks that a symlink at `entry` pointing at `target` stays inside.
fn link_stays_inside(name: &str, entry: &Path, target: &Path) -> Result<(), ContextError> {
    let refuse = |why| ContextError::ArchiveEntry {
        name: name.into(),
        why,
    };
    if target.is_absolute() {
        return Err(refuse("it is a symlink to an absolute path"));
    }
    let mut depth: i64 = entry.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(refuse("it is a symlink leading out of the archive"));
        }
    }
    Ok(())
}

/// What kind of archive a file is, by its first bytes.
fn archive_kind(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        "tar.gz"
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        "zip"
    } else {
        "tar"
    }
}

impl Context {
    /// A context made from an uploaded tar, tar.gz or zip archive, unpacked
    /// into the empty directory `into`. Entries climbing out (`..`,
    /// absolute names, symlinks leading out), hard links and devices are
    /// refused before anything is written for them.
    pub fn from_archive(archive: &Path, into: &Path) -> Result<Context, ContextError> {
        let arch = |source| ContextError::Archive {
            path: archive.to_path_buf(),
            source,
        };
        let mut head = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(archive).map_err(arch)?;
            let n = f.read(&mut head).map_err(arch)?;
            if n < 2 {
                return Err(arch(std::io::Error::from(
                    std::io::ErrorKind::UnexpectedEof,
                )));
            }
        }
        std::fs::create_dir_all(into).map_err(|source| ContextError::Root {
            path: into.to_path_buf(),
            source,
        })?;
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ContextError::Root { path, source }
        };
        match archive_kind(&head) {
            "zip" => {
                let f = std::fs::File::open(archive).map_err(arch)?;
                let mut z = zip::ZipArchive::new(f).map_err(|e| arch(std::io::Error::other(e)))?;
                for i in 0..z.len() {
                    let mut entry = z.by_index(i).map_err(|e| arch(std::io::Error::other(e)))?;
                    let name = entry.name().to_string();
                    let rel = entry_path(&name)?;
                    let dest = into.join(&rel);
                    if entry.is_symlink() {
                        return Err(ContextError::ArchiveEntry {
                            name,
                            why: "zip symlinks are not accepted",
                        });
                    }
                    if entry.is_dir() {
                        std::fs::create_dir_all(&dest).map_err(write_err(&dest))?;
                        continue;
                    }
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
                    }
                    let mut out = std::fs::File::create(&dest).map_err(write_err(&dest))?;
                    std::io::copy(&mut entry, &mut out).map_err(arch)?;
                    if let Some(mode) = entry.unix_mode() {
                        use std::os::unix::fs::PermissionsExt;
                        let _ = std::fs::set_permissions(
                            &dest,
                            std::fs::Permissions::from_mode(mode & 0o755),
                        );
                    }
                }
            }
            kind => {
                let f = std::fs::File::open(archive).map_err(arch)?;
                let reader: Box<dyn std::io::Read> = if kind == "tar.gz" {
                    Box::new(flate2::read::GzDecoder::new(f))
                } else {
                    Box::new(f)
                };
                let mut t = tar::Archive::new(reader);
                for entry in t.entries().map_err(arch)? {
                    let mut entry = entry.map_err(arch)?;
                    let name = entry.path().map_err(arch)?.to_string_lossy().into_owned();
                    let rel = entry_path(&name)?;
                    let dest = into.join(&rel);
                    let kind = entry.header().entry_type();
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent).map_err(write_err(parent))?;
                    }
                    if kind.is_dir() {
                        std::fs::create_dir_all(&dest).map_err(write_err(&dest))?;
                    } else if kind.is_symlink() {
                        let target = entry
                            .link_name()
                            .map_err(arch)?
                            .ok_or(ContextError::ArchiveEntry {
                                name: name.clone(),
                                why: "a symlink without a target",
                            })?
                            .into_owned();
                        link_stays_inside(&name, &rel, &target)?;
                        std::os::unix::fs::symlink(&target, &dest).map_err(write_err(&dest))?;
                    } else if kind.is_file() {
                        let mut out = std::fs::File::create(&dest).map_err(write_err(&dest))?;
                        std::io::copy(&mut entry, &mut out).map_err(arch)?;
                        if let Ok(mode) = entry.header().mode() {
                            use std::os::unix::fs::PermissionsExt;
                            let _ = std::fs::set_permissions(
                                &dest,
                                std::fs::Permissions::from_mode(mode & 0o755),
                            );
                        }
                    } else {
                        return Err(ContextError::ArchiveEntry {
                            name,
                            why: "only files, directories and symlinks are accepted",
                        });
                    }
                }
            }
        }
        Context::new(into, into)
    }

    /// A context rooted at `root`, with sources relative to `base` (inside it).
    pub fn new(root: &Path, base: &Path) -> Result<Context, ContextError> {
        let canon = |p: &Path| {
            p.canonicalize().map_err(|source| ContextError::Root {
                path: p.to_path_buf(),
                source,
            })
        };
        let root = canon(root)?;
        let base = canon(base)?;
        if !base.starts_with(&root) {
            return Err(ContextError::Root {
                path: base,
                source: std::io::Error::other("the runtime folder is outside the context root"),
            });
        }
        Ok(Context { root, base })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves one COPY source to a real path inside the context.
    pub fn resolve(&self, source: &str) -> Result<PathBuf, ContextError> {
        let rel = Path::new(source);
        if rel.is_absolute() {
            return Err(ContextError::Absolute(source.into()));
        }
        // Lexically first: `..` may not climb above the root.
        let mut path = self.base.clone();
        for c in rel.components() {
            match c {
                Component::ParentDir => {
                    if !path.pop() || !path.starts_with(&self.root) {
                        return Err(ContextError::Escapes(source.into()));
                    }
                }
                Component::Normal(n) => path.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(ContextError::Absolute(source.into()));
                }
            }
        }
        if !path.starts_with(&self.root) {
            return Err(ContextError::Escapes(source.into()));
        }
        // Then for real: symlinks anywhere on the way are followed.
        let real = path.canonicalize().map_err(|_| ContextError::Missing {
            source_path: source.into(),
            path: path.clone(),
        })?;
        if !real.starts_with(&self.root) {
            return Err(ContextError::SymlinkEscapes {
                source_path: source.into(),
                target: real,
            });
        }
        Ok(real)
    }

    /// Every file under a resolved source (itself, for a file), refusing
    /// symlinks inside a copied directory that lead out of the context.
    pub fn files_under(&self, resolved: &Path) -> Result<Vec<PathBuf>, ContextError> {
        let mut out = Vec::new();
        let mut stack = vec![resolved.to_path_buf()];
        while let Some(p) = stack.pop() {
            let meta = std::fs::symlink_metadata(&p).map_err(|_| ContextError::Missing {
                source_path: p.display().to_string(),
                path: p.clone(),
            })?;
            if meta.file_type().is_symlink() {
                let real = p.canonicalize().map_err(|_| ContextError::Missing {
                    source_path: p.display().to_string(),
                    path: p.clone(),
                })?;
                if !real.starts_with(&self.root) {
                    return Err(ContextError::SymlinkEscapes {
                        source_path: p.display().to_string(),
                        target: real,
                    });
                }
                out.push(p);
            } else if meta.is_dir() {
                let mut children: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(|source| ContextError::Root {
                        path: p.clone(),
                        source,
                    })?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .collect();
                children.sort();
                stack.extend(children.into_iter().rev());
            } else {
                out.push(p);
            }
        }
        Ok(out)
    }
}
