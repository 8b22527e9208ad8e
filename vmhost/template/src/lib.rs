//! Templates of thaw: the recipe language of runtimes/ (`recipe`), the
//! build context COPY reads from (`context`), the runsc sandbox a build step
//! runs in (`sandbox`), and the builder that turns a recipe into a cached,
//! read-only root filesystem plus metadata (`builder`).

pub mod builder;
pub mod context;
pub mod recipe;
pub mod sandbox;
