//! virtlogd hardening (issue 13), through the real daemon over its sockets:
//!
//! * a call stuck on a file that really blocks holds up only its own client; FIFOs, on
//!   which 9.0 hangs, are refused;
//! * a rollover that keeps failing loses nothing, and resumes once the obstacle goes;
//! * error texts and the over-long-path limit are 9.0's (compared with the C daemon);
//! * log paths that are not UTF-8 are refused by OpenLogFile (the re-exec state could
//!   not name them), and work byte-exact everywhere else.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use vh_common::error::{code, domain, MESSAGE_STRING_MAX};
use vh_common::xdr::{Decoder, Encoder};
use vh_tests::*;
use virtlogd::protocol as lg;

const UUID: [u8; 16] = [0x42; 16];
const QEMU_DIR: &str = "/var/log/libvirt/qemu";

fn open_call(path: &[u8], flags: u32) -> Vec<u8> {
    let mut e = Encoder::new();
    lg::OpenLogFileArgs {
        driver: "qemu".into(),
        dom: lg::Domain {
            uuid: UUID,
            name: "vm".into(),
        },
        path: path.to_vec(),
        flags,
    }
    .encode(&mut e);
    log_call(lg::proc_::DOMAIN_OPEN_LOG_FILE, 1, e.as_bytes())
}

fn position_call(path: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    lg::GetLogFilePositionArgs {
        path: path.to_vec(),
        flags: 0,
    }
    .encode(&mut e);
    log_call(lg::proc_::DOMAIN_GET_LOG_FILE_POSITION, 2, e.as_bytes())
}

fn read_call(path: &[u8], inode: u64, offset: u64, maxlen: u64) -> Vec<u8> {
    let mut e = Encoder::new();
    lg::ReadLogFileArgs {
        path: path.to_vec(),
        pos: lg::LogFilePosition { inode, offset },
        maxlen,
        flags: 0,
    }
    .encode(&mut e);
    log_call(lg::proc_::DOMAIN_READ_LOG_FILE, 3, e.as_bytes())
}

fn append_call(path: &[u8], message: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new();
    lg::AppendLogFileArgs {
        driver: "qemu".into(),
        dom: lg::Domain {
            uuid: UUID,
            name: "vm".into(),
        },
        path: path.to_vec(),
        message: message.to_vec(),
        flags: 0,
    }
    .encode(&mut e);
    log_call(lg::proc_::DOMAIN_APPEND_LOG_FILE, 4, e.as_bytes())
}

/// The data of a ReadLogFile reply.
fn read_data(f: &Frame) -> Vec<u8> {
    Decoder::new(f.payload())
        .string_lossless(usize::MAX)
        .unwrap_or_else(|e| panic!("ReadLogFile reply: {e}: {}", describe(&f.bytes)))
}

fn write_fd(fd: &OwnedFd, data: &[u8]) {
    let mut f = fs::File::from(fd.try_clone().expect("dup pipe"));
    f.write_all(data).expect("write into the log pipe");
}

/// Numbered lines, so that a lost, doubled or misplaced piece shows.
fn numbered(from: usize, bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes + 64);
    let mut i = from;
    while v.len() < bytes {
        v.extend_from_slice(format!("line {i:09} of the rollover test\n").as_bytes());
        i += 1;
    }
    v.truncate(bytes);
    v
}

// ------------------------------------------------------------------------------------
// 1. A stuck path stalls only its own client
// ------------------------------------------------------------------------------------

/// A write lease (fcntl F_SETLEASE) held by the test on a log file. It is the honest
/// way to make open(2) of a *regular* file block: a lease holder is told (by a signal)
/// that someone else opens the file, and the opener waits in the kernel until the
/// holder lets go, or `fs.lease-break-time` (45 s by default) passes. Samba and NFS
/// servers take leases on the files they export, so a log opened by libvirt can meet
/// one. 9.0 would sit in that open with its only event loop, taking every client and
/// the admin socket with it.
struct Lease {
    file: fs::File,
}

/// Linux's F_SETSIG (`<asm-generic/fcntl.h>`), which the libc crate does not export.
const F_SETSIG: libc::c_int = 10;

impl Lease {
    fn take(path: &Path) -> Lease {
        let file = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let fd = file.as_raw_fd();
        // The break notice is SIGIO by default, which would kill the test; SIGURG is
        // ignored by default.
        // SAFETY: plain fcntl calls on an fd we own; no memory is passed.
        let r = unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGURG) };
        assert_eq!(r, 0, "F_SETSIG: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) };
        assert_eq!(
            r,
            0,
            "F_SETLEASE on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Lease { file }
    }

    fn release(self) {
        // SAFETY: plain fcntl call on an fd we own.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        assert_eq!(r, 0, "F_UNLCK: {}", std::io::Error::last_os_error());
    }
}

/// How many opens by process `pid` wait on a lease break right now, from /proc/locks:
/// a waiter is listed under the lease it waits for, as ` -> LEASE ... <pid> ...`.
fn lease_waiters(pid: u32) -> usize {
    let locks = fs::read_to_string("/proc/locks").expect("read /proc/locks");
    locks
        .lines()
        .filter(|l| l.contains("->") && l.contains("LEASE"))
        .filter(|l| l.split_whitespace().any(|w| w == pid.to_string()))
        .count()
}

/// More calls stuck than the daemon has runtime workers (at most 4): before the fix,
/// each stuck call held a worker, and with all of them held nobody was answered.
const STUCK: usize = 6;

#[test]
fn a_call_stuck_on_a_file_holds_up_only_its_own_client() {
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, "");
    let paths: Vec<String> = (0..STUCK)
        .map(|i| format!("{QEMU_DIR}/leased{i}.log"))
        .collect();
    let mut leases = Vec::new();
    let mut inodes = Vec::new();
    for p in &paths {
        let host = d.host_path(p);
        fs::write(&host, b"before the lease\n").unwrap();
        inodes.push(fs::metadata(&host).unwrap().ino());
        leases.push(Lease::take(&host));
    }
    // Half the stuck calls are OpenLogFile, half ReadLogFile.
    let mut stuck = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let mut c = d.connect();
        let call = if i % 2 == 0 {
            open_call(p.as_bytes(), 0)
        } else {
            read_call(p.as_bytes(), inodes[i], 0, 1000)
        };
        c.send(&call).unwrap();
        stuck.push(c);
    }
    // Proof that they are stuck where 9.0 would be: in open(2), in the kernel.
    wait_until("every leased open waits in the kernel", || {
        lease_waiters(d.pid()) == STUCK
    });

    // Meanwhile another client is served, on every procedure...
    let free = format!("{QEMU_DIR}/free.log");
    let mut c = d.connect();
    let f = c.roundtrip(&open_call(free.as_bytes(), 0), "open a free log");
    expect_ok(&f, "open a free log");
    let (free_inode, _) = log_position(&f.bytes).unwrap();
    write_fd(&f.fds[0], b"hello\n");
    let pos = c.roundtrip(&position_call(free.as_bytes()), "position");
    expect_ok(&pos, "position of the free log");
    assert_eq!(log_position(&pos.bytes).map(|p| p.1), Some(6));
    let r = c.roundtrip(&read_call(free.as_bytes(), free_inode, 0, 100), "read");
    expect_ok(&r, "read the free log");
    assert_eq!(read_data(&r), b"hello\n");
    let a = c.roundtrip(&append_call(free.as_bytes(), b"note\n"), "append");
    expect_ok(&a, "append to the free log");
    assert_eq!(fs::read(d.host_path(&free)).unwrap(), b"hello\nnote\n");
    // ... and so is the admin socket, libvirt's program and ours.
    let mut admin = d.connect_admin();
    let mut e = Encoder::new();
    e.u32(0);
    let open = admin.roundtrip(
        &call_frame(
            vh_common::admin::ADMIN_PROGRAM,
            1,
            vh_common::admin::proc_::CONNECT_OPEN,
            1,
            e.as_bytes(),
        ),
        "admin connect open",
    );
    expect_ok(&open, "admin connect open");
    let servers = admin.roundtrip(
        &call_frame(
            vh_common::admin::ADMIN_PROGRAM,
            1,
            vh_common::admin::proc_::CONNECT_LIST_SERVERS,
            2,
            &[0, 0, 0, 16, 0, 0, 0, 0],
        ),
        "admin list servers",
    );
    expect_ok(&servers, "admin list servers");
    let list = admin.roundtrip(
        &call_frame(
            virtlogd::inspect::PROGRAM,
            1,
            virtlogd::inspect::proc_::LIST_LOGS,
            3,
            &[],
        ),
        "inspect list logs",
    );
    expect_ok(&list, "inspect list logs");
    let logs = virtlogd::inspect::LogEntry::decode_list(list.payload()).unwrap();
    assert_eq!(logs.len(), 1, "only the free log is open yet");
    // The stuck calls are still waiting, none answered.
    assert_eq!(lease_waiters(d.pid()), STUCK);

    // The lease holders let go: every stuck call completes normally.
    for l in leases {
        l.release();
    }
    for (i, mut c) in stuck.into_iter().enumerate() {
        let f = c.recv_ok("stuck call, after the lease");
        expect_ok(&f, &format!("stuck call {i}"));
        if i % 2 == 0 {
            assert_eq!(f.fds.len(), 1, "OpenLogFile passes the pipe");
        } else {
            assert_eq!(read_data(&f), b"before the lease\n");
        }
    }
}

/// OpenLogFile, ReadLogFile and AppendLogFile on a FIFO: 9.0 blocks in open(2) until
/// the FIFO's other end is opened (for ever, and every client with it); ours refuses
/// at once with a clear error, with or without a peer.
#[test]
fn fifos_are_refused_with_a_clear_error() {
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, "");
    let fifo = format!("{QEMU_DIR}/vm.fifo");
    nix::unistd::mkfifo(
        &d.host_path(&fifo),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    let mut c = d.connect();
    let check = |f: Frame, what: &str| {
        let e = expect_error(&f, what);
        assert_eq!(
            (e.code, e.domain),
            (code::INVALID_ARG, domain::LOGGING),
            "{what}"
        );
        let msg = e.message.unwrap_or_default();
        assert_eq!(
            msg,
            format!(
                "invalid argument: {fifo} is a FIFO, not a log file: a FIFO blocks until its \
                 other end is opened"
            ),
            "{what}"
        );
    };
    check(
        c.roundtrip(&open_call(fifo.as_bytes(), 0), "open"),
        "open a FIFO",
    );
    check(
        c.roundtrip(&read_call(fifo.as_bytes(), 0, 0, 100), "read"),
        "read a FIFO",
    );
    check(
        c.roundtrip(&append_call(fifo.as_bytes(), b"x\n"), "append"),
        "append to a FIFO",
    );
    // With a reader at the other end the open would not block, but the log would
    // still be a pipe nobody can read back: refused the same way.
    let _reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(d.host_path(&fifo))
        .expect("open the FIFO for reading");
    check(
        c.roundtrip(&open_call(fifo.as_bytes(), 0), "open"),
        "open a FIFO that has a reader",
    );
    assert!(c.alive());
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

// ------------------------------------------------------------------------------------
// 2. A rollover that keeps failing
// ------------------------------------------------------------------------------------

const SMALL: usize = 65_536;

/// The backup's name is taken by a non-empty directory, so every rollover fails
/// (rename over a directory: EISDIR; root is not stopped by it as by permissions).
/// Several max_sizes of output all stay in the file, in order and with no marker of
/// loss; once the directory is gone the next rollover happens, and the two files hold
/// everything. 9.0 closes the log at the first failure (QEMU then gets EPIPE).
#[test]
fn a_failing_rollover_loses_nothing_and_resumes() {
    let d = Daemon::spawn(
        DaemonKind::Ours,
        Service::Virtlogd,
        &format!("max_size = {SMALL}\nmax_backups = 1\n"),
    );
    let log = format!("{QEMU_DIR}/stuck-rollover.log");
    let backup = d.host_path(format!("{log}.0"));
    fs::create_dir(&backup).unwrap();
    fs::write(backup.join("in the way"), b"x").unwrap();

    let mut c = d.connect();
    let f = c.roundtrip(&open_call(log.as_bytes(), 0), "open");
    expect_ok(&f, "open");
    let (inode, _) = log_position(&f.bytes).unwrap();
    let pipe = f.fds.into_iter().next().unwrap();

    // Five max_sizes and a bit, written by a thread: the pipe holds less than that.
    let first = numbered(0, 5 * SMALL + 1234);
    let writer = {
        let pipe = pipe.try_clone().unwrap();
        let data = first.clone();
        std::thread::spawn(move || write_fd(&pipe, &data))
    };
    writer.join().expect("writer thread");
    let pos = c.roundtrip(&position_call(log.as_bytes()), "position");
    expect_ok(&pos, "position");
    assert_eq!(log_position(&pos.bytes), Some((inode, first.len() as u64)));
    let on_disk = fs::read(d.host_path(&log)).unwrap();
    assert!(on_disk == first, "every byte is in the file, in order");
    assert!(backup.is_dir(), "the obstacle is still there");
    assert!(
        d.stderr().contains("cannot roll the log over"),
        "the failure is logged; stderr:\n{}",
        d.stderr()
    );

    // The obstacle goes; another max_size of output brings the retry (a few KiB more:
    // the retry point is checked per 1 KiB piece of pipe data).
    fs::remove_dir_all(&backup).unwrap();
    let second = numbered(1_000_000, SMALL + 4096);
    write_fd(&pipe, &second);
    let pos = c.roundtrip(&position_call(log.as_bytes()), "position");
    expect_ok(&pos, "position after the obstacle went");
    let (new_inode, offset) = log_position(&pos.bytes).unwrap();
    assert_ne!(new_inode, inode, "rolled over");
    assert!(offset <= SMALL as u64);
    let old = fs::read(&backup).expect("the old file is the backup now");
    let new = fs::read(d.host_path(&log)).unwrap();
    assert_eq!(new.len() as u64, offset);
    let mut all = first.clone();
    all.extend_from_slice(&second);
    let mut got = old.clone();
    got.extend_from_slice(&new);
    assert!(got == all, "backup + log hold everything, in order");
    assert_eq!(old.len() as u64, fs::metadata(&backup).unwrap().len());
    assert_eq!(fs::metadata(&backup).unwrap().ino(), inode);
    // ReadLogFile from the first position walks both.
    let r = c.roundtrip(&read_call(log.as_bytes(), inode, 0, 4 << 20), "read all");
    expect_ok(&r, "read all");
    assert!(read_data(&r) == all, "ReadLogFile returns everything");
}

/// The retry also comes with time alone: after the obstacle goes, a log that only
/// gets a short line now and then rolls over within a few seconds (the retry interval
/// is 5 s), long before another max_size of data (which these lines would take minutes
/// to reach).
#[test]
fn a_failing_rollover_is_retried_with_time_alone() {
    let d = Daemon::spawn(
        DaemonKind::Ours,
        Service::Virtlogd,
        &format!("max_size = {SMALL}\nmax_backups = 1\n"),
    );
    let log = format!("{QEMU_DIR}/slow.log");
    let backup = d.host_path(format!("{log}.0"));
    fs::create_dir(&backup).unwrap();
    fs::write(backup.join("in the way"), b"x").unwrap();
    let mut c = d.connect();
    let f = c.roundtrip(&open_call(log.as_bytes(), 0), "open");
    expect_ok(&f, "open");
    let (inode, _) = log_position(&f.bytes).unwrap();
    let pipe = f.fds.into_iter().next().unwrap();
    let mut all = numbered(0, SMALL + 100);
    write_fd(&pipe, &all);
    let pos = c.roundtrip(&position_call(log.as_bytes()), "position");
    assert_eq!(log_position(&pos.bytes), Some((inode, all.len() as u64)));
    fs::remove_dir_all(&backup).unwrap();
    let mut tick = 0;
    wait_until("the stalled rollover is retried", || {
        let line = format!("tick {tick}\n");
        tick += 1;
        write_fd(&pipe, line.as_bytes());
        all.extend_from_slice(line.as_bytes());
        let pos = c.roundtrip(&position_call(log.as_bytes()), "position");
        log_position(&pos.bytes).is_some_and(|(i, _)| i != inode)
    });
    assert!(
        tick < SMALL / 8,
        "far less than another max_size was written"
    );
    let mut got = fs::read(&backup).expect("the old file is the backup now");
    got.extend_from_slice(&fs::read(d.host_path(&log)).unwrap());
    assert!(got == all, "backup + log hold everything, in order");
}

// ------------------------------------------------------------------------------------
// 3. Error texts and limits, against 9.0
// ------------------------------------------------------------------------------------

/// The same daemon twice, C 9.0 and ours.
struct Pair {
    c: Daemon,
    ours: Daemon,
}

impl Pair {
    fn start(config: &str) -> Pair {
        Pair {
            c: Daemon::spawn(DaemonKind::C, Service::Virtlogd, config),
            ours: Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, config),
        }
    }

    /// Sends `c_call` to C and `our_call` to ours (on fresh connections) and asserts the
    /// same outcome (replies byte for byte, or a close); returns ours.
    #[track_caller]
    fn same2(&self, c_call: &[u8], our_call: &[u8], what: &str) -> Outcome {
        let c = self.c.connect().outcome_after(c_call);
        let o = self.ours.connect().outcome_after(our_call);
        if c != o {
            let show = |o: &Outcome| match o {
                Outcome::Replied(v) | Outcome::Closed(v) | Outcome::Silent(v) => format!(
                    "{:?}: {}",
                    std::mem::discriminant(o),
                    v.iter().map(|f| describe(f)).collect::<Vec<_>>().join("\n")
                ),
            };
            panic!(
                "{what}: C and ours differ\nC:    {}\nours: {}",
                show(&c),
                show(&o)
            );
        }
        o
    }

    #[track_caller]
    fn same(&self, call: &[u8], what: &str) -> Outcome {
        self.same2(call, call, what)
    }

    fn both(&self, mut f: impl FnMut(&Daemon)) {
        f(&self.c);
        f(&self.ours);
    }
}

#[track_caller]
fn error_of(o: &Outcome, what: &str) -> RpcError {
    match o {
        Outcome::Replied(v) if v.len() == 1 => {
            let b = &v[0];
            let raw = vh_common::protocol::parse_body(&b[4..]).unwrap();
            RpcError::decode(&mut Decoder::new(&b[4 + raw.payload_offset..]))
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        }
        other => panic!("{what}: expected one error reply, got {other:?}"),
    }
}

#[test]
fn error_texts_match_9_0() {
    let pair = Pair::start("max_size = 200\nmax_backups = 2\n");
    let full = b"/dev/full";
    // A write that fails.
    let o = pair.same(&append_call(full, b"x\n"), "append to /dev/full");
    assert_eq!(
        error_of(&o, "append").message.as_deref(),
        Some("Unable to write to file /dev/full: No space left on device")
    );
    // An lseek that fails: a pty master cannot seek.
    let o = pair.same(&open_call(b"/dev/ptmx", 0), "open /dev/ptmx");
    assert_eq!(
        error_of(&o, "open ptmx").message.as_deref(),
        Some("Unable to determine current file offset: /dev/ptmx: Illegal seek")
    );
    // A read that fails names the file read (here the log path, a directory).
    let ino = |d: &Daemon| fs::metadata(d.host_path(QEMU_DIR)).unwrap().ino();
    let o = pair.same2(
        &read_call(QEMU_DIR.as_bytes(), ino(&pair.c), 0, 100),
        &read_call(QEMU_DIR.as_bytes(), ino(&pair.ours), 0, 100),
        "read a directory",
    );
    assert_eq!(
        error_of(&o, "read dir").message.as_deref(),
        Some("Unable to read from file /var/log/libvirt/qemu: Is a directory")
    );
    // TRUNCATE that cannot delete a backup.
    let log = format!("{QEMU_DIR}/t.log");
    pair.both(|d| {
        fs::create_dir(d.host_path(format!("{log}.1"))).unwrap();
        fs::write(d.host_path(format!("{log}.1/x")), b"x").unwrap();
    });
    let o = pair.same(&open_call(log.as_bytes(), lg::OPEN_TRUNCATE), "truncate");
    assert_eq!(
        error_of(&o, "truncate").message.as_deref(),
        Some(format!("Unable to delete file {log}.1: Is a directory").as_str())
    );
}

/// A path so long that the error text echoing it exceeds the XDR string limit
/// (4 MiB): 9.0 cannot encode the reply and closes the connection; one byte shorter,
/// the text fits and is sent.
#[test]
fn over_long_paths_close_the_connection_as_in_9_0() {
    let pair = Pair::start("");
    // "Unable to open file: " + path + ": File name too long"
    let overhead = "Unable to open file: ".len() + ": File name too long".len();
    let path = |len: usize| {
        let mut p = b"/".to_vec();
        p.resize(len, b'a');
        p
    };
    let fits = path(MESSAGE_STRING_MAX - overhead);
    let over = path(MESSAGE_STRING_MAX - overhead + 1);
    let o = pair.same(&open_call(&fits, 0), "open, error text of exactly 4 MiB");
    let e = error_of(&o, "fits");
    assert_eq!(e.message.map(|m| m.len()), Some(MESSAGE_STRING_MAX));
    let o = pair.same(&open_call(&over, 0), "open, error text 1 byte too long");
    assert_eq!(o, Outcome::Closed(Vec::new()));
    pair.same(&read_call(&over, 1, 0, 10), "read, error text too long");
    pair.same(&append_call(&over, b"x"), "append, error text too long");
    // "internal error: No open log file " + path
    let over = path(MESSAGE_STRING_MAX - "internal error: No open log file ".len() + 1);
    let o = pair.same(&position_call(&over), "position, error text too long");
    assert_eq!(o, Outcome::Closed(Vec::new()));
    // The daemons go on serving.
    for d in [&pair.c, &pair.ours] {
        assert!(d.connect().alive(), "{} still serves", d.label());
    }
}

// ------------------------------------------------------------------------------------
// 4. Paths that are not UTF-8
// ------------------------------------------------------------------------------------

/// What 9.0 does with such a log: it opens it, then cannot write its re-exec state
/// ("failed to convert virJSONValue to yajl data") and exits at the next SIGUSR1,
/// taking every log with it. The reason ours refuses the open instead.
#[test]
fn c_9_0_dies_at_reexec_with_a_non_utf8_log() {
    let mut d = Daemon::spawn(DaemonKind::C, Service::Virtlogd, "");
    let mut raw = format!("{QEMU_DIR}/vm-").into_bytes();
    raw.extend_from_slice(&[0xff, b'.', b'l', b'o', b'g']);
    let mut c = d.connect();
    let f = c.roundtrip(&open_call(&raw, 0), "open");
    expect_ok(&f, "9.0 opens a non-UTF-8 path");
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).unwrap();
    wait_until("9.0 exits at re-exec", || !d.is_running());
}

/// OpenLogFile refuses a path that is not UTF-8: the log would be named in the JSON
/// re-exec state, which cannot carry such bytes, and the next image would reopen a
/// different file. Nothing is created. AppendLogFile and ReadLogFile, which keep
/// nothing open, use the exact bytes.
#[test]
fn non_utf8_log_paths() {
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlogd, "");
    let mut raw = format!("{QEMU_DIR}/vm-").into_bytes();
    raw.extend_from_slice(&[0xff, 0xfe, b'.', b'l', b'o', b'g']);
    let host: PathBuf = d.host_path(Path::new(OsStr::from_bytes(&raw)));
    let mut c = d.connect();
    let f = c.roundtrip(&open_call(&raw, 0), "open");
    let e = expect_error(&f, "open a non-UTF-8 path");
    assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::LOGGING));
    let msg = e.message.unwrap_or_default();
    assert!(
        msg.starts_with("invalid argument: log file path ") && msg.contains("not valid UTF-8"),
        "{msg}"
    );
    assert!(!host.exists(), "nothing created");
    let f = c.roundtrip(&position_call(&raw), "position");
    expect_error(&f, "not open");

    let f = c.roundtrip(&append_call(&raw, b"exact bytes\n"), "append");
    expect_ok(&f, "append to a non-UTF-8 path");
    assert_eq!(fs::read(&host).unwrap(), b"exact bytes\n");
    let ino = fs::metadata(&host).unwrap().ino();
    let f = c.roundtrip(&read_call(&raw, ino, 0, 100), "read");
    expect_ok(&f, "read a non-UTF-8 path");
    assert_eq!(read_data(&f), b"exact bytes\n");
    // Exactly one file in the directory besides nothing else: no lossy twin.
    let names: Vec<_> = fs::read_dir(d.host_path(QEMU_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
