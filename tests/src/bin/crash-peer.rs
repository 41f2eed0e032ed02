//! The clients of `tests/systemd-crash/run.sh`: real clients over the real daemon
//! sockets, doing what QEMU and libvirtd do, while the script kills the daemon.
//!
//! * `crash-peer logs SOCK DIR N LINES`: opens `DIR/log-<i>.log` (i < N) through
//!   virtlogd's DOMAIN_OPEN_LOG_FILE, as libvirtd does for QEMU, then N writers stream
//!   `LINES` numbered lines each into the pipes (a line every ~2 ms), as QEMU writes its
//!   output. Prints `opened N`, then `done written=<lines> epipe=<writers>`: a writer
//!   whose pipe broke (the daemon's read end closed: the C daemon's crash) stops there.
//!   With a 6th argument HOLD (a fifo), the pipes stay open after `done` until a line
//!   (or EOF) is read from HOLD, as a QEMU that has written and keeps running: lines
//!   still in the pipes when the script stops the daemon must land all the same.
//! * `crash-peer check DIR N LINES`: every log holds each line exactly once, in order.
//!   Prints `lines ok=<n> missing=<n> duplicated=<n> out_of_order=<n>`.
//! * `crash-peer owner SOCK LOCKSPACE N CTL`: registers as a lock owner (its own pid, as
//!   QEMU's inherited connection is registered) and acquires `lease-<i>` (exclusive,
//!   autocreate) for i < N over one connection, prints `held N`, then obeys lines read
//!   from the fifo CTL: `release <i>` answers `release <i> ok|failed: <why>`; `exit`.
//! * `crash-peer other SOCK LOCKSPACE NAME`: another owner tries to acquire NAME and
//!   prints `acquire NAME refused|granted|failed: <why>`.

use std::io::{BufRead, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vh_client::connect::Target;
use vh_client::lock::{LockManager, Owner};
use vh_client::log::LogManager;
use vh_common::paths::DaemonKind;

fn usage() -> ! {
    eprintln!("usage: crash-peer logs|check|owner|other ...");
    std::process::exit(2)
}

fn arg(args: &[String], i: usize) -> &str {
    args.get(i).map(String::as_str).unwrap_or_else(|| usage())
}

fn num(args: &[String], i: usize) -> usize {
    arg(args, i).parse().unwrap_or_else(|_| usage())
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, 1) {
        "logs" => logs(
            Path::new(arg(&args, 2)),
            Path::new(arg(&args, 3)),
            num(&args, 4),
            num(&args, 5),
            args.get(6).map(Path::new),
        ),
        "check" => check(Path::new(arg(&args, 2)), num(&args, 3), num(&args, 4)),
        "owner" => owner(
            Path::new(arg(&args, 2)),
            arg(&args, 3),
            num(&args, 4),
            Path::new(arg(&args, 5)),
        ),
        "other" => other(Path::new(arg(&args, 2)), arg(&args, 3), arg(&args, 4)),
        _ => usage(),
    }
}

/// A connection to the daemon's socket `sock`; a failure is reported and ends the peer.
fn connect(kind: DaemonKind, sock: &Path) -> UnixStream {
    vh_client::connect::connect(kind, &Target::Socket(sock.into())).unwrap_or_else(|e| {
        say(&format!("error connect: {e}"));
        std::process::exit(1)
    })
}

fn log_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("log-{i}.log"))
}

fn line(i: usize, seq: usize) -> String {
    format!("log {i:03} line {seq:06} qemu output padding padding padding\n")
}

fn logs(sock: &Path, dir: &Path, n: usize, lines: usize, hold: Option<&Path>) {
    let mut lm = LogManager::from_stream(connect(DaemonKind::Logd, sock));
    let mut pipes: Vec<OwnedFd> = Vec::with_capacity(n);
    for i in 0..n {
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        match lm.open_log("qemu", uuid, &format!("guest{i}"), log_path(dir, i), true) {
            Ok((fd, _)) => pipes.push(fd),
            Err(e) => {
                say(&format!("error open {i}: {e}"));
                std::process::exit(1)
            }
        }
    }
    // libvirtd closes its connection once QEMU has the pipe.
    drop(lm);
    say(&format!("opened {n}"));
    let writers: Vec<_> = pipes
        .into_iter()
        .enumerate()
        .map(|(i, fd)| {
            std::thread::spawn(move || {
                let mut f = std::fs::File::from(fd);
                for seq in 0..lines {
                    // One write(2) per line, as QEMU's chardev does: atomic below
                    // PIPE_BUF, so a line is either wholly in the pipe or not at all.
                    if let Err(e) = f.write_all(line(i, seq).as_bytes()) {
                        return (seq, Some(e), f);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (lines, None, f)
            })
        })
        .collect();
    let mut written = 0;
    let mut broken = 0;
    let mut open = Vec::new();
    for w in writers {
        let Ok((n, err, f)) = w.join() else {
            continue;
        };
        written += n;
        if err.is_some() {
            broken += 1;
        }
        open.push(f);
    }
    say(&format!("done written={written} epipe={broken}"));
    if let Some(hold) = hold {
        if let Ok(f) = std::fs::File::open(hold) {
            let _ = std::io::BufReader::new(f).read_line(&mut String::new());
        }
    }
    drop(open);
}

fn check(dir: &Path, n: usize, lines: usize) {
    let (mut ok, mut missing, mut dup, mut order) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..n {
        let text = std::fs::read_to_string(log_path(dir, i)).unwrap_or_default();
        let mut seen = vec![0u32; lines];
        let mut last: Option<usize> = None;
        for l in text.lines() {
            let Some(seq) = l
                .strip_prefix(&format!("log {i:03} line "))
                .and_then(|r| r.get(..6))
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&s| s < lines && format!("{l}\n") == line(i, s))
            else {
                // A torn or foreign line.
                order += 1;
                continue;
            };
            seen[seq] += 1;
            if last.is_some_and(|p| seq != p + 1) {
                order += 1;
            }
            last = Some(seq);
        }
        for s in seen {
            match s {
                0 => missing += 1,
                1 => ok += 1,
                _ => dup += 1,
            }
        }
    }
    say(&format!(
        "lines ok={ok} missing={missing} duplicated={dup} out_of_order={order}"
    ));
}

fn lock_manager(sock: &Path) -> LockManager {
    LockManager::from_stream(connect(DaemonKind::Lockd, sock))
}

fn owner_of(pid: u32, tag: u8) -> Owner {
    Owner {
        uuid: [tag; 16],
        name: format!("guest-{tag}"),
        id: u32::from(tag),
        pid,
    }
}

fn owner(sock: &Path, lockspace: &str, n: usize, ctl: &Path) {
    let mut lm = lock_manager(sock);
    if let Err(e) = lm.create_lockspace(lockspace) {
        say(&format!("error lockspace: {e}"));
        std::process::exit(1)
    }
    if let Err(e) = lm.register(&owner_of(std::process::id(), 1)) {
        say(&format!("error register: {e}"));
        std::process::exit(1)
    }
    for i in 0..n {
        if let Err(e) = lm.acquire(lockspace, &format!("lease-{i}"), false, true) {
            say(&format!("error acquire {i}: {e}"));
            std::process::exit(1)
        }
    }
    say(&format!("held {n}"));
    let Ok(f) = std::fs::File::open(ctl) else {
        say("error ctl");
        std::process::exit(1)
    };
    for cmd in std::io::BufReader::new(f).lines() {
        let Ok(cmd) = cmd else { break };
        let mut w = cmd.split_whitespace();
        match (w.next(), w.next()) {
            (Some("release"), Some(i)) => match lm.release(lockspace, &format!("lease-{i}")) {
                Ok(()) => say(&format!("release {i} ok")),
                Err(e) => say(&format!("release {i} failed: {e}")),
            },
            (Some("exit"), _) => return,
            _ => say(&format!("unknown command {cmd:?}")),
        }
    }
}

fn other(sock: &Path, lockspace: &str, name: &str) {
    let mut lm = lock_manager(sock);
    // As libvirt's lockd plugin does on each connection (a restarted C daemon has
    // forgotten the lockspace).
    let _ = lm.create_lockspace(lockspace);
    // Its own pid, as another guest's QEMU; it never hangs up while holding.
    if let Err(e) = lm.register(&owner_of(std::process::id(), 2)) {
        say(&format!("acquire {name} failed: register: {e}"));
        return;
    }
    match lm.acquire(lockspace, name, false, true) {
        Ok(()) => {
            say(&format!("acquire {name} granted"));
            let _ = lm.release(lockspace, name);
        }
        Err(e) if e.is_busy() => say(&format!("acquire {name} refused")),
        Err(e) => say(&format!("acquire {name} failed: {e}")),
    }
}
