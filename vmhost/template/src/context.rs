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

impl Context {
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
