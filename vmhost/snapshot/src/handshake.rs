//! Firecracker's UFFD handshake, both sides: on the page server's Unix
//! socket, one message carries the guest memory regions as JSON and the
//! userfaultfd descriptor as `SCM_RIGHTS`. The page server and the test
//! harness share these types, so the two sides cannot drift apart.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::format::PAGE_SIZE;

/// Largest handshake message accepted.
const MAX_MESSAGE: usize = 64 << 10;

/// One guest memory region, as Firecracker describes it: guest memory of
/// `size` bytes at host address `base_host_virt_addr`, whose contents are at
/// `offset` in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address the region is mapped at.
    pub base_host_virt_addr: u64,
    /// Region size in bytes.
    pub size: u64,
    /// Offset of the region's contents in the memory image.
    pub offset: u64,
    /// Page size in bytes (Firecracker ≥ 1.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// The same, under its older name (which also holds bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl GuestRegionUffdMapping {
    /// The region's page size in bytes (4 KiB when unstated).
    pub fn page_bytes(&self) -> u64 {
        self.page_size
            .or(self.page_size_kib)
            .unwrap_or(PAGE_SIZE as u64)
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("handshake socket")]
    Socket(#[source] std::io::Error),
    /// The peer closed the socket before sending anything.
    #[error("the peer closed the socket before the handshake")]
    Closed,
    /// No descriptor came with the message.
    #[error("the handshake carried no userfaultfd descriptor")]
    NoDescriptor,
    /// The JSON is not a list of regions.
    #[error("the handshake's region list is not valid JSON")]
    Json(#[source] serde_json::Error),
}

/// Sends the regions and the userfaultfd (Firecracker's side).
pub fn send(
    stream: &UnixStream,
    regions: &[GuestRegionUffdMapping],
    uffd: RawFd,
) -> Result<(), HandshakeError> {
    let body = serde_json::to_vec(regions).map_err(HandshakeError::Json)?;
    let fds = [uffd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&body)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| HandshakeError::Socket(e.into()))?;
    Ok(())
}

/// Receives the regions and the userfaultfd (the page server's side).
pub fn recv(stream: &UnixStream) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd), HandshakeError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| HandshakeError::Socket(e.into()))?;
    let len = msg.bytes;
    let mut fd = None;
    for c in msg.cmsgs().map_err(|e| HandshakeError::Socket(e.into()))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed `raw` in this process
                // for this message; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    if len == 0 && fd.is_none() {
        return Err(HandshakeError::Closed);
    }
    let fd = fd.ok_or(HandshakeError::NoDescriptor)?;
    let regions = serde_json::from_slice(&buf[..len]).map_err(HandshakeError::Json)?;
    Ok((regions, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_descriptor_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let regions = vec![GuestRegionUffdMapping {
            base_host_virt_addr: 0x7000_0000,
            size: 1 << 20,
            offset: 0,
            page_size: Some(4096),
            page_size_kib: Some(4096),
        }];
        send(&a, &regions, file.as_raw_fd()).unwrap();
        let (got, fd) = recv(&b).unwrap();
        assert_eq!(got, regions);
        assert_ne!(fd.as_raw_fd(), file.as_raw_fd());
        // Older Firecracker sends only page_size_kib; both parse.
        let old: Vec<GuestRegionUffdMapping> = serde_json::from_str(
            r#"[{"base_host_virt_addr":1,"size":4096,"offset":0,"page_size_kib":4096}]"#,
        )
        .unwrap();
        assert_eq!(old[0].page_bytes(), 4096);
        drop(a);
        assert!(matches!(recv(&b), Err(HandshakeError::Closed)));
    }
}
