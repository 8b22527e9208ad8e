//! Users: a name from a request resolved to the uid, gid, supplementary
//! groups and home directory a process or file operation runs with.

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User};

use crate::error::ApiError;

/// Who a process runs as, or who a file operation acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
}

impl Identity {
    /// The identity envd itself runs with (`root` inside a sandbox).
    pub fn current() -> Identity {
        let uid = Uid::effective();
        match User::from_uid(uid) {
            Ok(Some(user)) => Identity::of(&user),
            _ => Identity {
                name: uid.to_string(),
                uid: uid.as_raw(),
                gid: Gid::effective().as_raw(),
                groups: vec![Gid::effective().as_raw()],
                home: PathBuf::from("/"),
                shell: PathBuf::from("/bin/sh"),
            },
        }
    }

    /// Looks a user up by name (or by numeric uid). An unknown user is a 400
    /// naming the field `user`.
    pub fn lookup(name: &str) -> Result<Identity, ApiError> {
        let found = if let Ok(uid) = name.parse::<u32>() {
            User::from_uid(Uid::from_raw(uid))
        } else {
            User::from_name(name)
        };
        match found {
            Ok(Some(user)) => Ok(Identity::of(&user)),
            Ok(None) => Err(ApiError::bad_request(
                "unknown_user",
                format!("user: no user named {name:?} in this sandbox"),
            )),
            Err(e) => Err(ApiError::internal(format!("looking up user {name:?}: {e}"))),
        }
    }

    fn of(user: &User) -> Identity {
        let groups = CString::new(user.name.as_bytes())
            .ok()
            .and_then(|c| nix::unistd::getgrouplist(&c, user.gid).ok())
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![user.gid.as_raw()]);
        Identity {
            name: user.name.clone(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir.clone(),
            shell: user.shell.clone(),
        }
    }

    /// Whether this is the superuser.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_by_name_and_number() {
        let by_name = Identity::lookup("root").unwrap();
        assert_eq!(by_name.uid, 0);
        assert_eq!(by_name.gid, 0);
        assert_eq!(Identity::lookup("0").unwrap().name, "root");
    }

    #[test]
    fn unknown_user_is_bad_request() {
        let err = Identity::lookup("no-such-user-thaw").unwrap_err();
        assert_eq!(err.code, "unknown_user");
    }
}
