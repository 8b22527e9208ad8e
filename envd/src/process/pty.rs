//! Pseudo-terminals: opening a pair, the master as an async byte stream, and
//! window-size changes. The only place besides `spawn` with `unsafe` code.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::io::unix::AsyncFd;

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl PtySize {
    fn winsize(self) -> Winsize {
        Winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// A freshly opened pseudo-terminal: the master stays in envd, the slave
/// becomes the child's stdin, stdout and stderr.
pub struct PtyPair {
    /// envd's end.
    pub master: OwnedFd,
    /// The child's end.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of the given size.
pub fn open(size: PtySize) -> std::io::Result<PtyPair> {
    let pty = openpty(Some(&size.winsize()), None)?;
    Ok(PtyPair {
        master: pty.master,
        slave: pty.slave,
    })
}

/// The master end of a pseudo-terminal, readable and writable without
/// blocking a runtime thread.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Wraps a master descriptor (switching it to non-blocking mode).
    pub fn new(master: OwnedFd) -> std::io::Result<PtyMaster> {
        let flags = OFlag::from_bits_truncate(fcntl(master.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(
            master.as_raw_fd(),
            FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
        )?;
        // SAFETY: `master` is an open descriptor owned by the AsyncFd for its
        // whole life; OwnedFd::as_raw_fd always returns that same descriptor.
        let fd = unsafe { AsyncFd::register(master) }?;
        Ok(PtyMaster { fd })
    }

    /// Reads what the terminal printed. `Ok(0)` once every slave descriptor
    /// is closed (Linux reports that as `EIO`, which this maps to end of file).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` as keyboard input.
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Changes the terminal's window size; the foreground process group gets
    /// `SIGWINCH` from the kernel.
    pub fn resize(&self, size: PtySize) -> std::io::Result<()> {
        let ws = size.winsize();
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer,
        // which points at a live, initialised value for the whole call; the
        // descriptor is a pty master owned by `self`.
        let rc = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
