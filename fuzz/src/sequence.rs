//! Whole servers in this process, driven by a sequence of client operations decoded
//! from the fuzz input: a virtlogd server (log program), a virtlockd server (lock
//! program with its client hooks) and an admin server whose stand-in daemon lists all
//! three. Clients are socketpairs adopted by the servers, as after a re-exec.
//!
//! Input format (every field big-endian; a missing field ends the sequence):
//!
//! ```text
//! input := max_size_sel:u8 max_backups:u8 op*
//! op    := 0 kind:u8                          connect (kind % 3: log, lock, admin)
//!        | 1 slot:u8                          hang up
//!        | 2 slot:u8 n:u16 bytes[n]           send one frame: header [nfds] payload
//!                                             (the length word is added; fds are
//!                                             attached as the header announces)
//!        | 3 slot:u8 word:u32 n:u16 bytes[n]  send a length word and at most the
//!                                             start of its frame, then hang up
//!        | 4 pipe:u8 n:u16 bytes[n]           write to a log pipe a reply gave us
//!        | 5 pipe:u8                          close that pipe
//!        | 6 n:u8                             let the servers run (n yields)
//! ```
//! (the op byte is taken modulo 7; `slot` and `pipe` modulo the number open).
//!
//! Paths never leave the scratch directory: before a log or lock frame is sent, its
//! arguments are decoded with the programs' own decoders (the server's decode gives the
//! same result, so an undecodable frame touches nothing) and every path is rewritten to
//! its last two components under the scratch directory. An owner pid of 1 in REGISTER
//! is replaced by this process's pid, which is what a real QEMU's lock connection looks
//! like (peer pid == owner pid), so the release-on-close path runs too; the SIGTERM
//! that 9.0's rule then sends to the owner is ignored here.
//!
//! Invariants checked:
//! * nothing panics (libFuzzer aborts on a panic in any thread or task);
//! * every call gets exactly one reply, with its serial, prog, vers and proc, status
//!   OK or ERROR (an ERROR payload decodes as libvirt's error), before the keepalive
//!   PONG the harness sends behind it; non-calls get nothing; a connection is closed
//!   only after a protocol violation or an admin close;
//! * a broken or truncated frame gets no reply and a close;
//! * after every operation the lock table and the kernel agree: each held resource
//!   has this process's byte-0 POSIX lock of its kind on its inode (fdinfo),
//!   and this process holds no other lock; every resource has an owner;
//! * once every client has hung up, the servers drain, and once the daemons are
//!   dropped no lock and no descriptor is left behind.

use crate::admin_target::FakeDaemon;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokio::net::UnixStream;
use tokio::sync::watch;
use vh_common::admin::{self, AdminProgram, AdminTarget, ADMIN_PROGRAM};
use vh_common::connection::{self, FrameReader, Outbox, ReadEnd};
use vh_common::error::RpcError;
use vh_common::protocol::{self, msg_type, status, Header};
use vh_common::server::{ClientLimits, NoHooks, PendingIo, Private, Program, RunState, Server};
use vh_common::xdr::{Decoder, Encoder};
use virtlockd::lockspace::LockSpaces;
use virtlockd::program::{LockClient, LockHooks, LockProgram};
use virtlockd::protocol as lockp;
use virtlockd::table::LockTable;
use virtlogd::handler::{Limits, LogHandler};
use virtlogd::program::LogProgram;
use virtlogd::protocol as logp;

const MAX_OPS: usize = 64;
const MAX_CONNS: usize = 8;

/// Process-wide set-up, once: the scratch directory and the signal dispositions.
fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // SAFETY: setting a disposition to SIG_IGN has no preconditions. SIGPIPE: a
        // write to a connection the server closed must be an error, not death.
        // SIGTERM: what virtlockd sends an owner whose connection closed (us).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
        // tmpfs when there is one: a run creates and deletes many small files, and a
        // journaled disk makes that the bulk of the run's time.
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let root = parent.join(format!("vh-fuzz-seq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        if let Err(e) = std::fs::create_dir_all(&root) {
            panic!(
                "cannot create the scratch directory {}: {e}",
                root.display()
            );
        }
        root
    })
}

/// Reads the fuzz input field by field.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<usize> {
        Some(usize::from(self.u8()?) << 8 | usize::from(self.u8()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(a)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Log,
    Lock,
    Admin,
}

struct Conn {
    kind: Kind,
    stream: UnixStream,
}

/// `p` confined to `base`: its last two non-trivial components under `base`; "" stays
/// "" (the default lockspace, or an empty log path).
fn confine(base: &Path, p: &[u8]) -> Vec<u8> {
    if p.is_empty() {
        return Vec::new();
    }
    let comps: Vec<&[u8]> = p
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b"." && *c != b"..")
        .collect();
    let mut out = base.as_os_str().as_bytes().to_vec();
    for c in &comps[comps.len().saturating_sub(2)..] {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    out
}

fn confine_str(base: &Path, p: &str) -> String {
    String::from_utf8_lossy(&confine(base, p.as_bytes())).into_owned()
}

/// The payload with every path confined (see the module docs), or unchanged when the
/// arguments do not decode (then the server touches nothing either).
fn rewrite_payload(base: &Path, h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut d = Decoder::new(payload);
    let mut e = Encoder::new();
    let ok = match (h.prog, h.vers) {
        (logp::PROGRAM, logp::VERSION) => match h.proc_ {
            logp::proc_::DOMAIN_OPEN_LOG_FILE => logp::OpenLogFileArgs::decode(&mut d)
                .map(|mut a| {
                    a.path = confine(base, &a.path);
                    a.encode(&mut e)
                })
                .is_ok(),
            logp::proc_::DOMAIN_GET_LOG_FILE_POSITION => {
                logp::GetLogFilePositionArgs::decode(&mut d)
                    .map(|mut a| {
                        a.path = confine(base, &a.path);
                        a.encode(&mut e)
                    })
                    .is_ok()
            }
            logp::proc_::DOMAIN_READ_LOG_FILE => logp::ReadLogFileArgs::decode(&mut d)
                .map(|mut a| {
                    a.path = confine(base, &a.path);
                    a.encode(&mut e)
                })
                .is_ok(),
            logp::proc_::DOMAIN_APPEND_LOG_FILE => logp::AppendLogFileArgs::decode(&mut d)
                .map(|mut a| {
                    a.path = confine(base, &a.path);
                    a.encode(&mut e)
                })
                .is_ok(),
            _ => false,
        },
        (lockp::PROGRAM, lockp::VERSION) => match h.proc_ {
            lockp::proc_::REGISTER => lockp::RegisterArgs::decode(&mut d)
                .map(|mut a| {
                    if a.owner.pid == 1 {
                        a.owner.pid = std::process::id();
                    }
                    a.encode(&mut e)
                })
                .is_ok(),
            lockp::proc_::NEW => lockp::NewArgs::decode(&mut d)
                .map(|mut a| {
                    a.path = confine_str(base, &a.path);
                    a.encode(&mut e)
                })
                .is_ok(),
            lockp::proc_::CREATE_RESOURCE
            | lockp::proc_::DELETE_RESOURCE
            | lockp::proc_::ACQUIRE_RESOURCE
            | lockp::proc_::RELEASE_RESOURCE => lockp::ResourceArgs::decode(&mut d)
                .map(|mut a| {
                    // In the default lockspace the name is the path.
                    if a.path.is_empty() {
                        a.name = confine_str(base, &a.name);
                    } else {
                        a.path = confine_str(base, &a.path);
                    }
                    a.encode(&mut e)
                })
                .is_ok(),
            lockp::proc_::CREATE_LOCKSPACE => d
                .string_lossless(lockp::STRING_MAX)
                .map(|p| {
                    let p = String::from_utf8_lossy(&p).into_owned();
                    e.string(&confine_str(base, &p));
                })
                .is_ok(),
            _ => false,
        },
        _ => false,
    };
    if !ok {
        return payload.to_vec();
    }
    let mut out = e.into_inner();
    out.extend_from_slice(&payload[d.position()..]);
    out
}

/// (major, minor, inode, is_write) of every byte-0 lock this process holds: POSIX locks
/// (leases inherited from libvirt's daemon) and open-file-description locks (ours).
///
/// Read from `/proc/self/fdinfo/*`, whose `lock:` lines are the locks this process
/// holds on each open file, rather than from `/proc/locks`: that file lists every lock
/// on the machine, and the kernel builds each page-sized read of it from the live list,
/// so while other processes lock and unlock it shows entries twice or not at all. Both
/// kinds need an open descriptor, so scanning ours finds them all (an OFD lock shows on
/// the descriptor that owns it, with pid -1).
fn kernel_locks() -> Vec<(u32, u32, u64, bool)> {
    let me = std::process::id().to_string();
    let mut out = std::collections::BTreeSet::new();
    let dir = match std::fs::read_dir("/proc/self/fdinfo") {
        Ok(d) => d,
        Err(e) => panic!("cannot list /proc/self/fdinfo: {e}"),
    };
    for entry in dir.flatten() {
        // Descriptors come and go (this very listing's): a vanished one is fine.
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            let Some(lock) = line.strip_prefix("lock:") else {
                continue;
            };
            // "N: POSIX  ADVISORY  WRITE pid maj:min:ino start end", or OFDLCK with pid -1
            let f: Vec<&str> = lock.split_whitespace().collect();
            if f.len() < 8 || (f[1] != "POSIX" && f[1] != "OFDLCK") {
                continue;
            }
            if f[1] == "POSIX" {
                assert_eq!(f[4], me, "a lock of another process in our fdinfo: {line}");
            }
            let dev: Vec<&str> = f[5].split(':').collect();
            let (Some(maj), Some(min), Some(ino)) = (
                dev.first().and_then(|d| u32::from_str_radix(d, 16).ok()),
                dev.get(1).and_then(|d| u32::from_str_radix(d, 16).ok()),
                dev.get(2).and_then(|d| d.parse::<u64>().ok()),
            ) else {
                panic!("unparsable lock line: {line}");
            };
            assert_eq!((f[6], f[7]), ("0", "0"), "a lock other than byte 0: {line}");
            out.insert((maj, min, ino, f[3] == "WRITE"));
        }
    }
    out.into_iter().collect()
}

/// The lock table against the kernel's view (see the module docs). A release drops the
/// resource from the table at once and unlocks and closes its file as a job on the
/// blocking pool (a close may hang on a dead server), so the kernel may lag the table by
/// that job: look again for a while before calling it a disagreement.
fn check_locks(daemon: &LockTable) {
    for _ in 0..500 {
        if table_locks(daemon) == kernel_locks() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(
        kernel_locks(),
        table_locks(daemon),
        "lock table and the kernel's locks disagree"
    );
}

/// The locks the table says are held: (major, minor, inode, exclusive), sorted.
fn table_locks(daemon: &LockTable) -> Vec<(u32, u32, u64, bool)> {
    let mut want = Vec::new();
    {
        let spaces = match daemon.spaces() {
            Ok(s) => s,
            Err(e) => panic!("lock table unusable: {e}"),
        };
        for (key, ls) in spaces.iter() {
            for r in ls.resources() {
                assert!(
                    !r.owners().is_empty(),
                    "resource {key}/{} has no owner",
                    r.name()
                );
                assert!(
                    r.lock_held(),
                    "resource {key}/{} without its lock",
                    r.name()
                );
                // SAFETY: fstat on a descriptor the resource owns, into a zeroed struct.
                let st = unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    assert_eq!(libc::fstat(r.raw_fd(), &mut st), 0, "fstat of a held lease");
                    st
                };
                want.push((
                    libc::major(st.st_dev),
                    libc::minor(st.st_dev),
                    st.st_ino,
                    !r.is_shared(),
                ));
            }
        }
    }
    want.sort_unstable();
    want
}

/// No descriptor outlives a run. The pump thread closes its own as it exits, which
/// `shutdown` does not wait for, so the count may take a moment to come down; and the
/// first run opens a few process-wide ones for good (tokio's), hence the baseline
/// after it.
fn check_fds(before: usize) {
    static BASELINE: OnceLock<usize> = OnceLock::new();
    let settled = |limit: usize, tries: usize| {
        for _ in 0..tries {
            if open_fds() <= limit {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        false
    };
    // Compared with this run's own start too: between runs libFuzzer itself may open
    // descriptors for good (under ASan, the pipes to llvm-symbolizer for NEW_FUNC).
    let limit = match BASELINE.get() {
        Some(&b) => b.max(before),
        None => {
            settled(before, 50);
            *BASELINE.get_or_init(open_fds)
        }
    };
    if !settled(limit, 2000) {
        for e in std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
        {
            eprintln!(
                "fd {:?} -> {:?}",
                e.file_name(),
                std::fs::read_link(e.path())
            );
        }
        panic!(
            "descriptors leaked by the run: {} open, {limit} before",
            open_fds()
        );
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn dev_null() -> OwnedFd {
    match std::fs::File::open("/dev/null") {
        Ok(f) => f.into(),
        Err(e) => panic!("cannot open /dev/null: {e}"),
    }
}

/// What a frame should get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Nothing,
    Pong,
    Reply(Header),
}

/// The state of one run.
struct World {
    base: PathBuf,
    log: Arc<Server>,
    lock: Arc<Server>,
    admin: Arc<Server>,
    lockd: Arc<LockTable>,
    conns: Vec<Conn>,
    pipes: Vec<OwnedFd>,
    next_id: u64,
    /// An admin call that can close connections was made: a later EOF is no surprise.
    admin_closed: bool,
}

impl World {
    fn connect(&mut self, kind: Kind) {
        if self.conns.len() >= MAX_CONNS {
            return;
        }
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => panic!("socketpair: {e}"),
        };
        let server = match kind {
            Kind::Log => &self.log,
            Kind::Lock => &self.lock,
            Kind::Admin => &self.admin,
        };
        self.next_id += 1;
        // A fresh connection's private data, as it would be saved for a re-exec.
        let fresh: Private = match kind {
            Kind::Lock => Box::new(LockClient::default()),
            _ => Box::new(()),
        };
        let private = match server.hooks().save_private(&fresh) {
            Ok(v) => v,
            Err(e) => panic!("save_private: {e}"),
        };
        if let Err(e) = server.adopt_client(
            theirs.into(),
            self.next_id,
            0,
            &private,
            PendingIo::default(),
        ) {
            panic!("adopt_client: {e}");
        }
        if let Err(e) = ours.set_nonblocking(true) {
            panic!("set_nonblocking: {e}");
        }
        let stream = match UnixStream::from_std(ours) {
            Ok(s) => s,
            Err(e) => panic!("UnixStream::from_std: {e}"),
        };
        self.conns.push(Conn { kind, stream });
    }

    /// Reads one message; `None` on EOF or a reset.
    async fn read(stream: &UnixStream) -> Option<connection::Incoming> {
        let mut reader = FrameReader::default();
        match reader.read(stream).await {
            Ok(m) => Some(m),
            Err(ReadEnd::Eof) => None,
            // A reset before a byte of the frame came is a close, not a broken frame.
            Err(ReadEnd::Broken(why)) if why.contains("reset") && reader.is_idle() => None,
            Err(ReadEnd::Broken(why)) => panic!("server sent a broken message: {why}"),
        }
    }

    fn check_reply(&mut self, call: &Header, m: &connection::Incoming) {
        let h = m.header;
        assert_eq!(
            (h.prog, h.vers, h.proc_, h.serial),
            (call.prog, call.vers, call.proc_, call.serial),
            "reply does not match its call"
        );
        match h.status {
            status::OK => assert!(
                h.type_ == msg_type::REPLY || h.type_ == msg_type::REPLY_WITH_FDS,
                "reply of type {}",
                h.type_
            ),
            status::ERROR => {
                assert_eq!(h.type_, msg_type::REPLY, "error reply with fds");
                assert!(m.fds.is_empty(), "error reply with fds");
                if let Err(e) = RpcError::decode(&mut Decoder::new(m.payload())) {
                    panic!("undecodable error reply: {e}");
                }
            }
            s => panic!("reply with status {s}"),
        }
        assert_eq!(!m.fds.is_empty(), h.type_ == msg_type::REPLY_WITH_FDS);
    }

    /// Sends `frame` (+ `fds`), then a PING, and checks what comes back.
    async fn exchange(&mut self, slot: usize, frame: &[u8], fds: Vec<OwnedFd>, expect: Expect) {
        let kind = self.conns[slot].kind;
        let ping = ping_frame();
        let sent = {
            let s = &self.conns[slot].stream;
            // One flush per frame: an outbox sends its fds after all its bytes, and the
            // fds belong right after the frame that announces them.
            let mut out = Outbox::default();
            out.push(frame.to_vec(), fds);
            let mut sent = out.flush(s).await.is_ok();
            if sent {
                out.push(ping, Vec::new());
                sent = out.flush(s).await.is_ok();
            }
            sent
        };
        let mut got_response = false;
        loop {
            let Some(m) = Self::read(&self.conns[slot].stream).await else {
                // A close: only an admin close may cause it here.
                let admin_close = kind == Kind::Admin
                    && matches!(expect, Expect::Reply(h) if h.prog == ADMIN_PROGRAM
                        && h.proc_ == admin::proc_::CONNECT_CLOSE);
                assert!(
                    self.admin_closed || admin_close,
                    "connection closed after a well-formed frame (expected {expect:?}, sent: {sent})"
                );
                self.conns.remove(slot);
                return;
            };
            let is_pong = m.header.prog == protocol::KEEPALIVE_PROGRAM
                && m.header.proc_ == protocol::KEEPALIVE_PONG;
            if !got_response {
                match expect {
                    Expect::Reply(call) => {
                        self.check_reply(&call, &m);
                        for fd in m.fds {
                            set_nonblocking(&fd);
                            self.pipes.push(fd);
                        }
                        got_response = true;
                        continue;
                    }
                    Expect::Pong => {
                        assert!(is_pong, "PING answered with {:?}", m.header);
                        got_response = true;
                        continue;
                    }
                    Expect::Nothing => {}
                }
            }
            assert!(is_pong, "unexpected message {:?} ({expect:?})", m.header);
            assert!(m.fds.is_empty() && m.payload().is_empty(), "PONG with data");
            return;
        }
    }

    async fn send_frame(&mut self, slot: usize, bytes: &[u8]) {
        let kind = self.conns[slot].kind;
        let mut frame = Vec::with_capacity(bytes.len() + 4);
        frame.extend_from_slice(&((bytes.len() + 4) as u32).to_be_bytes());
        frame.extend_from_slice(bytes);
        let raw = match protocol::parse_body(bytes) {
            Ok(r) => r,
            Err(_) => {
                // Too short for a header, or too many fds: a close and nothing else.
                self.hang_up_after(slot, &frame).await;
                return;
            }
        };
        let h = raw.header;
        let payload = rewrite_payload(&self.base, &h, &bytes[raw.payload_offset..]);
        let nfds = h.has_fds().then_some(raw.nfds as u32);
        let frame = protocol::encode_frame(&h, nfds, &payload);
        let fds: Vec<OwnedFd> = (0..raw.nfds).map(|_| dev_null()).collect();
        let expect = if h.prog == protocol::KEEPALIVE_PROGRAM
            && h.vers == protocol::KEEPALIVE_VERSION
            && h.type_ == msg_type::MESSAGE
        {
            if h.proc_ == protocol::KEEPALIVE_PING {
                Expect::Pong
            } else {
                Expect::Nothing
            }
        } else if h.type_ == msg_type::CALL || h.type_ == msg_type::CALL_WITH_FDS {
            Expect::Reply(h)
        } else {
            Expect::Nothing
        };
        if kind == Kind::Admin
            && h.prog == ADMIN_PROGRAM
            && (h.proc_ == admin::proc_::CLIENT_CLOSE || h.proc_ == admin::proc_::CONNECT_CLOSE)
        {
            self.admin_closed = true;
        }
        self.exchange(slot, &frame, fds, expect).await;
        if h.prog == lockp::PROGRAM {
            check_locks(&self.lockd);
        }
    }

    /// Sends bytes that cannot make a whole frame, hangs up the write side, and
    /// expects a close with nothing said.
    async fn hang_up_after(&mut self, slot: usize, bytes: &[u8]) {
        let conn = self.conns.remove(slot);
        let mut out = Outbox::default();
        out.push(bytes.to_vec(), Vec::new());
        let _ = out.flush(&conn.stream).await;
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(conn.stream.as_raw_fd(), libc::SHUT_WR) };
        if let Some(m) = Self::read(&conn.stream).await {
            panic!("reply {:?} to a broken frame", m.header);
        }
        check_locks(&self.lockd);
    }

    async fn garbage(&mut self, slot: usize, word: u32, bytes: &[u8]) {
        let len = word as usize;
        // Never a whole frame: at most the frame's length minus one byte.
        let keep = bytes.len().min(len.saturating_sub(5));
        let mut v = word.to_be_bytes().to_vec();
        v.extend_from_slice(&bytes[..keep]);
        self.hang_up_after(slot, &v).await;
    }
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

fn ping_frame() -> Vec<u8> {
    protocol::encode_frame(
        &Header {
            prog: protocol::KEEPALIVE_PROGRAM,
            vers: protocol::KEEPALIVE_VERSION,
            proc_: protocol::KEEPALIVE_PING,
            type_: msg_type::MESSAGE,
            serial: 0,
            status: status::OK,
        },
        None,
        &[],
    )
}

/// One run of the servers over `data` (see the module docs).
pub fn run(data: &[u8]) {
    let root = scratch_root();
    let base = root.join("w");
    let _ = std::fs::remove_dir_all(&base);
    if let Err(e) = std::fs::create_dir_all(&base) {
        panic!("cannot create {}: {e}", base.display());
    }
    let fds_before = open_fds();
    assert!(kernel_locks().is_empty(), "locks left over before the run");

    let mut input = Input(data);
    let max_size = [0u64, 64, 1024, 2_097_152][usize::from(input.u8().unwrap_or(3) % 4)];
    let max_backups = u64::from(input.u8().unwrap_or(3) % 36);

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let handler = LogHandler::new(Limits {
        max_size,
        max_backups,
    });
    let lockd = LockTable::new(LockSpaces::new());
    let (tx, rx) = watch::channel(RunState::Running);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let limits = ClientLimits {
        max_clients: 1024,
        max_unauth: 1024,
    };
    let log = Server::new("virtlogd", uid, limits, Arc::new(NoHooks), rx.clone());
    log.add_program(LogProgram::new(handler.clone()));
    let lock = Server::new(
        "virtlockd",
        uid,
        limits,
        LockHooks::new(lockd.clone()),
        rx.clone(),
    );
    lock.add_program(LockProgram::new(lockd.clone()));
    let admin_srv = Server::new("admin", uid, limits, Arc::new(NoHooks), rx);
    let target = FakeDaemon::new(vec![log.clone(), lock.clone(), admin_srv.clone()]);
    let weak: std::sync::Weak<dyn AdminTarget> = {
        let t: Arc<dyn AdminTarget> = target.clone();
        Arc::downgrade(&t)
    };
    let admin_program: Arc<dyn Program> = Arc::new(AdminProgram::new(weak));
    admin_srv.add_program(admin_program);

    let mut world = World {
        base: base.clone(),
        log,
        lock,
        admin: admin_srv,
        lockd: lockd.clone(),
        conns: Vec::new(),
        pipes: Vec::new(),
        next_id: 0,
        admin_closed: false,
    };

    rt.block_on(async {
        for _ in 0..MAX_OPS {
            let Some(op) = input.u8() else { break };
            match op % 7 {
                0 => {
                    let Some(k) = input.u8() else { break };
                    world.connect([Kind::Log, Kind::Lock, Kind::Admin][usize::from(k % 3)]);
                }
                1 => {
                    let Some(s) = input.u8() else { break };
                    if !world.conns.is_empty() {
                        let i = usize::from(s) % world.conns.len();
                        world.conns.remove(i);
                        // Let the server see the hang-up and run its close hook.
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        check_locks(&world.lockd);
                    }
                }
                2 => {
                    let (Some(s), Some(n)) = (input.u8(), input.u16()) else {
                        break;
                    };
                    let Some(bytes) = input.bytes(n) else { break };
                    if !world.conns.is_empty() {
                        let i = usize::from(s) % world.conns.len();
                        world.send_frame(i, bytes).await;
                    }
                }
                3 => {
                    let (Some(s), Some(w), Some(n)) = (input.u8(), input.u32(), input.u16()) else {
                        break;
                    };
                    let Some(bytes) = input.bytes(n) else { break };
                    if !world.conns.is_empty() {
                        let i = usize::from(s) % world.conns.len();
                        world.garbage(i, w, bytes).await;
                    }
                }
                4 => {
                    let (Some(p), Some(n)) = (input.u8(), input.u16()) else {
                        break;
                    };
                    let Some(bytes) = input.bytes(n) else { break };
                    if !world.pipes.is_empty() {
                        let fd = &world.pipes[usize::from(p) % world.pipes.len()];
                        // SAFETY: a non-blocking write from a live slice to our pipe end.
                        let _ = unsafe {
                            libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len())
                        };
                    }
                }
                5 => {
                    let Some(p) = input.u8() else { break };
                    if !world.pipes.is_empty() {
                        let i = usize::from(p) % world.pipes.len();
                        world.pipes.remove(i);
                    }
                }
                _ => {
                    let Some(n) = input.u8() else { break };
                    for _ in 0..n % 8 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        // Everyone hangs up: every server must drain.
        world.conns.clear();
        world.pipes.clear();
        for s in [&world.log, &world.lock, &world.admin] {
            s.drained().await;
        }
        check_locks(&world.lockd);
    });
    let _ = tx.send(RunState::Quit);
    drop(rt);
    handler.shutdown();
    drop(world);
    drop(target);
    drop(handler);
    drop(lockd);
    assert!(
        kernel_locks().is_empty(),
        "locks left behind by the lock daemon"
    );
    let _ = std::fs::remove_dir_all(&base);
    check_fds(fds_before);
}
