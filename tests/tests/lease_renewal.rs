//! Lease renewal on one machine (the cross-host partition is in `gluster.rs`): a lease
//! whose lock is found lost gets its owner killed (or only logged, with
//! `lease_loss_action = "none"`), and exclusive lease files carry a holder record.
//!
//! The loss is made by hand: the lease file is replaced by another file locked by this
//! test process, as when another host recreated and locked it after ours was dropped.

use nix::fcntl::{fcntl, FcntlArg};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use vh_tests::*;
use virtlockd::protocol as lk;

/// A real owner process holding `name` exclusively over its own connection.
fn owner_holding(d: &Daemon, ls: &str, name: &str) -> OwnerChild {
    let mut o = OwnerChild::connect_living(&d.sock(), 600);
    let pid = o.pid();
    let calls = [
        (lk::proc_::CREATE_LOCKSPACE, args::lock_create_lockspace(ls)),
        (
            lk::proc_::REGISTER,
            args::lock_register([7; 16], "vm-r", 1, pid, 0),
        ),
        (
            lk::proc_::ACQUIRE_RESOURCE,
            args::lock_resource(ls, name, lk::ACQUIRE_AUTOCREATE),
        ),
    ];
    for (serial, (proc_, a)) in calls.into_iter().enumerate() {
        let f = o
            .conn()
            .roundtrip(&lock_call(proc_, serial as u32, &a), "owner");
        assert!(f.error().is_none(), "owner call {proc_}: {:?}", f.error());
    }
    o
}

fn is_dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Replace the lease file by a new one write-locked by this process (returned: the lock
/// lives as long as the file).
fn steal(path: &Path) -> File {
    fs::remove_file(path).expect("unlink lease file");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .expect("recreate lease file");
    let fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(f.as_raw_fd(), FcntlArg::F_SETLK(&fl)).expect("lock the new lease file");
    f
}

fn setup(config: &str) -> (tempfile::TempDir, String, Daemon, OwnerChild) {
    let dir = tempfile::Builder::new()
        .prefix("vh-renewal-")
        .tempdir()
        .expect("tempdir");
    let ls = dir.path().join("ls").to_str().expect("utf-8").to_string();
    let d = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, config);
    let owner = owner_holding(&d, &ls, "disk");
    let pid = owner.pid();
    let lease = Path::new(&ls).join("disk");
    wait_until("the holder record in the lease file", || {
        fs::read_to_string(&lease).is_ok_and(|s| s.contains(&format!("owner_pid={pid}")))
    });
    let rec = fs::read_to_string(&lease).expect("read lease file");
    assert!(rec.contains("owner_name=\"vm-r\""), "{rec}");
    assert!(rec.contains(&format!("daemon_pid={}", d.pid())), "{rec}");
    assert!(
        rec.contains("owner_uuid=07070707-0707-0707-0707-070707070707"),
        "{rec}"
    );
    let hb = heartbeat(&ls);
    wait_until("this host's heartbeat lists the lease", || {
        fs::read_to_string(&hb)
            .is_ok_and(|s| s.contains(&format!("lease=disk exclusive owners={pid}\n")))
    });
    (dir, ls, d, owner)
}

/// This host's heartbeat file in lockspace `ls`.
fn heartbeat(ls: &str) -> std::path::PathBuf {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    Path::new(ls).join(format!(".virtlockd-renew.{}", host.trim()))
}

/// When the owner goes, its lease is released and the heartbeat says so.
#[test]
fn heartbeat_follows_leases() {
    let (_dir, ls, d, mut owner) = setup("lease_renew_interval = 1\nlease_renew_timeout = 5\n");
    owner.exit();
    let hb = heartbeat(&ls);
    wait_until("the heartbeat shows no leases", || {
        fs::read_to_string(&hb).is_ok_and(|s| s.contains("leases=0\n"))
    });
    let text = fs::read_to_string(&hb).expect("heartbeat");
    assert!(text.contains(&format!("daemon_pid={}", d.pid())), "{text}");
    // A new lease in the same lockspace is renewed again.
    let mut again = owner_holding(&d, &ls, "disk-2");
    let pid2 = again.pid();
    wait_until("the heartbeat lists the new lease", || {
        fs::read_to_string(&hb)
            .is_ok_and(|s| s.contains(&format!("lease=disk-2 exclusive owners={pid2}\n")))
    });
    again.exit();
    assert!(!d.stderr().contains("lease lost"), "{}", d.stderr());
}

#[test]
fn lost_lock_kills_its_owner() {
    let (_dir, ls, d, mut owner) = setup("lease_renew_interval = 1\nlease_renew_timeout = 5\n");
    let pid = owner.pid();
    let _thief = steal(&Path::new(&ls).join("disk"));
    wait_until("the owner of the lost lease is killed", || is_dead(pid));
    let log = d.stderr();
    assert!(log.contains("lease lost"), "{log}");
    assert!(log.contains("owner killed"), "{log}");
    owner.exit();
}

#[test]
fn loss_action_none_only_logs() {
    let (_dir, ls, d, mut owner) =
        setup("lease_renew_interval = 1\nlease_renew_timeout = 5\nlease_loss_action = \"none\"\n");
    let pid = owner.pid();
    let _thief = steal(&Path::new(&ls).join("disk"));
    wait_until("the loss is logged", || d.stderr().contains("lease lost"));
    assert!(!is_dead(pid), "lease_loss_action=none killed the owner");
    assert!(d.stderr().contains("owner left running"), "{}", d.stderr());
    owner.exit();
}

#[test]
fn bad_lease_config_is_refused() {
    for conf in [
        "lease_loss_action = \"reboot\"\n",
        "lease_renew_interval = 5\nlease_renew_timeout = 2\n",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("virtlockd.conf");
        fs::write(&f, conf).expect("write config");
        // In a private /run, and bounded: if it wrongly started, it must not touch the
        // host's sockets nor hang the test.
        let out = std::process::Command::new("timeout")
            .args([
                "20",
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
            ])
            .arg("mount -t tmpfs tmpfs /run && exec \"$0\" -f \"$1\"")
            .arg(binary(DaemonKind::Ours, Service::Virtlockd))
            .arg(&f)
            .output()
            .expect("run virtlockd");
        assert!(!out.status.success(), "{conf}: accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lease_"), "{conf}: {err}");
    }
}

/// `vhctl holders DIR`: the hosts renewing in a shared lockspace, stale ones flagged, and
/// each lease file's lock and holder record.
#[test]
fn vhctl_holders_shows_hosts_and_flags_stale_ones() {
    let (_dir, ls, d, mut owner) = setup("lease_renew_interval = 1\nlease_renew_timeout = 5\n");
    let pid = owner.pid();
    // Another host that stopped renewing long ago while listing a lease.
    fs::write(
        Path::new(&ls).join(".virtlockd-renew.ghost"),
        "host=ghost\ndaemon_pid=77\nrenewed=1\nleases=1\nlease=old-disk exclusive owners=5\n",
    )
    .expect("write ghost heartbeat");
    let out = std::process::Command::new(bin_dir().join("vhctl"))
        .args(["holders", &ls])
        .output()
        .expect("run vhctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host = fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let host = host.trim();
    for want in [
        format!("host {host} (virtlockd pid {}): renewed", d.pid()),
        format!("disk exclusive owners={pid}"),
        // Our leases are OFD locks: F_GETLK reports them with pid -1.
        "write-locked (OFD lock)".to_string(),
        format!("listed by {host}"),
        format!("owner_pid={pid}"),
        "host ghost (virtlockd pid 77): STALE".to_string(),
    ] {
        assert!(text.contains(&want), "missing '{want}' in:\n{text}");
    }
    owner.exit();
}

/// Renewal carries on across a SIGUSR1 re-exec: the new process proves the restored
/// leases (same pid, same locks: no false loss) and still fences a real loss.
#[test]
fn renewal_survives_reexec() {
    let (_dir, ls, d, mut owner) = setup("lease_renew_interval = 1\nlease_renew_timeout = 5\n");
    let pid = owner.pid();
    let lease = Path::new(&ls).join("disk");
    // Empty the holder record (from this process: the daemon's lock is untouched); only
    // the re-executed daemon, which has not recorded anything yet, writes it again.
    OpenOptions::new()
        .write(true)
        .open(&lease)
        .and_then(|f| f.set_len(0))
        .expect("truncate lease file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .expect("SIGUSR1");
    wait_until(
        "the re-executed daemon renews and records the lease",
        || fs::read_to_string(&lease).is_ok_and(|s| s.contains(&format!("owner_pid={pid}"))),
    );
    assert!(
        !is_dead(pid),
        "owner killed across re-exec:\n{}",
        d.stderr()
    );
    let _thief = steal(&lease);
    wait_until("the owner of the lost lease is killed", || is_dead(pid));
    assert!(d.stderr().contains("owner killed"), "{}", d.stderr());
    owner.exit();
}
