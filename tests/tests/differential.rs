//! Differential tests: libvirt 9.0's C daemon and ours side by side, with the same config,
//! fed the same good, bad and malformed input; every reply is compared byte for byte
//! (only the inode of `LogFilePosition` replies is masked: inodes differ by nature), and
//! so are the files on disk (through `/proc/<pid>/root`, each daemon in its own mount
//! namespace, so every path is the same string for both).
//!
//! "No answer" is observed without timing: after the message under test a keepalive PING
//! is sent; the daemon handles messages in order, so a PONG with nothing before it means
//! "nothing was sent back", and EOF means "closed". See [`Conn::outcome_after`].
//!
//! Documented, deliberate difference asserted here: resource names that would leave a
//! directory lockspace (containing `/`, or `..`) are refused by ours with INVALID_ARG
//! (domain LOCKSPACE); 9.0 joins them to the directory blindly.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use vh_common::error::{code, domain};
use vh_tests::*;
use virtlockd::protocol as lk;
use virtlogd::protocol as lg;

const LOG: u32 = lg::PROGRAM;
const LOCK: u32 = lk::PROGRAM;

/// The same daemon twice: C and ours.
struct Pair {
    c: Daemon,
    ours: Daemon,
}

impl Pair {
    fn start(service: Service, config: &str) -> Pair {
        // Started one after the other: both wait for their sockets.
        Pair {
            c: Daemon::spawn(DaemonKind::C, service, config),
            ours: Daemon::spawn(DaemonKind::Ours, service, config),
        }
    }

    fn connect(&self) -> PairConn {
        PairConn {
            c: self.c.connect(),
            ours: self.ours.connect(),
        }
    }

    /// Asserts the file `p` (absolute, inside the namespaces) is the same for both
    /// (content, or absence) and returns ours.
    #[track_caller]
    fn same_file(&self, p: &str) -> Option<Vec<u8>> {
        let c = fs::read(self.c.host_path(p)).ok();
        let o = fs::read(self.ours.host_path(p)).ok();
        assert_eq!(
            c.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            o.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
            "file {p}: C vs ours"
        );
        o
    }

    /// [`Pair::same_file`] for a log and its backups.
    #[track_caller]
    fn same_log(&self, p: &str) -> [Option<usize>; 3] {
        [
            self.same_file(p).map(|v| v.len()),
            self.same_file(&format!("{p}.0")).map(|v| v.len()),
            self.same_file(&format!("{p}.1")).map(|v| v.len()),
        ]
    }

    /// Both daemons still accept and serve a new client.
    #[track_caller]
    fn still_serving(&self) {
        let mut pc = self.connect();
        assert!(pc.c.alive(), "C daemon stopped serving new clients");
        assert!(pc.ours.alive(), "our daemon stopped serving new clients");
    }
}

/// One connection to each daemon of a [`Pair`].
struct PairConn {
    c: Conn,
    ours: Conn,
}

fn masked(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames.iter().map(|f| mask_log_position(f, false)).collect()
}

fn masked_outcome(o: Outcome) -> Outcome {
    match o {
        Outcome::Replied(v) => Outcome::Replied(masked(&v)),
        Outcome::Closed(v) => Outcome::Closed(masked(&v)),
        Outcome::Silent(v) => Outcome::Silent(masked(&v)),
    }
}

fn describe_outcome(o: &Outcome) -> String {
    let (kind, v) = match o {
        Outcome::Replied(v) => ("replied", v),
        Outcome::Closed(v) => ("closed", v),
        Outcome::Silent(v) => ("silent", v),
    };
    let mut s = format!("{kind} after {} frame(s)", v.len());
    for f in v {
        s.push_str("\n  ");
        s.push_str(&describe(f));
    }
    s
}

impl PairConn {
    /// Sends the same bytes to both and asserts the same outcome; returns it.
    #[track_caller]
    fn same(&mut self, bytes: &[u8], what: &str) -> Outcome {
        self.same2(bytes, bytes, what)
    }

    /// Sends `c_bytes` to C and `ours_bytes` to ours (they differ only in values that
    /// differ by nature, like inodes) and asserts the same outcome.
    #[track_caller]
    fn same2(&mut self, c_bytes: &[u8], ours_bytes: &[u8], what: &str) -> Outcome {
        let c = masked_outcome(self.c.outcome_after(c_bytes));
        let o = masked_outcome(self.ours.outcome_after(ours_bytes));
        if c != o {
            panic!(
                "{what}: C and ours differ\nC:    {}\nours: {}",
                describe_outcome(&c),
                describe_outcome(&o)
            );
        }
        o
    }

    /// A call answered by one frame on both (compared, inode masked); returns both frames
    /// with their fds.
    #[track_caller]
    fn call(&mut self, bytes: &[u8], what: &str) -> (Frame, Frame) {
        let c = self.c.roundtrip(bytes, &format!("{what} (C)"));
        let o = self.ours.roundtrip(bytes, &format!("{what} (ours)"));
        assert_frames_eq(
            &mask_log_position(&c.bytes, false),
            &mask_log_position(&o.bytes, false),
            &format!("{what}: C (expected) vs ours"),
        );
        assert_eq!(c.fds.len(), o.fds.len(), "{what}: fds passed");
        (c, o)
    }

    /// A call answered by an error on both; returns our decoded error.
    #[track_caller]
    fn error(&mut self, bytes: &[u8], what: &str) -> RpcError {
        let (_, o) = self.call(bytes, what);
        o.error().unwrap_or_else(|| {
            panic!(
                "{what}: expected an error reply, got {}",
                describe(&o.bytes)
            )
        })
    }

    /// A call that succeeds on both.
    #[track_caller]
    fn ok(&mut self, bytes: &[u8], what: &str) -> (Frame, Frame) {
        let (c, o) = self.call(bytes, what);
        assert_eq!(
            o.header.status,
            status::OK,
            "{what}: {}",
            describe(&o.bytes)
        );
        (c, o)
    }
}

fn with_type(
    prog: u32,
    proc_: i32,
    type_: i32,
    status_: i32,
    nfds: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    frame(
        &Header {
            prog,
            vers: 1,
            proc_,
            type_,
            serial: 5,
            status: status_,
        },
        nfds,
        payload,
    )
}

fn write_all_fd(fd: &OwnedFd, data: &[u8]) {
    let mut f = fs::File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}

/// Writes the same bytes into both daemons' pipes.
fn write_both(c: &OwnedFd, o: &OwnedFd, data: &[u8]) {
    write_all_fd(c, data);
    write_all_fd(o, data);
}

fn lines(n: usize, len: usize, ch: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.extend_from_slice(&vec![ch; len - 1]);
        v.push(b'\n');
    }
    v
}

/// Waits until `d` has dropped `path` after its pipe reached EOF.
fn wait_log_closed(d: &Daemon, path: &str) {
    wait_until(&format!("{}: {path} closed", d.label()), || {
        let mut c = d.connect();
        c.roundtrip(
            &log_call(
                lg::proc_::DOMAIN_GET_LOG_FILE_POSITION,
                0,
                &args::log_position(path, 0),
            ),
            "probe",
        )
        .header
        .status
            == status::ERROR
    });
}

// ------------------------------------------------------------------------------------
// Wire-level cases shared by both daemons
// ------------------------------------------------------------------------------------

/// Malformed and non-call frames that the daemon answers or ignores (connection stays).
fn protocol_cases(pair: &Pair, prog: u32, valid_proc: i32, valid_args: &[u8]) {
    use msg_type::*;
    let mut pc = pair.connect();
    // Unknown program / version (answered with the wrong prog/vers echoed).
    pc.same(&call_frame(0x1122_3344, 1, 1, 1, &[]), "unknown program");
    pc.same(
        &call_frame(0x8000_0001, 1, 1, 1, &[]),
        "unknown program >= 2^31",
    );
    pc.same(
        &call_frame(prog, 2, valid_proc, 2, valid_args),
        "wrong version",
    );
    pc.same(&call_frame(prog, 0, valid_proc, 2, valid_args), "version 0");
    // Unknown procedures.
    for p in [0, 9, 99, -1, i32::MAX, i32::MIN] {
        pc.same(
            &call_frame(prog, 1, p, 3, &[]),
            &format!("unknown procedure {p}"),
        );
    }
    // Status != OK in a call.
    for st in [1, 2, 7, -1] {
        pc.same(
            &with_type(prog, valid_proc, CALL, st, None, valid_args),
            &format!("call with status {st}"),
        );
    }
    // Undecodable payloads.
    pc.same(&call_frame(prog, 1, valid_proc, 4, &[]), "empty payload");
    pc.same(
        &call_frame(prog, 1, valid_proc, 4, &valid_args[..valid_args.len() - 1]),
        "truncated payload",
    );
    pc.same(
        &call_frame(prog, 1, valid_proc, 4, &[0xff; 12]),
        "garbage payload (huge string length)",
    );
    // Keepalive: PING answered, PONG and other procs swallowed, keepalive CALL unknown.
    // (outcome_after's own barrier is a PING, so check the PONG directly.)
    for conn in [&mut pc.c, &mut pc.ours] {
        let pong = conn.roundtrip(&ping_frame(), "ping");
        assert!(
            is_pong(&pong.bytes),
            "PING answered by a PONG: {}",
            describe(&pong.bytes)
        );
    }
    let ka = vh_common::protocol::KEEPALIVE_PROGRAM;
    pc.same(&with_type(ka, 2, MESSAGE, 0, None, &[]), "pong");
    pc.same(&with_type(ka, 3, MESSAGE, 0, None, &[]), "keepalive proc 3");
    pc.same(
        &with_type(ka, 1, CALL, 0, None, &[]),
        "keepalive program as a CALL",
    );
    pc.same(
        &with_type(ka, 1, REPLY, 0, None, &[]),
        "keepalive program as a REPLY",
    );
    // Non-call types for the program: no answer.
    for (t, name) in [
        (REPLY, "REPLY"),
        (MESSAGE, "MESSAGE"),
        (STREAM, "STREAM"),
        (STREAM_HOLE, "STREAM_HOLE"),
        (7, "type 7"),
        (-1, "type -1"),
    ] {
        let o = pc.same(&with_type(prog, valid_proc, t, 0, None, valid_args), name);
        assert_eq!(o, Outcome::Replied(vec![]), "{name}: nothing is sent back");
        pc.same(
            &with_type(0x1234_5678, valid_proc, t, 0, None, valid_args),
            &format!("{name} to an unknown program"),
        );
    }
    let o = pc.same(
        &with_type(prog, valid_proc, REPLY_WITH_FDS, 0, Some(0), valid_args),
        "REPLY_WITH_FDS nfds 0",
    );
    assert_eq!(o, Outcome::Replied(vec![]));
    // CALL_WITH_FDS with nfds = 0 is dispatched normally.
    let o = pc.same(
        &with_type(prog, valid_proc, CALL_WITH_FDS, 0, Some(0), valid_args),
        "CALL_WITH_FDS with nfds 0",
    );
    assert!(matches!(&o, Outcome::Replied(v) if v.len() == 1));
    // Trailing bytes after a decodable payload are ignored.
    let mut long = valid_args.to_vec();
    long.extend_from_slice(&[0xab; 13]);
    pc.same(
        &call_frame(prog, 1, valid_proc, 6, &long),
        "trailing bytes after the payload",
    );
    // The connection survived all of that.
    assert!(pc.c.alive() && pc.ours.alive());
}

/// A CALL_WITH_FDS carrying a real fd: dispatched, and the fd is closed by the daemon.
fn passed_fd_is_closed(pair: &Pair, prog: u32, proc_: i32, args: &[u8]) {
    for d in [&pair.c, &pair.ours] {
        let mut conn = d.connect();
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let f = with_type(prog, proc_, msg_type::CALL_WITH_FDS, 0, Some(1), args);
        conn.send(&f).unwrap();
        vh_common::fdpass::send_fd(conn.stream.as_fd(), wr.as_fd()).unwrap();
        drop(wr);
        let reply = conn.recv_ok(&d.label());
        assert_eq!(reply.header.type_, msg_type::REPLY, "{}", d.label());
        // Once the daemon closed its copy, the pipe reports EOF.
        let mut rd = fs::File::from(rd);
        let mut buf = [0u8; 1];
        assert_eq!(
            rd.read(&mut buf).unwrap(),
            0,
            "{}: passed fd closed",
            d.label()
        );
    }
}

/// Frames that make the server drop the connection (or wait for more bytes): each on a
/// fresh connection, outcome compared.
fn closing_cases(pair: &Pair, prog: u32, valid_proc: i32, valid_args: &[u8]) {
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for len in [0u32, 1, 3] {
        cases.push((format!("length word {len}"), len.to_be_bytes().to_vec()));
    }
    // 4..27: a body shorter than the header.
    for len in [4u32, 5, 8, 16, 24, 27] {
        let mut v = len.to_be_bytes().to_vec();
        v.resize(len as usize, 0);
        cases.push((format!("length word {len} with its body"), v));
    }
    let too_big = (vh_common::protocol::MESSAGE_MAX + 5) as u32;
    cases.push(("length 32 MiB + 5".into(), too_big.to_be_bytes().to_vec()));
    cases.push(("length 0xffffffff".into(), u32::MAX.to_be_bytes().to_vec()));
    cases.push((
        "nfds 33".into(),
        with_type(
            prog,
            valid_proc,
            msg_type::CALL_WITH_FDS,
            0,
            Some(33),
            valid_args,
        ),
    ));
    cases.push((
        "nfds u32::MAX".into(),
        with_type(
            prog,
            valid_proc,
            msg_type::CALL_WITH_FDS,
            0,
            Some(u32::MAX),
            valid_args,
        ),
    ));
    cases.push((
        "nfds 1 but no fd sent".into(),
        with_type(
            prog,
            valid_proc,
            msg_type::CALL_WITH_FDS,
            0,
            Some(1),
            valid_args,
        ),
    ));
    cases.push((
        "HTTP garbage".into(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ));
    for (what, bytes) in cases {
        let mut pc = pair.connect();
        let o = pc.same(&bytes, &what);
        eprintln!("{what}: {}", describe_outcome(&o));
    }
    // A frame announcing exactly the maximum is accepted (and then needs its body).
    pair.still_serving();
}

// ------------------------------------------------------------------------------------
// virtlogd
// ------------------------------------------------------------------------------------

const LOGD_CONF: &str = "max_size = 200\nmax_backups = 2\n";
const UUID: [u8; 16] = [0x15; 16];

#[test]
fn virtlogd_differential() {
    use lg::proc_::*;
    let pair = Pair::start(Service::Virtlogd, LOGD_CONF);
    let vm1 = "/var/log/libvirt/qemu/vm1.log";
    let vm2 = "/var/log/libvirt/qemu/vm2.log";
    let vm3 = "/var/log/libvirt/qemu/vm3.log";
    let mut pc = pair.connect();

    // Open: new file, EBUSY, missing directory, odd flags.
    let (c1, o1) = pc.ok(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            0,
            &args::log_open("qemu", UUID, "vm1", vm1, 0),
        ),
        "open vm1",
    );
    let (c_ino, _) = log_position(&c1.bytes).unwrap();
    let (o_ino, _) = log_position(&o1.bytes).unwrap();
    let (c_pipe, o_pipe) = (&c1.fds[0], &o1.fds[0]);
    pc.error(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            1,
            &args::log_open("qemu", UUID, "vm1", vm1, 0),
        ),
        "open vm1 again: EBUSY",
    );
    pc.error(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            1,
            &args::log_open("qemu", [0; 16], "other", vm1, 1),
        ),
        "open vm1 again with TRUNCATE: EBUSY",
    );
    pc.error(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            2,
            &args::log_open("qemu", UUID, "x", "/nonexistent-dir/x.log", 0),
        ),
        "open in a missing directory",
    );
    pc.error(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            2,
            &args::log_open("qemu", UUID, "x", "/var/log/libvirt/qemu", 0),
        ),
        "open a directory",
    );
    fs::write(pair.c.host_path(vm2), b"old content\n").unwrap();
    fs::write(pair.ours.host_path(vm2), b"old content\n").unwrap();
    let (c2, o2) = pc.ok(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            3,
            &args::log_open("bogusdriver", UUID, "x/y", vm2, 0xffff_fffe),
        ),
        "open with flags 0xfffffffe (no truncate)",
    );
    assert_eq!(log_position(&o2.bytes).unwrap().1, 12);

    // Position: flags, unknown path.
    pc.ok(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 4, &args::log_position(vm1, 0)),
        "position vm1",
    );
    pc.error(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 5, &args::log_position(vm1, 1)),
        "position with flags 1",
    );
    pc.error(
        &log_call(
            DOMAIN_GET_LOG_FILE_POSITION,
            5,
            &args::log_position(vm1, 0x8000_0000),
        ),
        "position with flags 2^31",
    );
    pc.error(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 6, &args::log_position(vm3, 0)),
        "position of a path not open",
    );

    // Writes through the pipe, forcing rotations (virtlogd.md §3.5 case A). Each write is
    // drained by GetLogFilePosition before the next, so both daemons see the same chunks.
    let pos = |pc: &mut PairConn, what: &str| {
        pc.ok(
            &log_call(DOMAIN_GET_LOG_FILE_POSITION, 7, &args::log_position(vm1, 0)),
            what,
        )
    };
    write_both(c_pipe, o_pipe, &lines(3, 50, b'a'));
    pos(&mut pc, "position after 150 bytes");
    assert_eq!(pair.same_log(vm1), [Some(150), None, None]);
    write_both(c_pipe, o_pipe, &lines(2, 50, b'b'));
    let (_, o) = pos(&mut pc, "position after the first rotation");
    assert_ne!(
        log_position(&o.bytes).unwrap().0,
        o_ino,
        "new inode after rotation"
    );
    assert_eq!(pair.same_log(vm1), [Some(50), Some(200), None]);
    write_both(c_pipe, o_pipe, &[b'c'; 300]);
    pos(&mut pc, "position after 300 bytes without newline");
    assert_eq!(pair.same_log(vm1), [Some(150), Some(200), Some(200)]);

    // Read across rotations from the first inode (now vm1.log.1).
    let read = |ino: u64, off: u64, maxlen: u64, flags: u32| {
        log_call(
            DOMAIN_READ_LOG_FILE,
            8,
            &args::log_read(vm1, ino, off, maxlen, flags),
        )
    };
    pc.same2(
        &read(c_ino, 0, 10_000, 0),
        &read(o_ino, 0, 10_000, 0),
        "read all from the first inode",
    );
    pc.same2(
        &read(c_ino, 30, 100, 0),
        &read(o_ino, 30, 100, 0),
        "read 100 from offset 30 of the first inode",
    );
    pc.same2(
        &read(c_ino, 190, 30, 0),
        &read(o_ino, 190, 30, 0),
        "read across a file boundary",
    );
    pc.same2(
        &read(c_ino, 0, 0, 0),
        &read(o_ino, 0, 0, 0),
        "read maxlen 0",
    );
    pc.same2(
        &read(c_ino, 0, 4_194_304, 0),
        &read(o_ino, 0, 4_194_304, 0),
        "read maxlen 4 MiB",
    );
    pc.same2(
        &read(c_ino, 0, 4_194_305, 0),
        &read(o_ino, 0, 4_194_305, 0),
        "read maxlen 4 MiB + 1",
    );
    pc.same2(
        &read(c_ino, 0, u64::MAX, 0),
        &read(o_ino, 0, u64::MAX, 0),
        "read maxlen u64::MAX",
    );
    pc.same2(
        &read(c_ino, 0, 10, 1),
        &read(o_ino, 0, 10, 1),
        "read with flags 1",
    );
    pc.same2(
        &read(c_ino, 0, 4_194_305, 1),
        &read(o_ino, 0, 4_194_305, 1),
        "read: maxlen checked before flags",
    );
    // Unknown inode: reads from `offset` in the oldest backup when it exists...
    let unknown = 0x7fff_0000_dead_beef;
    pc.same(
        &read(unknown, 3, 10_000, 0),
        "read unknown inode, oldest backup present",
    );
    pc.same(
        &read(unknown, 10_000, 50, 0),
        "read unknown inode, offset past the oldest backup",
    );
    // ... and fails with EBADF when it does not.
    fs::remove_file(pair.c.host_path(format!("{vm1}.1"))).unwrap();
    fs::remove_file(pair.ours.host_path(format!("{vm1}.1"))).unwrap();
    pc.same(
        &read(unknown, 3, 10_000, 0),
        "read unknown inode, oldest backup missing",
    );
    pc.same(
        &log_call(
            DOMAIN_READ_LOG_FILE,
            9,
            &args::log_read("/var/log/libvirt/qemu/never.log", 1, 0, 100, 0),
        ),
        "read a path that never existed",
    );
    pc.same(
        &log_call(
            DOMAIN_READ_LOG_FILE,
            9,
            &args::log_read("/nonexistent-dir/never.log", 1, 0, 100, 0),
        ),
        "read in a missing directory",
    );

    // Append: open path (rotates through the same writer), not-open path, flags.
    pc.ok(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            10,
            &args::log_append(vm1, b"appended 1\n", 0),
        ),
        "append to an open log",
    );
    pc.ok(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            10,
            &args::log_append(vm1, &lines(2, 40, b'd'), 0),
        ),
        "append forcing a rotation",
    );
    assert_eq!(pair.same_log(vm1).len(), 3);
    pc.ok(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            11,
            &args::log_append(vm3, b"created by append\n", 0),
        ),
        "append to a path not open",
    );
    pc.ok(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            11,
            &args::log_append(vm3, &[b'e'; 250], 0),
        ),
        "append > max_size to a path not open",
    );
    pair.same_log(vm3);
    pc.ok(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            11,
            &args::log_append(vm3, b"nul\0ignored", 0),
        ),
        "append with an embedded NUL",
    );
    pair.same_log(vm3);
    pc.error(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            12,
            &args::log_append(vm3, b"x\n", 2),
        ),
        "append with flags 2",
    );
    pc.same(
        &log_call(
            DOMAIN_APPEND_LOG_FILE,
            12,
            &args::log_append("/nonexistent-dir/a.log", b"x\n", 0),
        ),
        "append in a missing directory",
    );

    // A NUL in the log ends ReadLogFile's data.
    let (c2_ino, _) = log_position(&c2.bytes).unwrap();
    let (o2_ino, _) = log_position(&o2.bytes).unwrap();
    write_both(&c2.fds[0], &o2.fds[0], b"abc\0def\n");
    pc.ok(
        &log_call(
            DOMAIN_GET_LOG_FILE_POSITION,
            13,
            &args::log_position(vm2, 0),
        ),
        "position vm2",
    );
    let r2 = |ino| {
        log_call(
            DOMAIN_READ_LOG_FILE,
            14,
            &args::log_read(vm2, ino, 0, 1000, 0),
        )
    };
    pc.same2(&r2(c2_ino), &r2(o2_ino), "read stops at NUL");
    pair.same_log(vm2);

    // Protocol-level cases on the log program.
    let valid = args::log_position(vm1, 0);
    protocol_cases(&pair, LOG, DOMAIN_GET_LOG_FILE_POSITION, &valid);
    passed_fd_is_closed(&pair, LOG, DOMAIN_GET_LOG_FILE_POSITION, &valid);
    closing_cases(&pair, LOG, DOMAIN_GET_LOG_FILE_POSITION, &valid);

    // After all of that the open pipe still works, on both.
    write_both(c_pipe, o_pipe, b"still logging\n");
    let mut pc = pair.connect();
    pc.ok(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 0, &args::log_position(vm1, 0)),
        "position after the bad clients",
    );
    pair.same_log(vm1);

    // QEMU goes away: EOF closes the log; reopen without and with TRUNCATE.
    drop(c1);
    drop(o1);
    wait_log_closed(&pair.c, vm1);
    wait_log_closed(&pair.ours, vm1);
    pc.error(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 1, &args::log_position(vm1, 0)),
        "position after EOF",
    );
    let (c3, o3) = pc.ok(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            2,
            &args::log_open("qemu", UUID, "vm1", vm1, 0),
        ),
        "reopen without TRUNCATE",
    );
    assert_ne!(log_position(&o3.bytes).unwrap().1, 0);
    drop((c3, o3));
    wait_log_closed(&pair.c, vm1);
    wait_log_closed(&pair.ours, vm1);
    pc.ok(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            3,
            &args::log_open("qemu", UUID, "vm1", vm1, 1),
        ),
        "reopen with TRUNCATE",
    );
    assert_eq!(pair.same_log(vm1), [Some(0), None, None]);
}

/// A log file that was already larger than max_size when opened is rotated before the
/// first byte (virtlogd.md §3.3), and a config with max_backups = 0 discards old data.
#[test]
fn virtlogd_differential_oversize_and_no_backups() {
    use lg::proc_::*;
    let pair = Pair::start(Service::Virtlogd, "max_size = 100\nmax_backups = 0\n");
    let p = "/var/log/libvirt/qemu/big.log";
    for d in [&pair.c, &pair.ours] {
        fs::write(d.host_path(p), vec![b'o'; 150]).unwrap();
    }
    let mut pc = pair.connect();
    let (c, o) = pc.ok(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            0,
            &args::log_open("qemu", UUID, "big", p, 0),
        ),
        "open oversize",
    );
    write_both(&c.fds[0], &o.fds[0], &lines(3, 30, b'x'));
    pc.ok(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 1, &args::log_position(p, 0)),
        "pos",
    );
    pair.same_log(p);
    write_both(&c.fds[0], &o.fds[0], &lines(2, 30, b'y'));
    pc.ok(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 1, &args::log_position(p, 0)),
        "pos",
    );
    pair.same_log(p);
    // With max_backups 0 the oldest slot is the file itself.
    pc.same(
        &log_call(
            DOMAIN_READ_LOG_FILE,
            2,
            &args::log_read(p, 0x7fff_0000_0000_0001, 5, 1000, 0),
        ),
        "read unknown inode, no backups",
    );
}

/// max_backups above 32: the daemon starts, but open/read/append fail with error 67.
#[test]
fn virtlogd_differential_too_many_backups() {
    use lg::proc_::*;
    let pair = Pair::start(Service::Virtlogd, "max_backups = 40\n");
    let p = "/var/log/libvirt/qemu/b.log";
    let mut pc = pair.connect();
    pc.error(
        &log_call(
            DOMAIN_OPEN_LOG_FILE,
            0,
            &args::log_open("qemu", UUID, "b", p, 0),
        ),
        "open with max_backups 40",
    );
    pc.error(
        &log_call(DOMAIN_READ_LOG_FILE, 1, &args::log_read(p, 1, 0, 10, 0)),
        "read with max_backups 40",
    );
    pc.error(
        &log_call(DOMAIN_APPEND_LOG_FILE, 2, &args::log_append(p, b"x\n", 0)),
        "append with max_backups 40",
    );
    pc.error(
        &log_call(DOMAIN_GET_LOG_FILE_POSITION, 3, &args::log_position(p, 0)),
        "position with max_backups 40",
    );
}

// ------------------------------------------------------------------------------------
// virtlockd
// ------------------------------------------------------------------------------------

const LS: &str = "/var/lib/libvirt/lockd/files";

fn reg(serial: u32, name: &str, id: u32, pid: u32, flags: u32) -> Vec<u8> {
    lock_call(
        lk::proc_::REGISTER,
        serial,
        &args::lock_register([0xab; 16], name, id, pid, flags),
    )
}

fn res(proc_: i32, serial: u32, path: &str, name: &str, flags: u32) -> Vec<u8> {
    lock_call(proc_, serial, &args::lock_resource(path, name, flags))
}

fn exists(d: &Daemon, p: &str) -> bool {
    d.host_path(p).exists()
}

#[track_caller]
fn both_exist(pair: &Pair, p: &str) -> bool {
    let (c, o) = (exists(&pair.c, p), exists(&pair.ours, p));
    assert_eq!(c, o, "{p} exists: C vs ours");
    o
}

#[test]
fn virtlockd_differential() {
    use lk::proc_::*;
    // Owner pids are arbitrary numbers that are not the peer pid of any connection here
    // (never this test's pid), so closing connections releases nothing and kills nothing.
    let (pid_a, pid_b) = (0x7fff_0001, 0x7fff_0002);
    let pair = Pair::start(Service::Virtlockd, "");

    // Before REGISTER.
    let mut u = pair.connect();
    for (p, what) in [
        (RESTRICT, "restrict before register"),
        (NEW, "new before register"),
        (CREATE_RESOURCE, "create before register"),
        (DELETE_RESOURCE, "delete before register"),
        (ACQUIRE_RESOURCE, "acquire before register"),
        (RELEASE_RESOURCE, "release before register"),
    ] {
        let args = match p {
            RESTRICT => args::lock_flags(0),
            NEW => args::lock_new("/var/lib/libvirt/lockd/new", 0),
            _ => args::lock_resource(LS, "r", 0),
        };
        let e = u.error(&lock_call(p, 0, &args), what);
        assert_eq!(
            (e.code, e.domain),
            (code::OPERATION_INVALID, domain::RPC),
            "{what}"
        );
    }
    // Flags are checked before registration.
    u.error(
        &lock_call(RESTRICT, 1, &args::lock_flags(1)),
        "restrict flags 1, unregistered",
    );
    u.error(
        &res(ACQUIRE_RESOURCE, 1, LS, "r", 4),
        "acquire flags 4, unregistered",
    );
    u.error(
        &res(ACQUIRE_RESOURCE, 1, LS, "r", 7),
        "acquire flags 7, unregistered",
    );
    u.error(
        &res(RELEASE_RESOURCE, 1, LS, "r", 1),
        "release flags 1, unregistered",
    );
    u.error(
        &res(CREATE_RESOURCE, 1, LS, "r", 2),
        "create flags 2, unregistered",
    );
    u.error(
        &res(DELETE_RESOURCE, 1, LS, "r", 0x8000_0000),
        "delete flags 2^31, unregistered",
    );
    u.error(
        &lock_call(NEW, 1, &args::lock_new("/x", 1)),
        "new flags 1, unregistered",
    );
    // REGISTER checks: flags, id 0.
    u.error(&reg(2, "vm-a", 1, pid_a, 1), "register flags 1");
    let e = u.error(&reg(2, "vm-a", 0, pid_a, 0), "register id 0");
    assert_eq!(e.code, code::OPERATION_INVALID);

    // Lockspaces: CREATE_LOCKSPACE needs no registration; twice is fine; "" exists.
    u.ok(
        &lock_call(CREATE_LOCKSPACE, 3, &args::lock_create_lockspace(LS)),
        "create lockspace",
    );
    u.ok(
        &lock_call(CREATE_LOCKSPACE, 4, &args::lock_create_lockspace(LS)),
        "create lockspace twice",
    );
    u.ok(
        &lock_call(CREATE_LOCKSPACE, 4, &args::lock_create_lockspace("")),
        "create lockspace \"\"",
    );
    assert!(both_exist(&pair, LS));
    for d in [&pair.c, &pair.ours] {
        fs::write(d.host_path("/var/lib/libvirt/lockd/afile"), b"").unwrap();
    }
    u.error(
        &lock_call(
            CREATE_LOCKSPACE,
            5,
            &args::lock_create_lockspace("/var/lib/libvirt/lockd/afile"),
        ),
        "create lockspace on a file",
    );
    u.same(
        &lock_call(
            CREATE_LOCKSPACE,
            5,
            &args::lock_create_lockspace("/var/lib/libvirt/lockd/afile/sub"),
        ),
        "create lockspace under a file",
    );
    u.same(
        &lock_call(CREATE_LOCKSPACE, 6, &[]),
        "create lockspace: empty payload",
    );

    // Registered owner A.
    let mut a = pair.connect();
    a.ok(&reg(0, "vm-a", 1, pid_a, 0), "register A");
    a.ok(
        &reg(1, "vm-a", 1, pid_a, 0),
        "register A again (allowed in 9.0)",
    );
    // NEW.
    a.error(&lock_call(NEW, 2, &args::lock_new("", 0)), "new \"\"");
    a.error(
        &lock_call(NEW, 2, &args::lock_new(LS, 0)),
        "new on an existing lockspace",
    );
    a.ok(
        &lock_call(NEW, 2, &args::lock_new("/var/lib/libvirt/lockd/new", 0)),
        "new lockspace",
    );
    assert!(both_exist(&pair, "/var/lib/libvirt/lockd/new"));
    a.error(
        &lock_call(NEW, 2, &args::lock_new("/var/lib/libvirt/lockd/new", 0)),
        "new twice",
    );
    // Missing lockspace.
    for p in [
        CREATE_RESOURCE,
        DELETE_RESOURCE,
        ACQUIRE_RESOURCE,
        RELEASE_RESOURCE,
    ] {
        a.error(
            &res(p, 3, "/no/such/lockspace", "r", 0),
            &format!("proc {p} in a missing lockspace"),
        );
    }
    // CREATE / DELETE.
    a.ok(&res(CREATE_RESOURCE, 4, LS, "c1", 0), "create resource");
    assert!(both_exist(&pair, &format!("{LS}/c1")));
    a.ok(
        &res(CREATE_RESOURCE, 4, LS, "c1", 0),
        "create resource again",
    );
    a.ok(&res(DELETE_RESOURCE, 5, LS, "c1", 0), "delete resource");
    assert!(!both_exist(&pair, &format!("{LS}/c1")));
    a.ok(
        &res(DELETE_RESOURCE, 5, LS, "c1", 0),
        "delete a missing resource",
    );
    // ACQUIRE without AUTOCREATE on a missing file.
    a.error(
        &res(ACQUIRE_RESOURCE, 6, LS, "missing", 0),
        "acquire a missing file without AUTOCREATE",
    );
    a.error(
        &res(ACQUIRE_RESOURCE, 6, LS, "missing", 1),
        "acquire shared a missing file without AUTOCREATE",
    );
    // Exclusive AUTOCREATE.
    a.ok(
        &res(ACQUIRE_RESOURCE, 7, LS, "x1", 2),
        "acquire x1 exclusive",
    );
    assert!(both_exist(&pair, &format!("{LS}/x1")));
    a.error(
        &res(ACQUIRE_RESOURCE, 8, LS, "x1", 2),
        "acquire x1 twice, same owner",
    );
    a.error(
        &res(ACQUIRE_RESOURCE, 8, LS, "x1", 3),
        "acquire x1 shared while exclusive",
    );
    a.error(
        &res(CREATE_RESOURCE, 8, LS, "x1", 0),
        "create a held resource",
    );
    a.error(
        &res(DELETE_RESOURCE, 8, LS, "x1", 0),
        "delete a held resource",
    );
    // A second owner.
    let mut b = pair.connect();
    b.ok(&reg(0, "vm-b", 2, pid_b, 0), "register B");
    b.error(
        &res(ACQUIRE_RESOURCE, 1, LS, "x1", 2),
        "B acquires x1: busy",
    );
    b.error(&res(RELEASE_RESOURCE, 2, LS, "x1", 0), "B releases A's x1");
    b.error(
        &res(RELEASE_RESOURCE, 2, LS, "never", 0),
        "B releases a resource never held",
    );
    // Shared holders.
    a.ok(
        &res(ACQUIRE_RESOURCE, 9, LS, "s1", 3),
        "A acquires s1 shared",
    );
    b.ok(
        &res(ACQUIRE_RESOURCE, 3, LS, "s1", 1),
        "B acquires s1 shared (no AUTOCREATE)",
    );
    b.ok(
        &res(ACQUIRE_RESOURCE, 3, LS, "s1", 1),
        "B acquires s1 shared again",
    );
    a.error(
        &res(ACQUIRE_RESOURCE, 10, LS, "s1", 2),
        "A acquires s1 exclusive while shared",
    );
    a.error(&res(DELETE_RESOURCE, 10, LS, "s1", 0), "delete shared s1");
    a.ok(&res(RELEASE_RESOURCE, 11, LS, "s1", 0), "A releases s1");
    assert!(both_exist(&pair, &format!("{LS}/s1")), "still held by B");
    b.ok(
        &res(RELEASE_RESOURCE, 4, LS, "s1", 0),
        "B releases s1 (1 of 2)",
    );
    b.ok(
        &res(RELEASE_RESOURCE, 4, LS, "s1", 0),
        "B releases s1 (2 of 2)",
    );
    assert!(
        !both_exist(&pair, &format!("{LS}/s1")),
        "last release unlinks"
    );
    b.error(
        &res(RELEASE_RESOURCE, 4, LS, "s1", 0),
        "B releases s1 once more",
    );
    a.ok(&res(RELEASE_RESOURCE, 12, LS, "x1", 0), "A releases x1");
    assert!(!both_exist(&pair, &format!("{LS}/x1")));
    // Non-AUTOCREATE files survive release.
    a.ok(&res(CREATE_RESOURCE, 13, LS, "keep", 0), "create keep");
    a.ok(&res(ACQUIRE_RESOURCE, 13, LS, "keep", 0), "acquire keep");
    a.ok(&res(RELEASE_RESOURCE, 13, LS, "keep", 0), "release keep");
    assert!(both_exist(&pair, &format!("{LS}/keep")));
    // The default lockspace: the name is the (absolute) path.
    let img = "/var/lib/libvirt/lockd/disk.img";
    for d in [&pair.c, &pair.ours] {
        fs::write(d.host_path(img), b"image").unwrap();
    }
    a.ok(
        &res(ACQUIRE_RESOURCE, 14, "", img, 0),
        "acquire a disk image directly",
    );
    b.error(
        &res(ACQUIRE_RESOURCE, 5, "", img, 1),
        "B acquires the image shared: busy",
    );
    a.ok(&res(RELEASE_RESOURCE, 15, "", img, 0), "release the image");
    assert_eq!(pair.same_file(img).unwrap(), b"image");
    a.error(
        &res(
            ACQUIRE_RESOURCE,
            16,
            "",
            "/var/lib/libvirt/lockd/none.img",
            0,
        ),
        "acquire a missing image",
    );
    // Owner pid 0 is allowed.
    let mut z = pair.connect();
    z.ok(&reg(0, "vm-z", 3, 0, 0), "register with pid 0");
    z.ok(
        &res(ACQUIRE_RESOURCE, 1, LS, "z", 2),
        "acquire with owner pid 0",
    );
    z.ok(
        &res(RELEASE_RESOURCE, 2, LS, "z", 0),
        "release with owner pid 0",
    );

    // RESTRICT: everything is refused afterwards, even with bad flags? (flags first).
    let mut r = pair.connect();
    r.ok(&reg(0, "vm-r", 4, 0x7fff_0003, 0), "register R");
    r.ok(&lock_call(RESTRICT, 1, &args::lock_flags(0)), "restrict");
    r.error(
        &lock_call(RESTRICT, 2, &args::lock_flags(0)),
        "restrict twice",
    );
    r.error(
        &lock_call(RESTRICT, 2, &args::lock_flags(1)),
        "restrict flags 1 after restrict",
    );
    r.error(
        &reg(3, "vm-r", 4, 0x7fff_0003, 0),
        "register after restrict",
    );
    r.error(
        &reg(3, "vm-r", 0, 0x7fff_0003, 0),
        "register id 0 after restrict",
    );
    r.error(
        &lock_call(NEW, 4, &args::lock_new("/var/lib/libvirt/lockd/n2", 0)),
        "new after restrict",
    );
    r.error(
        &lock_call(CREATE_LOCKSPACE, 4, &args::lock_create_lockspace(LS)),
        "create lockspace after restrict",
    );
    for p in [
        CREATE_RESOURCE,
        DELETE_RESOURCE,
        ACQUIRE_RESOURCE,
        RELEASE_RESOURCE,
    ] {
        r.error(&res(p, 5, LS, "r", 0), &format!("proc {p} after restrict"));
        r.error(
            &res(p, 5, "/no/such", "r", 0),
            &format!("proc {p} after restrict, missing lockspace"),
        );
    }
    r.error(
        &res(ACQUIRE_RESOURCE, 5, LS, "r", 8),
        "acquire bad flags after restrict",
    );

    // Protocol-level cases on the lock program.
    let valid = args::lock_create_lockspace(LS);
    protocol_cases(&pair, LOCK, CREATE_LOCKSPACE, &valid);
    passed_fd_is_closed(&pair, LOCK, CREATE_LOCKSPACE, &valid);
    closing_cases(&pair, LOCK, CREATE_LOCKSPACE, &valid);
    // A lease held before the bad clients is still held afterwards.
    a.ok(&res(ACQUIRE_RESOURCE, 17, LS, "held", 2), "acquire held");
    closing_cases(&pair, LOCK, CREATE_LOCKSPACE, &valid);
    b.error(
        &res(ACQUIRE_RESOURCE, 6, LS, "held", 2),
        "held is still held",
    );
    a.ok(&res(RELEASE_RESOURCE, 18, LS, "held", 0), "release held");
}

/// The deliberate improvement: names that leave a directory lockspace. 9.0 joins them to
/// the directory; ours refuses them with INVALID_ARG / LOCKSPACE. Everything else about
/// these calls (checks before the name is looked at) is the same.
#[test]
fn virtlockd_names_escaping_the_lockspace_deliberate_difference() {
    use lk::proc_::*;
    let pair = Pair::start(Service::Virtlockd, "");
    let mut pc = pair.connect();
    pc.ok(
        &lock_call(CREATE_LOCKSPACE, 0, &args::lock_create_lockspace(LS)),
        "create lockspace",
    );
    pc.ok(&reg(1, "vm", 1, 0x7fff_0009, 0), "register");
    for (i, name) in ["../escape", "sub/x", "..", "a/../b"].iter().enumerate() {
        for p in [CREATE_RESOURCE, ACQUIRE_RESOURCE] {
            let call = res(
                p,
                2 + i as u32,
                LS,
                name,
                if p == ACQUIRE_RESOURCE { 2 } else { 0 },
            );
            let c = pc.c.roundtrip(&call, "C");
            let o = pc.ours.roundtrip(&call, "ours");
            let oe = o
                .error()
                .unwrap_or_else(|| panic!("ours accepted {name:?}: {}", describe(&o.bytes)));
            assert_eq!(
                (oe.code, oe.domain),
                (code::INVALID_ARG, domain::LOCKSPACE),
                "{name:?}"
            );
            // 9.0: "sub/x" fails only because the subdirectory does not exist; the others
            // are joined blindly and succeed (".." locks the parent directory itself with
            // CREATE failing on it as a directory, a/../b is LS/b).
            eprintln!("C for proc {p} {name:?}: {}", describe(&c.bytes));
        }
    }
    // C created the escaping lock file outside the lockspace; ours did not.
    assert!(
        exists(&pair.c, "/var/lib/libvirt/lockd/escape"),
        "9.0 writes outside the lockspace"
    );
    assert!(!exists(&pair.ours, "/var/lib/libvirt/lockd/escape"));
    // Flags and registration are still checked first, identically.
    pc.error(
        &res(ACQUIRE_RESOURCE, 9, LS, "../escape", 4),
        "bad flags before the name check",
    );
    let mut u = pair.connect();
    u.error(
        &res(ACQUIRE_RESOURCE, 0, LS, "../escape", 2),
        "unregistered before the name check",
    );
    u.error(
        &res(ACQUIRE_RESOURCE, 0, "/no/such", "../escape", 2),
        "missing lockspace before the name check",
    );
    // Releasing such a name (never held) is the same "not locked" on both.
    pc.error(
        &res(RELEASE_RESOURCE, 10, LS, "sub/x", 0),
        "release an escaping name never held",
    );
    let _ = Path::new("/");
}
