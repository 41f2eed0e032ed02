//! Two "hosts": two of our virtlockd daemons, each in its own mount namespace, sharing one
//! lockspace directory (a tempdir under /tmp, outside every tmpfs mount, so both see the
//! same directory, as two hosts see one NFS export). Exclusion across daemons is decided by
//! the byte-0 fcntl locks, not by either daemon's table.
//!
//! The lease holder is a real owner process ([`OwnerChild`]): the connection is made by a
//! disposable child, REGISTER names the child's own pid, so when the child dies and its
//! connection closes, daemon 1 releases the lease (and its kill of the owner finds
//! nothing), after which daemon 2 can take it.

use vh_common::error::{code, domain};
use vh_tests::*;
use virtlockd::protocol as lk;

#[track_caller]
fn ok(conn: &mut Conn, bytes: &[u8], what: &str) {
    expect_ok(&conn.roundtrip(bytes, what), what);
}

#[track_caller]
fn err(conn: &mut Conn, bytes: &[u8], what: &str) -> RpcError {
    expect_error(&conn.roundtrip(bytes, what), what)
}

fn run(shared_flags: bool) {
    let dir = tempfile::Builder::new()
        .prefix("vh-two-hosts-")
        .tempdir()
        .expect("tempdir");
    let ls = dir.path().join("lockspace");
    let ls = ls.to_str().unwrap();
    let h1 = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let h2 = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let name = "f2f4417b8fe812d19e40421ca4d46765c702e950c54a3a74e967e48dc9812492";
    let (acq_flags, other_flags) = if shared_flags {
        // Host 1 shared, host 2 exclusive: still refused across hosts.
        (
            lk::ACQUIRE_AUTOCREATE | lk::ACQUIRE_SHARED,
            lk::ACQUIRE_AUTOCREATE,
        )
    } else {
        (lk::ACQUIRE_AUTOCREATE, lk::ACQUIRE_AUTOCREATE)
    };

    // Both hosts' libvirtd create the lockspace at start.
    for h in [&h1, &h2] {
        let mut c = h.connect();
        ok(
            &mut c,
            &lock_call(
                lk::proc_::CREATE_LOCKSPACE,
                0,
                &args::lock_create_lockspace(ls),
            ),
            "create lockspace",
        );
    }

    // Host 1: QEMU's own connection (REGISTER with its pid + RESTRICT) and libvirtd's
    // acquire connection registering the same pid.
    let mut qemu = OwnerChild::connect(&h1.sock());
    let pid = qemu.pid();
    ok(
        qemu.conn(),
        &lock_call(
            lk::proc_::REGISTER,
            0,
            &args::lock_register([1; 16], "vm1", 1, pid, 0),
        ),
        "h1 register (QEMU)",
    );
    ok(
        qemu.conn(),
        &lock_call(lk::proc_::RESTRICT, 1, &args::lock_flags(0)),
        "h1 restrict (QEMU)",
    );
    {
        let mut lv = h1.connect();
        ok(
            &mut lv,
            &lock_call(
                lk::proc_::REGISTER,
                0,
                &args::lock_register([1; 16], "vm1", 1, pid, 0),
            ),
            "h1 register (libvirtd)",
        );
        ok(
            &mut lv,
            &lock_call(
                lk::proc_::ACQUIRE_RESOURCE,
                1,
                &args::lock_resource(ls, name, acq_flags),
            ),
            "h1 acquire",
        );
    } // libvirtd's connection closes: the lease stays (peer pid != owner pid).
    let lockfile = std::path::Path::new(ls).join(name);
    assert!(lockfile.exists(), "lock file in the shared directory");

    // Host 2 is refused while host 1 holds it; the refusal is RESOURCE_BUSY.
    let mut h2c = h2.connect();
    ok(
        &mut h2c,
        &lock_call(
            lk::proc_::REGISTER,
            0,
            &args::lock_register([2; 16], "vm2", 7, 0x7fff_0042, 0),
        ),
        "h2 register",
    );
    let e = err(
        &mut h2c,
        &lock_call(
            lk::proc_::ACQUIRE_RESOURCE,
            1,
            &args::lock_resource(ls, name, other_flags),
        ),
        "h2 acquire while h1 holds",
    );
    assert_eq!(
        (e.code, e.domain),
        (code::RESOURCE_BUSY, domain::LOCKSPACE),
        "{e:?}"
    );
    assert_eq!(
        e.message.as_deref(),
        Some(&*format!(
            "resource busy: Lockspace resource '{name}' is locked"
        ))
    );
    // Host 2's failed attempt left host 1's lease alone (it must not have closed or
    // unlinked anything host 1 relies on).
    assert!(lockfile.exists());
    let e = err(
        &mut h2c,
        &lock_call(
            lk::proc_::ACQUIRE_RESOURCE,
            2,
            &args::lock_resource(ls, name, other_flags),
        ),
        "h2 acquire again",
    );
    assert_eq!(e.code, code::RESOURCE_BUSY);

    // QEMU on host 1 dies: its connection closes, host 1 releases everything it owned.
    qemu.exit();
    let mut serial = 3;
    wait_until(
        "host 2 can take the lease after host 1's owner exited",
        || {
            let f = h2c.roundtrip(
                &lock_call(
                    lk::proc_::ACQUIRE_RESOURCE,
                    serial,
                    &args::lock_resource(ls, name, other_flags),
                ),
                "h2 acquire after release",
            );
            serial += 1;
            match f.error() {
                None => true,
                Some(e) if e.code == code::RESOURCE_BUSY => false,
                Some(e) => panic!("unexpected error: {e:?}"),
            }
        },
    );
    assert!(lockfile.exists(), "host 2 holds it now");
    // And now host 1 is the one refused.
    let mut lv = h1.connect();
    ok(
        &mut lv,
        &lock_call(
            lk::proc_::REGISTER,
            0,
            &args::lock_register([3; 16], "vm3", 3, 0x7fff_0043, 0),
        ),
        "h1 register vm3",
    );
    let e = err(
        &mut lv,
        &lock_call(
            lk::proc_::ACQUIRE_RESOURCE,
            1,
            &args::lock_resource(ls, name, lk::ACQUIRE_AUTOCREATE),
        ),
        "h1 acquire while h2 holds",
    );
    assert_eq!(e.code, code::RESOURCE_BUSY);
    // Host 2 releases: the file goes (last owner, AUTOCREATE).
    ok(
        &mut h2c,
        &lock_call(
            lk::proc_::RELEASE_RESOURCE,
            100,
            &args::lock_resource(ls, name, 0),
        ),
        "h2 release",
    );
    assert!(!lockfile.exists());
    ok(
        &mut lv,
        &lock_call(
            lk::proc_::ACQUIRE_RESOURCE,
            2,
            &args::lock_resource(ls, name, lk::ACQUIRE_AUTOCREATE),
        ),
        "h1 acquire after h2 released",
    );
    ok(
        &mut lv,
        &lock_call(
            lk::proc_::RELEASE_RESOURCE,
            3,
            &args::lock_resource(ls, name, 0),
        ),
        "h1 release",
    );
}

#[test]
fn lease_refused_across_hosts_until_owner_exits() {
    run(false);
}

#[test]
fn shared_lease_still_excludes_exclusive_across_hosts() {
    run(true);
}

/// Shared leases are compatible across hosts; the lock file stays until the last host
/// releases (a host only unlinks when it can upgrade to an exclusive lock).
#[test]
fn shared_leases_across_hosts() {
    let dir = tempfile::Builder::new()
        .prefix("vh-two-hosts-")
        .tempdir()
        .unwrap();
    let ls = dir.path().join("ls");
    let ls = ls.to_str().unwrap();
    let h1 = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let h2 = Daemon::spawn(DaemonKind::Ours, Service::Virtlockd, "");
    let flags = lk::ACQUIRE_AUTOCREATE | lk::ACQUIRE_SHARED;
    let mut conns = Vec::new();
    for (i, h) in [&h1, &h2].into_iter().enumerate() {
        let mut c = h.connect();
        ok(
            &mut c,
            &lock_call(
                lk::proc_::CREATE_LOCKSPACE,
                0,
                &args::lock_create_lockspace(ls),
            ),
            "create",
        );
        ok(
            &mut c,
            &lock_call(
                lk::proc_::REGISTER,
                1,
                &args::lock_register([i as u8; 16], "vm", 1 + i as u32, 0x7fff_0100 + i as u32, 0),
            ),
            "register",
        );
        ok(
            &mut c,
            &lock_call(
                lk::proc_::ACQUIRE_RESOURCE,
                2,
                &args::lock_resource(ls, "shared", flags),
            ),
            "acquire shared",
        );
        conns.push(c);
    }
    let f = std::path::Path::new(ls).join("shared");
    ok(
        &mut conns[0],
        &lock_call(
            lk::proc_::RELEASE_RESOURCE,
            3,
            &args::lock_resource(ls, "shared", 0),
        ),
        "h1 release",
    );
    assert!(f.exists(), "h2 still holds a read lock: h1 must not unlink");
    ok(
        &mut conns[1],
        &lock_call(
            lk::proc_::RELEASE_RESOURCE,
            3,
            &args::lock_resource(ls, "shared", 0),
        ),
        "h2 release",
    );
    assert!(!f.exists(), "last holder unlinks");
}
