//! File-descriptor passing exactly as libvirt does it: every fd travels in its own
//! `sendmsg` carrying one data byte (0x00) and one SCM_RIGHTS control message with one
//! int. libvirt's receiver rejects several fds in one cmsg, so we never batch them.
//!
//! Also the close-on-exec switches ([`clear_cloexec`], [`set_cloexec`]): which fds a
//! re-exec hands to the next image is the other half of moving descriptors around.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use rustix::io::Errno;
use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

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

/// Linux's `SCM_MAX_FD`: the most fds one `sendmsg` can carry, and so the most that one
/// `recvmsg` can install in our table.
const SCM_MAX_FD: usize = 253;

/// Receives one fd (1 data byte + SCM_RIGHTS), close-on-exec. EOF gives ENOTCONN and a
/// byte without an fd gives EACCES, the errors libvirt reports in those cases.
///
/// A hostile peer may pack up to 253 fds into the carrier (in one or several control
/// messages). The control buffer has room for all of them, so the kernel never has to
/// truncate, and every fd it installs is owned (and closed on drop) before anything is
/// checked: a peer cannot make us leak descriptors until we hit EMFILE for good. More
/// than one fd, or truncated control data (`MSG_CTRUNC`, which cannot happen with this
/// buffer unless the kernel grows a new kind of control message), is a protocol error;
/// the caller closes the connection, and the extra fds are already closed.
pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(m) => break m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // Own every installed fd first; whatever is not returned is closed on the way out.
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("control data truncated after {} fds", fds.len()),
        ));
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
    }
    match fds.len() {
        0 => Err(io::Error::from_raw_os_error(libc::EACCES)),
        1 => fds
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EACCES)),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} fds in one message (libvirt sends one per message)"),
        )),
    }
}

fn update_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // FD_CLOEXEC is the only fd flag Linux has, so no F_GETFD first: one syscall per fd
    // matters at re-exec with thousands of pipes and clients. It also fails (EBADF) on
    // an fd that is not open.
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Lets `fd` survive exec (clears FD_CLOEXEC).
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    update_cloexec(fd, false)
}

/// Closes `fd` on exec (sets FD_CLOEXEC), as is done again after restoring.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    update_cloexec(fd, true)
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

    /// Sends `n` pipe write ends in one `sendmsg` (split over `cmsgs` control messages)
    /// and returns the read ends: each sees EOF only once every copy of its write end,
    /// ours included, is closed.
    fn send_pipes(sock: &UnixStream, n: usize, cmsgs: usize) -> Vec<std::fs::File> {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for _ in 0..n {
            let (r, w) = nix::unistd::pipe().unwrap();
            reads.push(std::fs::File::from(r));
            writes.push(w);
        }
        let raw: Vec<i32> = writes.iter().map(|w| w.as_raw_fd()).collect();
        let chunk = n.div_ceil(cmsgs);
        let msgs: Vec<ControlMessage> = raw.chunks(chunk).map(ControlMessage::ScmRights).collect();
        let iov = [IoSlice::new(&[0u8])];
        sendmsg::<()>(sock.as_raw_fd(), &iov, &msgs, MsgFlags::empty(), None).unwrap();
        reads
    }

    fn all_closed(reads: Vec<std::fs::File>) {
        for mut r in reads {
            let mut b = [0u8; 1];
            // A leaked write end would block this read for ever rather than give EOF.
            r.set_nonblocking_for_test();
            assert_eq!(r.read(&mut b).unwrap(), 0, "a received fd was not closed");
        }
    }

    trait NonBlocking {
        fn set_nonblocking_for_test(&self);
    }
    impl NonBlocking for std::fs::File {
        fn set_nonblocking_for_test(&self) {
            let fl = nix::fcntl::fcntl(self.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
            let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(self.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl)).unwrap();
        }
    }

    /// Three fds in one message overflowed the old one-fd control buffer: the kernel
    /// installed two, flagged MSG_CTRUNC, and both leaked. Now all are owned and closed,
    /// and the message is refused.
    #[test]
    fn several_fds_in_one_message_are_refused_and_closed() {
        for (n, cmsgs) in [(2, 1), (3, 1), (3, 3), (32, 2), (SCM_MAX_FD, 1)] {
            let (a, b) = UnixStream::pair().unwrap();
            let reads = send_pipes(&a, n, cmsgs);
            let e = recv_fd(b.as_fd()).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{n} fds: {e}");
            all_closed(reads);
        }
    }

    /// A good fd after a refused message is still received normally.
    #[test]
    fn one_fd_after_a_refused_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let reads = send_pipes(&a, 5, 1);
        assert!(recv_fd(b.as_fd()).is_err());
        all_closed(reads);
        let reads = send_pipes(&a, 1, 1);
        let got = recv_fd(b.as_fd()).unwrap();
        drop(got);
        all_closed(reads);
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

    #[test]
    fn cloexec_can_be_cleared_and_set() {
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let is_set = |fd| {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
        };
        assert!(is_set(fd));
        clear_cloexec(fd).unwrap();
        assert!(!is_set(fd));
        set_cloexec(fd).unwrap();
        assert!(is_set(fd));
        assert!(clear_cloexec(-1).is_err());
    }
}
