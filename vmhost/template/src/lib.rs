//! Templates of thaw: the recipe language of runtimes/ (`recipe`) and the
//! build context COPY reads from (`context`). The builder that turns a
//! recipe into a root filesystem (debootstrap, RUN steps inside runsc) is
//! the next part of this crate and is not built yet.

pub mod context;
pub mod recipe;
