//! File-descriptor passing exactly as libvirt does it: every fd travels in its own
//! `sendmsg` carrying one data byte (0x00) and one SCM_RIGHTS control message with one
//! int. libvirt's receiver rejects several fds in one cmsg, so we never batch them.

use nix::cmsg_space;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Sends one fd on a (non-blocking) unix stream socket. `WouldBlock` means: wait for
/// writability and call again; nothing was sent.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&[0u8])];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "fd not sent")),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one fd (1 data byte + SCM_RIGHTS), close-on-exec. EOF gives ENOTCONN and a
/// byte without an fd gives EACCES, the errors libvirt reports in those cases.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut cbuf = cmsg_space!(RawFd);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        let res = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cbuf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let msg = match res {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
        }
        let mut got: Option<OwnedFd> = None;
        let mut extra = false;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed this fd in our table for us;
                    // nothing else owns it, so wrapping it makes sure it is closed.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if got.is_none() {
                        got = Some(owned);
                    } else {
                        extra = true; // dropped (closed) here
                    }
                }
            }
        }
        if extra {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more than one fd in one message",
            ));
        }
        return got.ok_or_else(|| io::Error::from_raw_os_error(libc::EACCES));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn one_fd_per_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, mut w) = UnixStream::pair().unwrap();
        send_fd(a.as_fd(), w.as_fd()).unwrap();
        let got = recv_fd(b.as_fd()).unwrap();
        let mut got = UnixStream::from(got);
        got.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        w.write_all(b"x").unwrap();
    }

    #[test]
    fn byte_without_fd_is_eacces() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0]).unwrap();
        let e = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        drop(a);
        let e = recv_fd(b.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    }
}
