//! Two real hosts on a real shared filesystem: the GlusterFS bed of `tests/gluster/bed.sh`
//! (one volume, FUSE-mounted by host A and host B, each client in its own network
//! namespace). Each host runs its own virtlockd (ours or libvirt 9.0's C daemon) with a
//! directory lockspace on its own mount of the volume; exclusion across hosts is decided
//! by the byte-0 fcntl locks, which GlusterFS carries from one mount to the other.
//!
//! These tests need the bed: `tests/gluster/run.sh` brings it up, runs them (they are
//! `#[ignore]`d in a plain `cargo test`, which has no bed) and tears it down. Run with
//! `--ignored` but without the bed, they fail loudly.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use vh_common::error::code;
use vh_tests::*;
use virtlockd::protocol as lk;

const NEEDS_BED: &str = "needs the GlusterFS bed: run tests/gluster/run.sh";

/// One test at a time: the partition test cuts host A's link under everyone.
static SERIAL: Mutex<()> = Mutex::new(());

/// The bed's directory (`VH_GLUSTER_DIR`, as `bed.sh` uses it).
fn bed_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("VH_GLUSTER_DIR").unwrap_or_else(|| "/tmp/vh-gluster".into()))
}

struct Bed {
    _serial: MutexGuard<'static, ()>,
    dir: PathBuf,
}

impl Bed {
    fn get() -> Bed {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = bed_dir();
        let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
        for h in ["A", "B"] {
            let m = dir.join(format!("m{h}"));
            assert!(
                mounts
                    .lines()
                    .any(|l| l.split(' ').nth(1) == m.to_str() && l.contains("fuse.glusterfs")),
                "host {h}'s GlusterFS mount {} is missing: {NEEDS_BED}",
                m.display()
            );
        }
        Bed {
            _serial: serial,
            dir,
        }
    }

    /// The same directory of the volume, as host `h` (A or B) reaches it.
    fn path(&self, h: &str, rel: &str) -> PathBuf {
        self.dir.join(format!("m{h}")).join(rel)
    }

    /// A fresh lockspace directory name on the volume.
    fn fresh(&self, what: &str) -> String {
        let rel = format!("{what}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(self.path("A", &rel));
        rel
    }
}

fn lock_call(proc_: i32, serial: u32, args: &[u8]) -> Vec<u8> {
    call_frame(lk::PROGRAM, lk::VERSION, proc_, serial, args)
}

/// A lock connection of one host, registered for a (fake) owner pid: libvirtd's
/// acquire/release connection, whose close releases nothing.
struct Client {
    conn: Conn,
    serial: u32,
    ls: String,
    what: String,
}

impl Client {
    fn new(d: &Daemon, ls: &Path, owner_pid: u32, what: &str) -> Client {
        let mut c = Client {
            conn: d.connect(),
            serial: 0,
            ls: ls.to_str().expect("utf-8 path").to_string(),
            what: what.to_string(),
        };
        let ls = c.ls.clone();
        c.ok(
            lk::proc_::CREATE_LOCKSPACE,
            &args::lock_create_lockspace(&ls),
            "create lockspace",
        );
        c.ok(
            lk::proc_::REGISTER,
            &args::lock_register([owner_pid as u8; 16], "vm", 1, owner_pid, 0),
            "register",
        );
        c
    }

    fn call(&mut self, proc_: i32, a: &[u8], what: &str) -> Option<RpcError> {
        self.serial += 1;
        let f = self.conn.roundtrip(
            &lock_call(proc_, self.serial, a),
            &format!("{}: {what}", self.what),
        );
        f.error()
    }

    #[track_caller]
    fn ok(&mut self, proc_: i32, a: &[u8], what: &str) {
        if let Some(e) = self.call(proc_, a, what) {
            panic!("{}: {what}: {e:?}", self.what);
        }
    }

    fn acquire(&mut self, name: &str, shared: bool) -> Option<RpcError> {
        let flags = lk::ACQUIRE_AUTOCREATE | if shared { lk::ACQUIRE_SHARED } else { 0 };
        let ls = self.ls.clone();
        self.call(
            lk::proc_::ACQUIRE_RESOURCE,
            &args::lock_resource(&ls, name, flags),
            "acquire",
        )
    }

    #[track_caller]
    fn acquired(&mut self, name: &str, shared: bool) {
        if let Some(e) = self.acquire(name, shared) {
            panic!("{}: acquire {name} (shared {shared}): {e:?}", self.what);
        }
    }

    #[track_caller]
    fn refused(&mut self, name: &str, shared: bool) {
        match self.acquire(name, shared) {
            Some(e) if e.code == code::RESOURCE_BUSY => {}
            other => panic!(
                "{}: acquire {name} (shared {shared}) while the other host holds it: expected \
                 RESOURCE_BUSY, got {other:?}",
                self.what
            ),
        }
    }

    #[track_caller]
    fn release(&mut self, name: &str) {
        let ls = self.ls.clone();
        self.ok(
            lk::proc_::RELEASE_RESOURCE,
            &args::lock_resource(&ls, name, 0),
            "release",
        );
    }
}

/// A virtlockd per host, each with its lockspace on its own mount of one directory.
fn hosts(bed: &Bed, a: DaemonKind, b: DaemonKind, what: &str) -> (Daemon, Client, Daemon, Client) {
    let rel = bed.fresh(what);
    let da = Daemon::spawn(a, Service::Virtlockd, "");
    let db = Daemon::spawn(b, Service::Virtlockd, "");
    let ca = Client::new(
        &da,
        &bed.path("A", &rel),
        0x7fff_0a01,
        &format!("host A ({a:?})"),
    );
    let cb = Client::new(
        &db,
        &bed.path("B", &rel),
        0x7fff_0b01,
        &format!("host B ({b:?})"),
    );
    (da, ca, db, cb)
}

fn exclusive(a: DaemonKind, b: DaemonKind) {
    let bed = Bed::get();
    let (_da, mut ca, _db, mut cb) = hosts(&bed, a, b, "excl");
    let name = "f2f4417b8fe812d19e40421ca4d46765c702e950c54a3a74e967e48dc9812492";
    ca.acquired(name, false);
    cb.refused(name, false);
    cb.refused(name, true);
    ca.release(name);
    cb.acquired(name, false);
    ca.refused(name, false);
    ca.refused(name, true);
    cb.release(name);
    ca.acquired(name, false);
    ca.release(name);
    assert!(
        !Path::new(&cb.ls).join(name).exists(),
        "the last release unlinks the lease file (as B sees it)"
    );
}

fn shared(a: DaemonKind, b: DaemonKind) {
    let bed = Bed::get();
    let (_da, mut ca, _db, mut cb) = hosts(&bed, a, b, "shared");
    let name = "shared-disk";
    ca.acquired(name, true);
    cb.refused(name, false);
    cb.acquired(name, true);
    ca.release(name);
    let via_b = Path::new(&cb.ls).join(name);
    assert!(
        via_b.exists(),
        "B still shares the lease: A must not unlink it"
    );
    ca.refused(name, false);
    cb.release(name);
    assert!(!via_b.exists(), "the last sharer unlinks the lease file");
    ca.acquired(name, false);
    cb.refused(name, true);
    ca.release(name);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn exclusive_ours_ours() {
    exclusive(DaemonKind::Ours, DaemonKind::Ours);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn exclusive_ours_c() {
    exclusive(DaemonKind::Ours, DaemonKind::C);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn exclusive_c_ours() {
    exclusive(DaemonKind::C, DaemonKind::Ours);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn shared_ours_ours() {
    shared(DaemonKind::Ours, DaemonKind::Ours);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn shared_ours_c() {
    shared(DaemonKind::Ours, DaemonKind::C);
}

#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn shared_c_ours() {
    shared(DaemonKind::C, DaemonKind::Ours);
}
