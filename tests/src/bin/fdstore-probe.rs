//! A stand-in service for `tests/systemd-crash/run.sh`: it exercises the fd-store
//! mechanism the daemons are built on (`vh_common::fdstore`, `virtlockd::lease_lock`)
//! under a real systemd, with nothing else of the daemons around it.
//!
//! `fdstore-probe DIR N`: on a fresh start, takes OFD leases on `DIR/lease-0..N`, stores
//! each fd (`vh-lease-<i>`, `FDPOLL=0`) and the two state slots, writes a snapshot
//! naming them, then `READY=1`. On a start with stored fds it resumes through
//! `fdstore::take_stored` and adopts every lease, checking each is still held as an OFD
//! lock. Progress goes to `DIR/probe.log`, one line per start.
//!
//! `fdstore-probe DIR N posix`: the baseline, libvirt 9.0's lock kind: the same leases as
//! POSIX locks, stored the same way (what they lose at a crash, the store notwithstanding).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;
use vh_common::fdstore::{self, names, FdStore, StateSlots};
use virtlockd::lease_lock::{self, LockKind};

fn log(dir: &std::path::Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("probe.log"))
    {
        let _ = writeln!(f, "{} {line}", std::process::id());
    }
}

fn main() {
    // Stored fds may lie above the unit's soft limit: raise it first, as the daemons do.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(n)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: fdstore-probe DIR N");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let posix = args.get(3).is_some_and(|a| a == "posix");
    let code = match run(&dir, n, posix) {
        Ok(line) => {
            log(&dir, &line);
            let _ = vh_common::activation::notify_ready();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Err(e) => {
            log(&dir, &format!("error {e}"));
            1
        }
    };
    std::process::exit(code);
}

fn run(dir: &std::path::Path, n: usize, posix: bool) -> Result<String, String> {
    let store = FdStore::from_env().ok_or("no fd store (NOTIFY_SOCKET and VH_FDSTORE=1)")?;
    if let Some(resumed) = fdstore::take_stored()? {
        let (table, _) = fdstore::parse_snapshot(&resumed.slots.latest().ok_or("no snapshot")?.1)?;
        let mut ofd = 0;
        for (name, &fd) in &table {
            if posix {
                // The baseline only counts: its locks died with the old process.
                continue;
            }
            match lease_lock::adopt(fd, false) {
                Ok(LockKind::Ofd) => ofd += 1,
                Ok(LockKind::Posix) => return Err(format!("{name}: POSIX after a restart")),
                Err(e) => return Err(format!("{name}: lease lost: {e}")),
            }
        }
        // Keep every adopted fd open: leaking them is the point (the process holds them).
        return Ok(format!(
            "resumed doc={} leases={} ofd={ofd} stale={} missing={}",
            resumed.doc,
            table.len(),
            resumed.stale.len(),
            resumed.missing.len()
        ));
    }
    let mut table: Vec<(RawFd, String)> = Vec::with_capacity(n);
    for i in 0..n {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(format!("lease-{i}")))
            .map_err(|e| format!("lease-{i}: {e}"))?;
        if posix {
            let lk = libc::flock {
                l_type: libc::F_WRLCK as libc::c_short,
                l_whence: libc::SEEK_SET as libc::c_short,
                l_start: 0,
                l_len: 1,
                l_pid: 0,
            };
            nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETLK(&lk))
                .map_err(|e| format!("lock lease-{i}: {e}"))?;
        } else {
            lease_lock::lock(f.as_raw_fd(), false).map_err(|e| format!("lock lease-{i}: {e}"))?;
        }
        let name = names::lease(i as u64);
        store
            .store(&name, f.as_fd(), false)
            .map_err(|e| format!("store {name}: {e}"))?;
        table.push((std::os::fd::IntoRawFd::into_raw_fd(f), name));
    }
    let mut slots = StateSlots::create().map_err(|e| e.to_string())?;
    slots.store_in(&store).map_err(|e| e.to_string())?;
    slots
        .write(&fdstore::snapshot_body(&table, "first"))
        .map_err(|e| e.to_string())?;
    Ok(format!("fresh leases={n}"))
}
