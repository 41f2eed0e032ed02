//! Shared harness for the end-to-end suites in `tests/tests/`. Starting daemons,
//! finding binaries and raw connections are the test kit's (`vh-testkit`, re-exported
//! here); this crate adds the transcripts, comparisons, lock owners and argument
//! builders. Together they start real daemons (libvirt 9.0's C binaries or ours) in
//! private mount namespaces, talk raw libvirt RPC to them, load the captured 9.0 wire
//! transcripts and compare replies byte for byte.
//!
//! # Building before testing
//!
//! These tests run the daemon *binaries*, which `cargo test` does not build for another
//! package. The test command in the README is therefore
//!
//! ```text
//! cargo build --workspace && cargo test --workspace
//! ```
//!
//! Our binaries are looked up in `$VH_BIN_DIR` if set, else in the cargo target profile
//! directory the test executable itself lives in (`target/debug/deps/x` → `target/debug`).
//! The C peers are `/usr/sbin/virtlogd` and `/usr/sbin/virtlockd` (override with
//! `$VH_C_VIRTLOGD` / `$VH_C_VIRTLOCKD`). A missing binary is a loud test failure, never a
//! skip. The fixtures are the repository's own copy in `fixtures/` (see its README).
//!
//! # Daemons in mount namespaces
//!
//! Every [`Daemon`] runs as root in **system mode**, in its own mount namespace, set up
//! by the test kit (`vh-testkit`, shared with the bench) in the child before it execs
//! the daemon: no shell, no command line built from paths.
//!
//! `/run` and the directories the scenario writes (see [`Service::default_tmpfs`]) are
//! fresh tmpfs mounts, so daemons never clash with each other or with the host's, and
//! several tests may run in parallel threads. The child's pid *is* the daemon's pid.
//! The test reaches the daemon's world through `/proc/<pid>/root`: sockets via [`Daemon::sock`] / [`Daemon::admin_sock`], files via [`Daemon::host_path`].
//! Anything outside the tmpfs mounts (e.g. a tempdir under `/tmp`) is shared with the host
//! and with every other daemon: that is how `two_hosts.rs` shares a lockspace directory.
//!
//! [`Daemon::spawn`] waits (bounded) until both sockets accept connections and fails the
//! test with the daemon's stderr if it dies first. Dropping a [`Daemon`] SIGKILLs and reaps
//! it (the namespace and its tmpfs mounts vanish with it), so no process outlives a test,
//! even a panicking one. SIGKILL rather than SIGTERM on purpose: an orderly virtlockd stop
//! would SIGTERM the owner pids it knows, and a test must never make a daemon signal
//! processes it did not mean to.
//!
//! # Talking to daemons
//!
//! [`Conn`] is a raw blocking connection: send any bytes, receive whole frames with their
//! passed fds ([`Frame`]), and classify what the daemon did with a message
//! ([`Conn::outcome_after`], which uses a keepalive PING as an ordering barrier instead
//! of a timeout). Frame builders: [`call_frame`], [`frame`], [`ping_frame`].
//!
//! # Comparing replies
//!
//! [`assert_frames_eq`] compares two frames byte for byte and on mismatch prints both
//! decoded (header, error struct) plus a hex dump. Masking is explicit and narrow:
//! [`mask_log_position`] zeroes only the inode (and optionally the offset) of the two
//! virtlogd replies that carry a `LogFilePosition`; [`InodeMap`] remembers which real inode
//! stands for which transcript inode so later calls can be rewritten.
//!
//! # Transcripts
//!
//! [`Transcript::load`] parses `virtlogd-9.0-transcripts.json` /
//! `virtlockd-9.0-transcripts.json` into [`TranscriptConn`]s, whose [`TranscriptConn::messages`]
//! reassembles the recorded events into whole frames (length word + body) per direction,
//! with the fds announced by the 1-byte SCM_RIGHTS carriers attached to the frame before them.
//!
//! # Lock owners
//!
//! virtlockd releases an owner's leases when the connection whose peer pid equals the
//! registered owner pid closes (and then kills that pid). [`OwnerChild`] gives a test a
//! real, disposable owner: a `sleep` child whose *pre-exec* hook connects a socket the test
//! keeps, so SO_PEERCRED names the child while the test drives the connection.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;

use vh_common::xdr::Decoder;

// Daemons, namespaces, binaries and raw connections are the test kit's (shared with the
// bench); their old paths here stay.
pub use vh_testkit::*;

// ------------------------------------------------------------------------------------
// Comparing and masking
// ------------------------------------------------------------------------------------

/// Asserts two frames are identical, with a readable report if not.
#[track_caller]
pub fn assert_frames_eq(expected: &[u8], actual: &[u8], ctx: &str) {
    if expected != actual {
        let first = expected
            .iter()
            .zip(actual)
            .position(|(a, b)| a != b)
            .unwrap_or(expected.len().min(actual.len()));
        panic!(
            "{ctx}: frames differ (first difference at byte {first})\nexpected: {}\nactual:   {}",
            describe(expected),
            describe(actual)
        );
    }
}

/// Byte range of the `LogFilePosition` in a successful virtlogd reply: OpenLogFile
/// (REPLY_WITH_FDS, after nfds) or GetLogFilePosition (REPLY). `None` for anything else.
pub fn log_position_range(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let raw = vh_common::protocol::parse_body(bytes.get(4..)?).ok()?;
    let h = raw.header;
    if h.prog != virtlogd::protocol::PROGRAM || h.status != status::OK {
        return None;
    }
    let start = 4 + raw.payload_offset;
    let ok = match h.proc_ {
        virtlogd::protocol::proc_::DOMAIN_OPEN_LOG_FILE => h.type_ == msg_type::REPLY_WITH_FDS,
        virtlogd::protocol::proc_::DOMAIN_GET_LOG_FILE_POSITION => h.type_ == msg_type::REPLY,
        _ => false,
    };
    (ok && bytes.len() >= start + 16).then_some(start..start + 16)
}

/// The (inode, offset) of a virtlogd position reply.
pub fn log_position(bytes: &[u8]) -> Option<(u64, u64)> {
    let r = log_position_range(bytes)?;
    let b = &bytes[r];
    Some((
        u64::from_be_bytes(b[..8].try_into().ok()?),
        u64::from_be_bytes(b[8..].try_into().ok()?),
    ))
}

/// Zeroes the inode (and, with `offset`, the offset) of a virtlogd position reply; other
/// frames are returned unchanged. Inodes differ by nature between file systems and runs.
pub fn mask_log_position(bytes: &[u8], offset: bool) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if let Some(r) = log_position_range(bytes) {
        v[r.start..r.start + 8].fill(0);
        if offset {
            v[r.start + 8..r.end].fill(0);
        }
    }
    v
}

/// Transcript inode → the inode our run got for the same file, learned from replies.
#[derive(Debug, Default)]
pub struct InodeMap(pub std::collections::HashMap<u64, u64>);

impl InodeMap {
    /// Learns from a pair of (expected, actual) position replies.
    pub fn learn(&mut self, expected: &[u8], actual: &[u8]) {
        if let (Some((e, _)), Some((a, _))) = (log_position(expected), log_position(actual)) {
            self.0.insert(e, a);
        }
    }

    pub fn map(&self, inode: u64) -> u64 {
        self.0.get(&inode).copied().unwrap_or(inode)
    }
}

// ------------------------------------------------------------------------------------
// Transcripts
// ------------------------------------------------------------------------------------

/// Where the captured libvirt fixtures are: the repository's `fixtures/`, so the tests
/// read nothing outside the checkout.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Direction of a recorded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ClientToDaemon,
    DaemonToClient,
}

/// One recorded `read`/`write` (or 1-byte fd carrier).
#[derive(Debug, Clone)]
pub struct Event {
    pub dir: Dir,
    pub bytes: Vec<u8>,
    /// Fds carried by this (1-byte) message.
    pub scm_rights_fds: usize,
}

/// One reassembled message of a transcript.
#[derive(Debug, Clone)]
pub struct Message {
    pub dir: Dir,
    /// The whole frame, length word included.
    pub frame: Vec<u8>,
    pub header: Header,
    /// Fds that followed it on the wire.
    pub fds: usize,
}

/// One accepted connection of a transcript.
#[derive(Debug, Clone)]
pub struct TranscriptConn {
    /// Index in the file (accept order).
    pub index: usize,
    pub listen_fd: i64,
    pub events: Vec<Event>,
    pub fds_passed: usize,
    pub summary: Vec<String>,
}

/// A transcript file.
#[derive(Debug, Clone)]
pub struct Transcript {
    pub conns: Vec<TranscriptConn>,
}

impl Transcript {
    /// Loads `name` from [`fixtures_dir`]; panics (fails the test) if it is missing.
    pub fn load(name: &str) -> Transcript {
        let path = fixtures_dir().join(name);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("required fixture {} missing: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
        let arr = v.as_array().expect("transcript is an array");
        let conns = arr
            .iter()
            .enumerate()
            .map(|(index, c)| TranscriptConn {
                index,
                listen_fd: c["listen_fd"].as_i64().expect("listen_fd"),
                fds_passed: c["fds_passed"].as_u64().unwrap_or(0) as usize,
                summary: c["summary"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                events: c["events"]
                    .as_array()
                    .expect("events")
                    .iter()
                    .map(|e| Event {
                        dir: match e["dir"].as_str() {
                            Some("client->daemon") => Dir::ClientToDaemon,
                            Some("daemon->client") => Dir::DaemonToClient,
                            other => panic!("bad dir {other:?}"),
                        },
                        bytes: hex::decode(e["hex"].as_str().expect("hex")).expect("hex"),
                        scm_rights_fds: e["scm_rights_fds"].as_u64().unwrap_or(0) as usize,
                    })
                    .collect(),
            })
            .collect();
        Transcript { conns }
    }

    /// Connections accepted on the main socket (the lower listen fd).
    pub fn main_conns(&self) -> Vec<&TranscriptConn> {
        let lo = self.conns.iter().map(|c| c.listen_fd).min().unwrap_or(0);
        self.conns.iter().filter(|c| c.listen_fd == lo).collect()
    }

    /// Connections accepted on the admin socket (the higher listen fd).
    pub fn admin_conns(&self) -> Vec<&TranscriptConn> {
        let lo = self.conns.iter().map(|c| c.listen_fd).min().unwrap_or(0);
        self.conns.iter().filter(|c| c.listen_fd != lo).collect()
    }
}

impl TranscriptConn {
    /// Reassembles the events into whole frames, in recorded order. The 1-byte fd
    /// carriers are counted into the `fds` of the frame before them.
    pub fn messages(&self) -> Vec<Message> {
        let mut out: Vec<Message> = Vec::new();
        let mut pending: [(Vec<u8>, Dir); 2] = [
            (Vec::new(), Dir::ClientToDaemon),
            (Vec::new(), Dir::DaemonToClient),
        ];
        for e in &self.events {
            let slot = match e.dir {
                Dir::ClientToDaemon => 0,
                Dir::DaemonToClient => 1,
            };
            if e.scm_rights_fds > 0 {
                let last = out
                    .iter_mut()
                    .rev()
                    .find(|m| m.dir == e.dir)
                    .expect("fd carrier without a frame");
                last.fds += e.scm_rights_fds;
                continue;
            }
            let buf = &mut pending[slot].0;
            buf.extend_from_slice(&e.bytes);
            while buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                let raw = vh_common::protocol::parse_body(&frame[4..]).expect("transcript header");
                out.push(Message {
                    dir: e.dir,
                    frame,
                    header: raw.header,
                    fds: 0,
                });
            }
        }
        for (buf, dir) in &pending {
            assert!(
                buf.is_empty(),
                "conn {}: trailing {dir:?} bytes",
                self.index
            );
        }
        out
    }

    /// The client's frames, in order.
    pub fn calls(&self) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.dir == Dir::ClientToDaemon)
            .collect()
    }

    /// The daemon's frames, in order.
    pub fn replies(&self) -> Vec<Message> {
        self.messages()
            .into_iter()
            .filter(|m| m.dir == Dir::DaemonToClient)
            .collect()
    }
}

// ------------------------------------------------------------------------------------
// Lock owners
// ------------------------------------------------------------------------------------

/// A disposable child process that made a connection the test drives, so the daemon's
/// SO_PEERCRED pid is the child's. Register with [`OwnerChild::pid`] as owner pid to make
/// this connection the owner's own (QEMU's inherited) connection.
///
/// The child is `sleep 30` (or `sleep SECS`); a `pre_exec` hook connects a socket created by the test
/// (connect(2) in the child, file description shared with the test), and the socket is
/// close-on-exec, so after exec only the test holds it. [`OwnerChild::exit`] kills and
/// reaps the child and then closes the connection, in the order QEMU's death produces:
/// the daemon's kill of the owner pid then finds nothing (ESRCH). Dropping it does the same.
pub struct OwnerChild {
    child: Option<Child>,
    pub conn: Option<Conn>,
}

impl OwnerChild {
    /// Spawns the child and connects to `sock` from it.
    pub fn connect(sock: &Path) -> OwnerChild {
        Self::connect_living(sock, 30)
    }

    /// [`OwnerChild::connect`] with a child that lives `secs` seconds.
    pub fn connect_living(sock: &Path, secs: u32) -> OwnerChild {
        let (child, stream) = vh_testkit::Sleeper {
            secs,
            ..Default::default()
        }
        .spawn_connected(sock)
        .expect("spawn owner child (sleep)");
        OwnerChild {
            child: Some(child),
            conn: Some(Conn::from_stream(stream)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("owner connection already closed")
    }

    /// The owner dies: kill and reap the child, then close the connection.
    pub fn exit(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.conn.take();
    }
}

impl Drop for OwnerChild {
    fn drop(&mut self) {
        self.exit();
    }
}

// ------------------------------------------------------------------------------------
// Argument builders
// ------------------------------------------------------------------------------------

/// Encoders for the log and lock programs' arguments (thin wrappers over the library
/// types, so tests read like the calls they make).
pub mod args {
    use vh_common::xdr::Encoder;
    use virtlockd::protocol as lk;
    use virtlogd::protocol as lg;

    pub fn log_open(driver: &str, uuid: [u8; 16], name: &str, path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::OpenLogFileArgs {
            driver: driver.into(),
            dom: lg::Domain {
                uuid,
                name: name.into(),
            },
            path: path.as_bytes().to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_position(path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::GetLogFilePositionArgs {
            path: path.as_bytes().to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_read(path: &str, inode: u64, offset: u64, maxlen: u64, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::ReadLogFileArgs {
            path: path.as_bytes().to_vec(),
            pos: lg::LogFilePosition { inode, offset },
            maxlen,
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn log_append(path: &str, message: &[u8], flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lg::AppendLogFileArgs {
            driver: "qemu".into(),
            dom: lg::Domain {
                uuid: [7; 16],
                name: "vm".into(),
            },
            path: path.as_bytes().to_vec(),
            message: message.to_vec(),
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn lock_register(uuid: [u8; 16], name: &str, id: u32, pid: u32, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        lk::RegisterArgs {
            owner: lk::Owner {
                uuid,
                name: name.into(),
                id,
                pid,
            },
            flags,
        }
        .encode(&mut e);
        e.into_inner()
    }

    pub fn lock_flags(flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u32(flags);
        e.into_inner()
    }

    pub fn lock_new(path: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path).u32(flags);
        e.into_inner()
    }

    /// CREATE/DELETE/ACQUIRE/RELEASE_RESOURCE.
    pub fn lock_resource(path: &str, name: &str, flags: u32) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path).string(name).u32(flags);
        e.into_inner()
    }

    pub fn lock_create_lockspace(path: &str) -> Vec<u8> {
        let mut e = Encoder::new();
        e.string(path);
        e.into_inner()
    }
}

/// Rewrites the owner pid of a lock REGISTER call frame (decoded and re-encoded with the
/// library type, so the pid is found by structure, not by a guessed offset).
pub fn with_register_pid(call: &[u8], pid: u32) -> Vec<u8> {
    use virtlockd::protocol::RegisterArgs;
    let raw = vh_common::protocol::parse_body(&call[4..]).expect("header");
    assert_eq!(raw.header.proc_, virtlockd::protocol::proc_::REGISTER);
    let payload = &call[4 + raw.payload_offset..];
    let mut a = RegisterArgs::decode(&mut Decoder::new(payload)).expect("REGISTER args");
    let mut e = vh_common::xdr::Encoder::new();
    a.encode(&mut e);
    assert_eq!(
        e.as_bytes(),
        payload,
        "REGISTER re-encodes to the same bytes"
    );
    a.owner.pid = pid;
    let mut e = vh_common::xdr::Encoder::new();
    a.encode(&mut e);
    frame(&raw.header, None, e.as_bytes())
}

/// The owner pid in a lock REGISTER call frame.
pub fn register_pid(call: &[u8]) -> u32 {
    use virtlockd::protocol::RegisterArgs;
    let raw = vh_common::protocol::parse_body(&call[4..]).expect("header");
    RegisterArgs::decode(&mut Decoder::new(&call[4 + raw.payload_offset..]))
        .expect("REGISTER args")
        .owner
        .pid
}
