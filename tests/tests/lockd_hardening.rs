//! virtlockd hardening (issue 13), through our real daemon over its sockets:
//!
//! * one file is never held under two names, whatever lockspace or spelling reaches it,
//!   and no attempt through an alias drops the holder's lock (checked from this process,
//!   which is not the daemon, with `F_GETLK`);
//! * a FIFO is refused with a clear error instead of blocking the daemon;
//! * a call stuck on a file system that makes no progress holds up nobody else: the
//!   file system is a loop-mounted ext4 that the test freezes with `fsfreeze` (creating
//!   a file on a frozen file system blocks in the kernel until it is thawed, as on a dead
//!   NFS server), so the stuck call is a real blocked `open(2)`, not a test hook;
//! * resource names and lockspace paths that are not UTF-8 are refused, never converted
//!   (a converted name would lock a different file).
//!
//! Lockspace directories live in tempdirs under /tmp, outside the daemon's tmpfs mounts,
//! so this process sees the same files. Owners register fake pids (above pid_max), so
//! closing a connection never releases or kills anything.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use vh_common::admin;
use vh_common::error::{code, domain};
use vh_common::xdr::Encoder;
use vh_tests::*;
use virtlockd::inspect::{self, LockEntry};
use virtlockd::protocol as lk;

#[track_caller]
fn ok(conn: &mut Conn, bytes: &[u8], what: &str) {
    expect_ok(&conn.roundtrip(bytes, what), what);
}

#[track_caller]
fn err(conn: &mut Conn, bytes: &[u8], what: &str) -> RpcError {
    expect_error(&conn.roundtrip(bytes, what), what)
}

/// A connection registered as owner `pid` (a fake pid: never a real process).
fn owner(d: &Daemon, pid: u32) -> Conn {
    let mut c = d.connect();
    ok(
        &mut c,
        &lock_call(
            lk::proc_::REGISTER,
            0,
            &args::lock_register([pid as u8; 16], "vm", 1, pid, 0),
        ),
        "register",
    );
    c
}

fn resource(proc_: i32, key: &str, name: &str, flags: u32) -> Vec<u8> {
    lock_call(proc_, 1, &args::lock_resource(key, name, flags))
}

fn acquire(key: &str, name: &str, flags: u32) -> Vec<u8> {
    resource(lk::proc_::ACQUIRE_RESOURCE, key, name, flags)
}

/// Byte 0's lock as another process sees it: `(type, holder pid)`, or `None` if unlocked.
fn lock_on(path: &Path) -> Option<(i32, i32)> {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut lk = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut lk)).expect("F_GETLK");
    (i32::from(lk.l_type) != libc::F_UNLCK).then_some((i32::from(lk.l_type), lk.l_pid))
}

#[track_caller]
fn assert_held_by(path: &Path, d: &Daemon, kind: i32, what: &str) {
    // Our daemon's leases are OFD locks, which F_GETLK reports with pid -1 (they belong
    // to the open file, not a process).
    let got = lock_on(path);
    assert!(
        got == Some((kind, d.pid() as i32)) || got == Some((kind, -1)),
        "{what}: {} must stay locked by the daemon, got {got:?}",
        path.display()
    );
}

#[track_caller]
fn assert_busy(e: &RpcError, name: &str, what: &str) {
    assert_eq!(
        (e.code, e.domain),
        (code::RESOURCE_BUSY, domain::LOCKSPACE),
        "{what}: {e:?}"
    );
    assert_eq!(
        e.message.as_deref(),
        Some(&*format!(
            "resource busy: Lockspace resource '{name}' is locked"
        )),
        "{what}"
    );
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Owner 1 holds `foo` in directory lockspace D; owner 2 tries every other way to reach
/// the same file: `D/foo` (and other spellings, a symlink, a hard link) in the default
/// lockspace, and `foo` in a second lockspace key naming D. All are refused as locked,
/// none drops the lock, and owner 1's own calls afterwards behave.
#[test]
fn directory_lease_cannot_be_taken_again_through_an_alias() {
    let dir = tempdir("vh-lockd-alias-");
    let ls = dir.path().join("ls");
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let mut a = owner(&d, 0x7fff_0101);
    ok(
        &mut a,
        &lock_call(lk::proc_::NEW, 1, &args::lock_new(s(&ls), 0)),
        "NEW D",
    );
    ok(
        &mut a,
        &acquire(s(&ls), "foo", lk::ACQUIRE_AUTOCREATE),
        "owner 1 acquires foo in D",
    );
    let foo = ls.join("foo");
    assert_held_by(&foo, &d, libc::F_WRLCK, "after owner 1's acquire");

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&foo, &link).unwrap();
    let hard = dir.path().join("hard");
    fs::hard_link(&foo, &hard).unwrap();
    let aliases = [
        format!("{}/foo", s(&ls)),
        format!("{}//foo", s(&ls)),
        format!("{}/./ls/foo", s(dir.path())),
        s(&link).to_string(),
        s(&hard).to_string(),
    ];
    let mut b = owner(&d, 0x7fff_0102);
    for alias in &aliases {
        for flags in [0, lk::ACQUIRE_SHARED, lk::ACQUIRE_AUTOCREATE] {
            let what = format!("owner 2 acquires {alias} (flags {flags})");
            let e = err(&mut b, &acquire("", alias, flags), &what);
            assert_busy(&e, alias, &what);
            assert_held_by(&foo, &d, libc::F_WRLCK, &what);
        }
        for proc_ in [lk::proc_::CREATE_RESOURCE, lk::proc_::DELETE_RESOURCE] {
            let what = format!("owner 2 create/delete ({proc_}) {alias}");
            let e = err(&mut b, &resource(proc_, "", alias, 0), &what);
            assert_busy(&e, alias, &what);
            assert_held_by(&foo, &d, libc::F_WRLCK, &what);
        }
        let e = err(
            &mut b,
            &resource(lk::proc_::RELEASE_RESOURCE, "", alias, 0),
            "owner 2 releases the alias",
        );
        assert_eq!(e.code, code::RESOURCE_BUSY, "not locked: {e:?}");
        assert_held_by(&foo, &d, libc::F_WRLCK, "after owner 2's release");
    }
    assert!(foo.exists(), "nobody unlinked the lease file");

    // A second key for the same directory.
    let key2 = format!("{}/", s(&ls));
    ok(
        &mut b,
        &lock_call(lk::proc_::NEW, 1, &args::lock_new(&key2, 0)),
        "NEW D/",
    );
    for flags in [0, lk::ACQUIRE_AUTOCREATE | lk::ACQUIRE_SHARED] {
        let e = err(
            &mut b,
            &acquire(&key2, "foo", flags),
            "owner 2 acquires D/ foo",
        );
        assert_busy(&e, "foo", "owner 2 acquires D/ foo");
    }
    for proc_ in [lk::proc_::CREATE_RESOURCE, lk::proc_::DELETE_RESOURCE] {
        let e = err(
            &mut b,
            &resource(proc_, &key2, "foo", 0),
            "create/delete D/ foo",
        );
        assert_busy(&e, "foo", "create/delete D/ foo");
    }
    assert_held_by(&foo, &d, libc::F_WRLCK, "after the D/ attempts");

    // The legitimate owner's calls: another lease comes and goes, foo stays locked.
    ok(
        &mut a,
        &acquire(s(&ls), "bar", lk::ACQUIRE_AUTOCREATE),
        "owner 1 acquires bar",
    );
    ok(
        &mut a,
        &resource(lk::proc_::RELEASE_RESOURCE, s(&ls), "bar", 0),
        "owner 1 releases bar",
    );
    assert_held_by(&foo, &d, libc::F_WRLCK, "after owner 1's other calls");
    ok(
        &mut a,
        &resource(lk::proc_::RELEASE_RESOURCE, s(&ls), "foo", 0),
        "owner 1 releases foo",
    );
    assert_eq!(lock_on(&hard), None, "released for real");
    assert!(!foo.exists(), "AUTOCREATE lease file unlinked on release");
    // Now the file is free under any name.
    ok(
        &mut b,
        &acquire("", s(&hard), 0),
        "owner 2 acquires the hard link",
    );
    assert_held_by(&hard, &d, libc::F_WRLCK, "owner 2's lease");
}

/// The other order: owner 2 holds a disk path in the default lockspace; owner 1 then
/// reaches the same file as a name in a directory lockspace.
#[test]
fn default_lockspace_lease_cannot_be_taken_again_from_a_directory_lockspace() {
    let dir = tempdir("vh-lockd-alias2-");
    let ls = dir.path().join("ls");
    fs::create_dir(&ls).unwrap();
    let disk = ls.join("disk");
    fs::write(&disk, b"image").unwrap();
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let mut b = owner(&d, 0x7fff_0202);
    ok(
        &mut b,
        &acquire("", s(&disk), 0),
        "owner 2 acquires the disk path",
    );
    assert_held_by(&disk, &d, libc::F_WRLCK, "owner 2's lease");

    let mut a = owner(&d, 0x7fff_0201);
    ok(
        &mut a,
        &lock_call(lk::proc_::NEW, 1, &args::lock_new(s(&ls), 0)),
        "NEW D",
    );
    for flags in [0, lk::ACQUIRE_AUTOCREATE, lk::ACQUIRE_SHARED] {
        let what = format!("owner 1 acquires disk in D (flags {flags})");
        let e = err(&mut a, &acquire(s(&ls), "disk", flags), &what);
        assert_busy(&e, "disk", &what);
        assert_held_by(&disk, &d, libc::F_WRLCK, &what);
    }
    for proc_ in [lk::proc_::CREATE_RESOURCE, lk::proc_::DELETE_RESOURCE] {
        let what = format!("owner 1 create/delete ({proc_}) disk in D");
        let e = err(&mut a, &resource(proc_, s(&ls), "disk", 0), &what);
        assert_busy(&e, "disk", &what);
        assert_held_by(&disk, &d, libc::F_WRLCK, &what);
    }
    assert_eq!(fs::read(&disk).unwrap(), b"image", "disk untouched");

    ok(
        &mut b,
        &resource(lk::proc_::RELEASE_RESOURCE, "", s(&disk), 0),
        "owner 2 releases",
    );
    assert_eq!(lock_on(&disk), None);
    assert!(disk.exists(), "a direct lease never unlinks");
    ok(
        &mut a,
        &acquire(s(&ls), "disk", lk::ACQUIRE_AUTOCREATE),
        "owner 1 acquires disk in D once free",
    );
    assert_held_by(&disk, &d, libc::F_WRLCK, "owner 1's lease");
}

/// `open(O_WRONLY)` of a FIFO blocks until a reader comes: 9.0's CREATE_RESOURCE on one
/// hangs the whole daemon. Ours refuses FIFOs with a clear error and keeps serving.
#[test]
fn fifo_is_refused_with_a_clear_error() {
    let dir = tempdir("vh-lockd-fifo-");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let mut a = owner(&d, 0x7fff_0301);
    let want = format!(
        "invalid argument: Lockspace resource '{0}' ({0}) is a FIFO, not a regular file",
        s(&fifo)
    );
    for (bytes, what) in [
        (
            resource(lk::proc_::CREATE_RESOURCE, "", s(&fifo), 0),
            "CREATE_RESOURCE",
        ),
        (acquire("", s(&fifo), 0), "ACQUIRE"),
        (
            acquire("", s(&fifo), lk::ACQUIRE_AUTOCREATE),
            "ACQUIRE AUTOCREATE",
        ),
    ] {
        let e = err(&mut a, &bytes, what);
        assert_eq!(
            (e.code, e.domain),
            (code::INVALID_ARG, domain::LOCKSPACE),
            "{what}"
        );
        assert_eq!(e.message.as_deref(), Some(&*want), "{what}");
    }
    ok(
        &mut a,
        &lock_call(lk::proc_::NEW, 1, &args::lock_new(s(dir.path()), 0)),
        "NEW",
    );
    let e = err(
        &mut a,
        &acquire(s(dir.path()), "fifo", lk::ACQUIRE_AUTOCREATE),
        "ACQUIRE in a directory lockspace",
    );
    assert_eq!(e.code, code::INVALID_ARG);
    assert!(a.alive());
    let mut adm = d.connect_admin();
    ok(&mut adm, &admin_open(), "admin CONNECT_OPEN");
}

fn admin_open() -> Vec<u8> {
    call_frame(
        admin::ADMIN_PROGRAM,
        admin::ADMIN_PROTOCOL_VERSION,
        admin::proc_::CONNECT_OPEN,
        1,
        &args::lock_flags(0),
    )
}

fn list_locks(d: &Daemon) -> Vec<LockEntry> {
    let mut adm = d.connect_admin();
    let f = adm.roundtrip(
        &call_frame(
            inspect::PROGRAM,
            inspect::VERSION,
            inspect::proc_::LIST_LOCKS,
            1,
            &[],
        ),
        "LIST_LOCKS",
    );
    assert_eq!(f.header.status, status::OK, "{}", describe(&f.bytes));
    LockEntry::decode_list(f.payload()).expect("LIST_LOCKS reply")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small ext4 loop-mounted on a tempdir (needs root, mkfs.ext4 and a loop device;
/// a missing one fails the test). Unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn mount() -> LoopFs {
        let dir = tempdir("vh-lockd-stuck-");
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image file");
        run("mkfs.ext4", &["-q", "-F", s(&img)]);
        run("mount", &["-o", "loop", s(&img), s(&mnt)]);
        LoopFs { mnt, _dir: dir }
    }

    /// Freezes the file system until the guard is dropped. Declare the guard *after*
    /// the daemon: a process with a thread blocked on a frozen file system cannot die,
    /// so the daemon's drop (SIGKILL and wait) must come after the thaw.
    fn freeze(&self) -> Frozen<'_> {
        run("fsfreeze", &["-f", s(&self.mnt)]);
        Frozen(&self.mnt)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

struct Frozen<'a>(&'a Path);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("fsfreeze").arg("-u").arg(self.0).status();
        } else {
            run("fsfreeze", &["-u", s(self.0)]);
        }
    }
}

/// Whether a reply is waiting on `conn` (without blocking).
fn has_reply(conn: &Conn) -> bool {
    let mut b = [0u8; 1];
    conn.stream.set_nonblocking(true).unwrap();
    let r = nix::sys::socket::recv(
        conn.stream.as_raw_fd(),
        &mut b,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    );
    conn.stream.set_nonblocking(false).unwrap();
    match r {
        Ok(n) => n > 0,
        Err(nix::errno::Errno::EAGAIN) => false,
        Err(e) => panic!("peek: {e}"),
    }
}

/// While one client's ACQUIRE is blocked in `open(O_CREAT)` on a frozen file system,
/// another client's ACQUIRE, an admin call and an inspect call (which reads the lock
/// table) are all answered. A second call on the stuck resource waits for the first
/// instead of running beside it. After the thaw the stuck call completes and holds its
/// lock. The stuck lease is a disk path in the default lockspace, whose calls always run
/// on the blocking pool (a directory lockspace's run there unless its directory is on a
/// local disk file system such as this ext4: see `lockspace::is_local_fs`).
#[test]
fn a_call_stuck_on_a_frozen_filesystem_holds_up_nobody_else() {
    let stuck_fs = LoopFs::mount();
    let x = stuck_fs.mnt.join("x");
    let other = tempdir("vh-lockd-other-");
    let disk = other.path().join("disk");
    fs::write(&disk, b"").unwrap();
    // After the mount: the daemon's namespace is a copy of ours.
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let mut a = owner(&d, 0x7fff_0401);
    let frozen = stuck_fs.freeze();
    a.send(&acquire("", s(&x), lk::ACQUIRE_AUTOCREATE))
        .expect("send the stuck ACQUIRE");
    let mut c = owner(&d, 0x7fff_0403);
    c.send(&acquire("", s(&x), lk::ACQUIRE_AUTOCREATE))
        .expect("send a second ACQUIRE of the stuck resource");

    let mut b = owner(&d, 0x7fff_0402);
    ok(
        &mut b,
        &acquire("", s(&disk), 0),
        "another client's ACQUIRE",
    );
    assert_held_by(&disk, &d, libc::F_WRLCK, "the other client's lease");
    let mut adm = d.connect_admin();
    ok(&mut adm, &admin_open(), "admin CONNECT_OPEN");
    let held = list_locks(&d);
    assert_eq!(
        held.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        vec![s(&disk)],
        "the stuck acquire is not in the table"
    );
    // The file system is frozen, so neither call on it can have been answered.
    assert!(!has_reply(&a), "the stuck ACQUIRE cannot have completed");
    assert!(!has_reply(&c), "the second ACQUIRE waits for the first");

    drop(frozen);
    let f = a.recv_ok("the stuck ACQUIRE after the thaw");
    assert_eq!(f.header.status, status::OK, "{}", describe(&f.bytes));
    let f = c.recv_ok("the second ACQUIRE after the thaw");
    let e = f.error().expect("the second ACQUIRE is refused");
    assert_busy(&e, s(&x), "second ACQUIRE");
    assert_held_by(&x, &d, libc::F_WRLCK, "the formerly stuck lease");
    ok(
        &mut a,
        &resource(lk::proc_::RELEASE_RESOURCE, "", s(&x), 0),
        "release",
    );
    assert!(!x.exists(), "AUTOCREATE lease file unlinked");
}

fn raw_resource(proc_: i32, key: &[u8], name: &[u8], flags: u32) -> Vec<u8> {
    let mut e = Encoder::new();
    e.opaque(key).opaque(name).u32(flags);
    lock_call(proc_, 1, e.as_bytes())
}

/// Names and paths that are not UTF-8 are refused; nothing is converted, so no other
/// file (here the one a lossy conversion would name) is created or locked.
#[test]
fn non_utf8_names_are_refused_never_converted() {
    let dir = tempdir("vh-lockd-utf8-");
    let base = s(dir.path()).as_bytes().to_vec();
    let lossy = dir.path().join("x\u{FFFD}");
    fs::write(&lossy, b"").unwrap();
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let mut a = owner(&d, 0x7fff_0501);
    let mut bad = base.clone();
    bad.extend_from_slice(b"/x\xff");
    let shown = String::from_utf8_lossy(&bad).into_owned();
    for (proc_, flags) in [
        (lk::proc_::ACQUIRE_RESOURCE, 0),
        (lk::proc_::ACQUIRE_RESOURCE, lk::ACQUIRE_AUTOCREATE),
        (lk::proc_::CREATE_RESOURCE, 0),
        (lk::proc_::DELETE_RESOURCE, 0),
    ] {
        let e = err(
            &mut a,
            &raw_resource(proc_, b"", &bad, flags),
            "non-UTF-8 name",
        );
        assert_eq!(
            (e.code, e.domain),
            (code::INVALID_ARG, domain::LOCKSPACE),
            "{e:?}"
        );
        assert_eq!(
            e.message.as_deref(),
            Some(&*format!(
                "invalid argument: Resource name '{shown}' is not valid: it is not UTF-8"
            ))
        );
    }
    assert_eq!(
        lock_on(&lossy),
        None,
        "the lossy name's file was not locked"
    );
    assert!(lossy.exists(), "nor deleted");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no file with the raw name was created"
    );

    // Lockspace paths.
    let mut e = Encoder::new();
    e.opaque(&bad).u32(0);
    let f = err(
        &mut a,
        &lock_call(lk::proc_::NEW, 1, e.as_bytes()),
        "NEW non-UTF-8",
    );
    assert_eq!(f.code, code::INVALID_ARG, "{f:?}");
    let mut e = Encoder::new();
    e.opaque(&bad);
    let f = err(
        &mut a,
        &lock_call(lk::proc_::CREATE_LOCKSPACE, 1, e.as_bytes()),
        "CREATE_LOCKSPACE non-UTF-8",
    );
    assert_eq!(f.code, code::INVALID_ARG, "{f:?}");
    let e = err(
        &mut a,
        &raw_resource(
            lk::proc_::ACQUIRE_RESOURCE,
            &bad,
            b"foo",
            lk::ACQUIRE_AUTOCREATE,
        ),
        "ACQUIRE in a non-UTF-8 lockspace",
    );
    assert_eq!(
        e.message.as_deref(),
        Some(&*format!(
            "internal error: Lockspace for path {shown} does not exist"
        ))
    );
    // In a directory lockspace.
    ok(
        &mut a,
        &lock_call(lk::proc_::NEW, 1, &args::lock_new(s(dir.path()), 0)),
        "NEW",
    );
    let e = err(
        &mut a,
        &raw_resource(
            lk::proc_::ACQUIRE_RESOURCE,
            &base,
            b"x\xff",
            lk::ACQUIRE_AUTOCREATE,
        ),
        "non-UTF-8 name in a directory lockspace",
    );
    assert_eq!(e.code, code::INVALID_ARG);
    assert_eq!(lock_on(&lossy), None);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(list_locks(&d).is_empty());
}
