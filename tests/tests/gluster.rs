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

    /// Waits until host `h`'s mount answers again (after a heal).
    fn wait_usable(&self, h: &str) {
        let t = std::time::Instant::now();
        let probe = self.path(h, &format!(".usable-{}", std::process::id()));
        while std::fs::write(&probe, b"x").is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(120),
                "host {h}'s mount does not come back"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = std::fs::remove_file(&probe);
    }

    /// A fresh lockspace directory name on the volume.
    fn fresh(&self, what: &str) -> String {
        let rel = format!("{what}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(self.path("A", &rel));
        rel
    }
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

// ------------------------------------------------------------------------------------
// Lease renewal and fencing
// ------------------------------------------------------------------------------------

/// Renewal every second, leases lost after 4 s without renewal: inside the bed's lock
/// recovery time of 10 s (the brick drops a silent client's locks ~8-10 s after a cut).
const RENEWAL: &str = "lease_renew_interval = 1\nlease_renew_timeout = 4\n";

fn bed_script(action: &str, host: &str) {
    let script = std::env::var_os("VH_GLUSTER_BED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("gluster/bed.sh"));
    let st = std::process::Command::new(&script)
        .args([action, host])
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(st.success(), "bed.sh {action} {host}: {st}");
}

/// Whether `pid` has died (a zombie not yet reaped counts as dead).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// One try of host B's at `name` after A's link was cut (at `cut`): true once B holds
/// it. While A's lease still blocks it, waits 100 ms before the next try; fails the test
/// 120 s after the cut.
fn acquired_after_cut(cb: &mut Client, name: &str, cut: std::time::Instant) -> bool {
    match cb.acquire(name, false) {
        None => return true,
        Some(e) if e.code == code::RESOURCE_BUSY => {}
        Some(e) => panic!("host B acquire: {e:?}"),
    }
    assert!(
        cut.elapsed() < std::time::Duration::from_secs(120),
        "host B never got the lease after A's link was cut"
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    false
}

/// A real owner process on `d` holding `name` exclusively over its own live connection
/// (made from the owner process, so the daemon sees its pid as the peer; REGISTER with its
/// own pid, as QEMU's inherited connection does). The test keeps the socket open (the
/// owner's copy is close-on-exec), so the connection outlives the owner until
/// [`OwnerChild::exit`].
fn owner_holding(d: &Daemon, ls: &Path, name: &str) -> OwnerChild {
    let mut o = OwnerChild::connect_living(&d.sock(), 600);
    let pid = o.pid();
    let ls = ls.to_str().expect("utf-8");
    for (serial, (proc_, a)) in [
        (lk::proc_::CREATE_LOCKSPACE, args::lock_create_lockspace(ls)),
        (
            lk::proc_::REGISTER,
            args::lock_register([9; 16], "vm-a", 1, pid, 0),
        ),
        (
            lk::proc_::ACQUIRE_RESOURCE,
            args::lock_resource(ls, name, lk::ACQUIRE_AUTOCREATE),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let f = o
            .conn()
            .roundtrip(&lock_call(proc_, serial as u32, &a), "owner");
        assert!(f.error().is_none(), "owner call {proc_}: {:?}", f.error());
    }
    o
}

/// Host A's owner holds an exclusive lease; A's link is cut. A's daemon must kill the
/// owner before host B can take the lease (B keeps trying from the moment of the cut).
/// After the link heals, A's daemon serves again. Three trials.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn partition_fences_owner_before_other_host_acquires() {
    let bed = Bed::get();
    let rel = bed.fresh("fence");
    let mut da = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, RENEWAL);
    let db = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let ls_a = bed.path("A", &rel);
    let mut cb = Client::new(&db, &bed.path("B", &rel), 0x7fff_0b02, "host B");
    let local = tempfile::Builder::new()
        .prefix("vh-fence-local-")
        .tempdir()
        .expect("tempdir");
    for trial in 1..=3 {
        let name = format!("disk-{trial}");
        let mut owner = owner_holding(&da, &ls_a, &name);
        let pid = owner.pid();
        cb.refused(&name, false);

        let dead_at: std::sync::Arc<Mutex<Option<std::time::Instant>>> = Default::default();
        let watch = {
            let dead_at = dead_at.clone();
            std::thread::spawn(move || {
                let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
                while std::time::Instant::now() < end {
                    if is_dead(pid) {
                        *dead_at.lock().unwrap() = Some(std::time::Instant::now());
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            })
        };
        // A renews: its heartbeat, as host B reads it, lists the lease.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        let hb = bed.path("B", &format!("{rel}/.virtlockd-renew.{}", host.trim()));
        let t = std::time::Instant::now();
        let want = format!("lease={name} exclusive owners={pid}\n");
        while !std::fs::read_to_string(&hb).is_ok_and(|t| t.contains(&want)) {
            if t.elapsed() > std::time::Duration::from_secs(60) {
                let threads: String = std::fs::read_dir(format!("/proc/{}/task", da.pid()))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| {
                                let p = e.path();
                                let r = |f: &str| {
                                    std::fs::read_to_string(p.join(f)).unwrap_or_default()
                                };
                                format!("{} {} {}\n", r("comm").trim(), r("wchan"), r("stat"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                panic!(
                    "trial {trial}: A's heartbeat does not list the lease: {:?}\nthreads:\n{threads}\nA's log:\n{}",
                    std::fs::read_to_string(&hb),
                    da.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let cut = std::time::Instant::now();
        bed_script("cut", "A");
        let mut served_while_cut = false;
        let acquired = loop {
            // While A's mount hangs, A's daemon still serves a lockspace elsewhere.
            if !served_while_cut && dead_at.lock().unwrap().is_some() {
                let mut cl = Client::new(&da, local.path(), 0x7fff_0c00 + trial, "A, local");
                cl.acquired("local-disk", false);
                cl.release("local-disk");
                served_while_cut = true;
            }
            if acquired_after_cut(&mut cb, &name, cut) {
                break std::time::Instant::now();
            }
        };
        let died = *dead_at.lock().unwrap();
        let died = died.unwrap_or_else(|| {
            panic!(
                "trial {trial}: host B acquired the lease {:?} after the cut while A's owner \
                 (pid {pid}) was still alive; A's daemon said:\n{}",
                acquired - cut,
                da.stderr()
            )
        });
        assert!(
            died < acquired,
            "trial {trial}: A's owner died after B acquired the lease"
        );
        assert!(
            served_while_cut,
            "trial {trial}: A's daemon not checked while cut"
        );
        eprintln!(
            "trial {trial}: owner killed {:.1}s after the cut, B acquired {:.1}s after the cut \
             (margin {:.1}s)",
            (died - cut).as_secs_f64(),
            (acquired - cut).as_secs_f64(),
            (acquired - died).as_secs_f64()
        );
        let _ = watch.join();
        // Seen from host B: A's heartbeat stopped while it still lists the lease.
        let out = std::process::Command::new(bin_dir().join("vhctl"))
            .args(["holders", "--stale", "5"])
            .arg(bed.path("B", &rel))
            .output()
            .expect("run vhctl holders");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("STALE") && text.contains(&format!("{name} exclusive owners={pid}")),
            "vhctl holders on B:\n{text}"
        );
        if trial == 1 {
            eprintln!("vhctl holders on B during the cut:\n{text}");
        }
        owner.exit();
        cb.release(&name);

        // Heal: A's daemon is still running and serves leases again.
        bed_script("heal", "A");
        assert!(da.is_running(), "A's daemon died:\n{}", da.stderr());
        let healed = std::time::Instant::now();
        let mut ca = Client::new(&da, &ls_a, 0x7fff_0a02 + trial, "host A after heal");
        let probe = format!("after-heal-{trial}");
        loop {
            match ca.acquire(&probe, false) {
                None => break,
                Some(e) => assert!(
                    healed.elapsed() < std::time::Duration::from_secs(120),
                    "A's daemon does not serve leases after the heal: {e:?}"
                ),
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        ca.release(&probe);
        eprintln!(
            "trial {trial}: A serves again {:.1}s after the heal",
            healed.elapsed().as_secs_f64()
        );
    }
    let log = da.stderr();
    assert!(log.contains("owner killed"), "A's daemon log:\n{log}");
}

/// The hazard the fencing removes, shown on the same bed (so the test above cannot pass
/// vacuously): without renewal (libvirt 9.0's C daemon, and ours with renewal off) host B
/// gets the lease after the cut while A's owner is still running: two writers.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn partition_without_fencing_overlaps() {
    let bed = Bed::get();
    let db = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    for (i, kind) in [DaemonKind::C, DaemonKind::Ours].into_iter().enumerate() {
        let rel = bed.fresh(&format!("overlap-{kind:?}"));
        let da = Daemon::spawn(kind, Service::Virtlockd, "");
        let ls_a = bed.path("A", &rel);
        let mut cb = Client::new(&db, &bed.path("B", &rel), 0x7fff_0d00 + i as u32, "host B");
        let mut owner = owner_holding(&da, &ls_a, "disk");
        let pid = owner.pid();
        cb.refused("disk", false);
        let cut = std::time::Instant::now();
        bed_script("cut", "A");
        let acquired = loop {
            if cb.acquire("disk", false).is_none() {
                break cut.elapsed();
            }
            assert!(
                cut.elapsed() < std::time::Duration::from_secs(120),
                "host B never got the lease after A's link was cut"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(
            !is_dead(pid),
            "{kind:?} without renewal: A's owner died before B acquired"
        );
        eprintln!(
            "{kind:?} daemon on A, no renewal: B acquired {:.1}s after the cut while A's owner was still running",
            acquired.as_secs_f64()
        );
        bed_script("heal", "A");
        owner.exit();
        cb.release("disk");
        bed.wait_usable("A");
    }
}

/// A lease lost while its owner runs on (`lease_loss_action = "none"`): host A is cut,
/// the brick drops A's lock, host B takes the lease; after the heal A's owner exits and A's
/// daemon releases the lease. That release must leave B's lease file alone (deleting it
/// would let a third party create and lock a new file under the same name: two holders of
/// one disk); A's daemon warns and counts the loss.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn release_of_a_lost_lease_leaves_the_other_hosts_file() {
    let bed = Bed::get();
    let rel = bed.fresh("lost-release");
    let da = Daemon::spawn(
        DaemonKind::Ours,
        Service::Virtlockd,
        &format!("{RENEWAL}lease_loss_action = \"none\"\n"),
    );
    let db = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let ls_a = bed.path("A", &rel);
    let mut cb = Client::new(&db, &bed.path("B", &rel), 0x7fff_0e02, "host B");
    let mut owner = owner_holding(&da, &ls_a, "disk");
    let pid = owner.pid();
    cb.refused("disk", false);
    let cut = std::time::Instant::now();
    bed_script("cut", "A");
    while !acquired_after_cut(&mut cb, "disk", cut) {}
    eprintln!(
        "B acquired {:.1}s after the cut",
        cut.elapsed().as_secs_f64()
    );
    assert!(!is_dead(pid), "lease_loss_action=none killed A's owner");
    let b_file = bed.path("B", &format!("{rel}/disk"));
    let b_ino =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&b_file).expect("B's lease file"));
    bed_script("heal", "A");
    bed.wait_usable("A");
    // A's owner exits after the heal: A's daemon releases the lease it lost.
    owner.exit();
    let released = std::time::Instant::now();
    let warned = |log: &str| log.contains("is no longer ours");
    while b_file.exists() && !warned(&da.stderr()) {
        assert!(
            released.elapsed() < std::time::Duration::from_secs(120),
            "A's daemon never released the lost lease:\n{}",
            da.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let md = std::fs::metadata(&b_file).unwrap_or_else(|e| {
        panic!(
            "A's release deleted B's lease file ({e}); A's daemon said:\n{}",
            da.stderr()
        )
    });
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&md),
        b_ino,
        "B's lease file was replaced"
    );
    // Still B's: nobody else gets it, from either host.
    let mut ca = Client::new(&da, &ls_a, 0x7fff_0e03, "host A after heal");
    ca.refused("disk", false);
    let mut cb2 = Client::new(
        &db,
        &bed.path("B", &rel),
        0x7fff_0e04,
        "host B, other owner",
    );
    cb2.refused("disk", false);
    let log = da.stderr();
    assert!(warned(&log), "A's daemon log:\n{log}");
    eprintln!(
        "A's release of the lost lease, {:.1}s after its owner exited, left B's file: {}",
        released.elapsed().as_secs_f64(),
        log.lines().find(|l| warned(l)).unwrap_or_default()
    );
    cb.release("disk");
}

/// Renewal under a long write load on the volume from both hosts, without a partition:
/// renewal keeps running (host B sees A's heartbeat change), no owner is killed, no lease
/// counts as lost.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn no_fencing_under_io_load() {
    let bed = Bed::get();
    let rel = bed.fresh("load");
    let secs: u64 = std::env::var("VH_GLUSTER_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut da = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, RENEWAL);
    let ls_a = bed.path("A", &rel);
    let owner = owner_holding(&da, &ls_a, "busy-disk");
    let pid = owner.pid();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    // A's heartbeat as host B reads it, sampled through the load: renewal must keep
    // running (a test that only saw no kill would pass with renewal stalled or off).
    let heartbeats = {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        let hb = bed.path("B", &format!("{rel}/.virtlockd-renew.{}", host.trim()));
        let want = format!("lease=busy-disk exclusive owners={pid}\n");
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while std::time::Instant::now() < end {
                if let Ok(t) = std::fs::read_to_string(&hb) {
                    if t.contains(&want) {
                        seen.extend(
                            t.lines()
                                .find(|l| l.starts_with("renewed="))
                                .map(String::from),
                        );
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            seen.len()
        })
    };
    let writers: Vec<_> = ["A", "B"]
        .into_iter()
        .map(|h| {
            let target = bed.path(h, &format!("{rel}-load-{h}"));
            std::thread::spawn(move || {
                let mut rounds = 0;
                while std::time::Instant::now() < end {
                    let st = std::process::Command::new("dd")
                        .arg("if=/dev/zero")
                        .arg(format!("of={}", target.display()))
                        .args(["bs=1M", "count=64", "conv=fsync", "status=none"])
                        .status()
                        .expect("run dd");
                    assert!(st.success(), "dd on host {h}: {st}");
                    rounds += 1;
                }
                let _ = std::fs::remove_file(&target);
                rounds
            })
        })
        .collect();
    let rounds: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let renewals = heartbeats.join().unwrap();
    assert!(
        renewals > 1,
        "A's heartbeat (listing the lease) changed {renewals} time(s) during the load: \
         renewal did not run:\n{}",
        da.stderr()
    );
    assert!(
        !is_dead(pid),
        "the owner was killed without a partition:\n{}",
        da.stderr()
    );
    assert!(da.is_running());
    let log = da.stderr();
    assert!(
        !log.contains("lease lost") && !log.contains("no lease renewal"),
        "a lease counted as lost under load:\n{log}"
    );
    eprintln!(
        "{secs}s of load: {rounds:?} x 64 MiB written (+fsync) via A and B; {renewals} \
         distinct heartbeats listing the lease seen from B"
    );
    drop(owner);
}

/// An owner process that holds its lock connection itself, as QEMU does (the socket is
/// inherited across exec, and the test's copy is closed once registered): when it dies,
/// the connection closes and A's daemon releases its lease on the (possibly dead) mount.
struct QemuLike {
    child: std::process::Child,
}

impl QemuLike {
    fn spawn(d: &Daemon, ls: &Path, name: &str) -> QemuLike {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = UnixAddr::new(&d.sock()).expect("socket path");
        let raw = fd.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: connect(2) and fcntl(2) are async-signal-safe; fd and address were
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                connect(raw, &addr).map_err(std::io::Error::from)?;
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn owner");
        let mut conn = Conn::from_stream(std::os::unix::net::UnixStream::from(fd));
        let pid = child.id();
        let ls = ls.to_str().expect("utf-8");
        for (serial, (proc_, a)) in [
            (lk::proc_::CREATE_LOCKSPACE, args::lock_create_lockspace(ls)),
            (
                lk::proc_::REGISTER,
                args::lock_register([8; 16], "qemu", 1, pid, 0),
            ),
            (
                lk::proc_::ACQUIRE_RESOURCE,
                args::lock_resource(ls, name, lk::ACQUIRE_AUTOCREATE),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let f = conn.roundtrip(&lock_call(proc_, serial as u32, &a), "qemu-like owner");
            assert!(f.error().is_none(), "owner call {proc_}: {:?}", f.error());
        }
        QemuLike { child }
    }
}

impl Drop for QemuLike {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The owner holds its own connection (QEMU's case): once fenced, its connection closes
/// and A's daemon releases the lease on the dead mount. A's daemon still serves a
/// lockspace elsewhere while that release waits for the mount.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn partition_with_qemu_like_owner() {
    let bed = Bed::get();
    let rel = bed.fresh("qemu");
    let mut da = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, RENEWAL);
    let db = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let ls_a = bed.path("A", &rel);
    let mut cb = Client::new(&db, &bed.path("B", &rel), 0x7fff_0e01, "host B");
    let local = tempfile::Builder::new()
        .prefix("vh-fence-local-")
        .tempdir()
        .expect("tempdir");
    let mut owner = QemuLike::spawn(&da, &ls_a, "disk");
    let pid = owner.child.id();
    cb.refused("disk", false);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let cut = std::time::Instant::now();
    bed_script("cut", "A");
    let _ = owner.child.wait();
    let died = cut.elapsed();
    assert!(is_dead(pid));
    // The fenced owner's connection is closed now; A's daemon must still answer.
    let t = std::time::Instant::now();
    let mut cl = Client::new(&da, local.path(), 0x7fff_0e02, "A, local");
    cl.acquired("local-disk", false);
    cl.release("local-disk");
    eprintln!(
        "owner died {:.1}s after the cut; A answered a local acquire {:.1}s after that",
        died.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let acquired = loop {
        if cb.acquire("disk", false).is_none() {
            break cut.elapsed();
        }
        assert!(cut.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(died < acquired);
    eprintln!("B acquired {:.1}s after the cut", acquired.as_secs_f64());
    cb.release("disk");
    bed_script("heal", "A");
    bed.wait_usable("A");
    assert!(da.is_running(), "{}", da.stderr());
}

// ------------------------------------------------------------------------------------
// OFD leases through GlusterFS: what renewal's probe and a C daemon's hand-over rely on
// ------------------------------------------------------------------------------------

fn byte0(l_type: i32) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

fn open_rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// An exclusive lease handed over by libvirt's C daemon (a POSIX lock of this process)
/// on a GlusterFS lockspace is adopted as POSIX and stays held; one held by another lock
/// owner is refused. (FUSE answers F_OFD_GETLK with pid -1 for every holder, ours
/// included, so adopt must not ask that way.) Renewal's probe proves an OFD lease ours
/// through GlusterFS, where F_GETLK names its setter by pid.
#[test]
#[ignore = "needs the GlusterFS bed: run tests/gluster/run.sh"]
fn ofd_lease_facts_through_gluster() {
    use nix::fcntl::{fcntl, FcntlArg};
    use std::os::fd::AsRawFd;
    use virtlockd::lease_lock::{self, LockKind};
    let bed = Bed::get();
    let rel = bed.fresh("ofd");
    std::fs::create_dir_all(bed.path("A", &rel)).expect("mkdir");
    let name = format!("{rel}/disk");
    let (via_a, via_b) = (bed.path("A", &name), bed.path("B", &name));

    // The C daemon's exclusive lease, inherited across its re-exec into us.
    let held = open_rw(&via_a);
    fcntl(held.as_raw_fd(), FcntlArg::F_SETLK(&byte0(libc::F_WRLCK))).expect("POSIX lock");
    assert_eq!(
        lease_lock::adopt(held.as_raw_fd(), false),
        Ok(LockKind::Posix),
        "our own POSIX lease, adopted"
    );
    let other = open_rw(&via_b);
    assert!(
        fcntl(
            other.as_raw_fd(),
            FcntlArg::F_OFD_SETLK(&byte0(libc::F_RDLCK))
        )
        .is_err(),
        "still held, as host B sees it"
    );
    lease_lock::unlock(held.as_raw_fd(), LockKind::Posix).expect("unlock");

    // Another owner (an OFD lock through host B) holds it: refused.
    fcntl(
        other.as_raw_fd(),
        FcntlArg::F_OFD_SETLK(&byte0(libc::F_WRLCK)),
    )
    .expect("B locks");
    assert_eq!(
        lease_lock::adopt(held.as_raw_fd(), false),
        Err(nix::errno::Errno::EAGAIN)
    );
    lease_lock::unlock(other.as_raw_fd(), LockKind::Ofd).expect("B unlocks");

    // Our OFD lease, proven ours by renewal's probe (F_GETLK through FUSE: our pid).
    lease_lock::lock(held.as_raw_fd(), false).expect("OFD lock");
    let lease = virtlockd::renewal::Lease {
        name: "disk".into(),
        path: via_a.clone(),
        shared: false,
        owners: vec![1],
        kind: LockKind::Ofd,
        file_id: None,
    };
    assert_eq!(
        virtlockd::renewal::probe(&lease, std::process::id() as i32),
        virtlockd::renewal::Verdict::Held(None)
    );
    lease_lock::unlock(held.as_raw_fd(), LockKind::Ofd).expect("unlock");
    assert!(matches!(
        virtlockd::renewal::probe(&lease, std::process::id() as i32),
        virtlockd::renewal::Verdict::Lost(_)
    ));
    drop((held, other));
    let _ = std::fs::remove_dir_all(bed.path("A", &rel));
}
