//! A stand-in for systemd's notify socket (`NOTIFY_SOCKET`): what a daemon sends there
//! (`READY=1`, `FDSTORE=1` with its fds, `FDSTOREREMOVE=1`), one datagram at a time.

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// Receives one datagram: its text and the fds it carried, owned (closed on drop) and
/// close-on-exec. Blocks unless `sock` is non-blocking, where an empty queue is an
/// error (`WouldBlock`). Control data cut short by the kernel gives no fds: the
/// caller's count of them tells.
pub fn recv_notify(sock: &UnixDatagram) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: just received with SCM_RIGHTS: new fds, ours alone.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}
