//! Differential test of the admin program: the real `virt-admin` (libvirt 9.0) against
//! the C virtlogd/virtlockd and against ours, each daemon in its own private mount
//! namespace with a tmpfs on /run. The outputs, with times and pids masked, must be
//! identical.
//!
//! Needs root, `unshare`, `/usr/bin/virt-admin` and the C daemons in `/usr/sbin`, and our
//! binaries built (`cargo build -p virtlogd -p virtlockd`). It fails when any of them is
//! missing rather than skipping.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIRT_ADMIN: &str = "/usr/bin/virt-admin";

/// Where our binaries are (the kit's one way to find them).
fn our_bin(name: &str) -> PathBuf {
    vh_testkit::bin_dir().join(name)
}

fn require(p: &Path, hint: &str) {
    assert!(p.is_file(), "{} is missing: {hint}", p.display());
}

/// A daemon in a private mount namespace; killed and reaped on drop.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Daemon {
    fn spawn(bin: &Path, name: &'static str) -> Daemon {
        // The child's pid is the daemon's (the namespace is set up before its exec).
        let child = vh_testkit::Launch::new(bin)
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the daemon");
        let d = Daemon { child, name };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(d.sock(true).exists() && d.sock(false).exists()) {
            assert!(
                Instant::now() < deadline,
                "{} ({}) did not create its sockets",
                name,
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Sockets exist before the programs are registered; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        d
    }

    fn sock(&self, admin: bool) -> PathBuf {
        let suffix = if admin { "-admin-sock" } else { "-sock" };
        PathBuf::from(format!(
            "/proc/{}/root/run/libvirt/{}{suffix}",
            self.child.id(),
            self.name
        ))
    }

    /// Runs one virt-admin command line against this daemon; returns masked output.
    fn virt_admin(&self, args: &[&str]) -> String {
        let uri = format!(
            "{}:///system?socket={}",
            self.name,
            self.sock(true).display()
        );
        let out = Command::new(VIRT_ADMIN)
            .arg("-c")
            .arg(&uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run virt-admin");
        format!(
            "rc={:?}\nstdout:\n{}stderr:\n{}",
            out.status.code(),
            mask(&String::from_utf8_lossy(&out.stdout)),
            mask(&String::from_utf8_lossy(&out.stderr))
        )
    }

    /// A connection to the main socket that has made one call (so libvirt has built
    /// its identity) and stays open.
    fn hold_client(&self) -> UnixStream {
        let mut s = UnixStream::connect(self.sock(false)).expect("connect main socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut body = Vec::new();
        let (prog, proc_, args): (u32, i32, Vec<u8>) = if self.name == "virtlogd" {
            // GET_LOG_FILE_POSITION of a file nobody has open
            let path = b"/nonexistent/x.log";
            let mut a = Vec::new();
            a.extend((path.len() as u32).to_be_bytes());
            a.extend(path);
            a.extend([0u8; 2]); // pad 18 -> 20
            a.extend(0u32.to_be_bytes());
            (0x8753_9319, 2, a)
        } else {
            // RESTRICT before REGISTER: an error, but the handler ran
            (0x0EA7_BEEF, 2, 0u32.to_be_bytes().to_vec())
        };
        for w in [prog, 1, proc_ as u32, 0, 0, 0] {
            body.extend(w.to_be_bytes());
        }
        body.extend(args);
        let mut frame = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        frame.extend(body);
        s.write_all(&frame).expect("send call");
        let mut len = [0u8; 4];
        s.read_exact(&mut len).expect("read reply length");
        let mut rest = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        s.read_exact(&mut rest).expect("read reply");
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        vh_testkit::stop(&mut self.child);
    }
}

/// 9.0's text for max_clients < max_unauth_clients, with its halves swapped; 11.3 (and
/// ours) reword it. `tests/interop11` compares ours with C 11.3's text.
const CLIENT_LIMITS_9_0: &str = "The overall maximum number of clients waiting for authentication must not be less than the overall maximum number of clients";
const CLIENT_LIMITS_11_3: &str = "The overall maximum number of clients must not be less than the number of clients waiting for authentication";

/// Masks what differs by nature: connection times and peer pids; and what differs by
/// choice: the daemon's version (we report 11.3.0 on every host; README, "Deliberate
/// differences"; `libvirt11.rs` checks ours) and 9.0's client-limits wording (we follow
/// 11.3's).
fn mask(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = mask_times(l).replace(CLIENT_LIMITS_9_0, CLIENT_LIMITS_11_3);
            match l.split_once(':') {
                Some((k, _)) if k.trim() == "unix_process_id" => format!("{k}: PID"),
                Some((k, _)) if k.trim() == "Running against daemon" => format!("{k}: VERSION"),
                _ => l,
            }
        })
        .map(|l| l + "\n")
        .collect()
}

/// Replaces `YYYY-MM-DD HH:MM:SS+ZZZZ` with `TIME`.
fn mask_times(l: &str) -> String {
    let b = l.as_bytes();
    let pat = b"dddd-dd-dd dd:dd:dd+dddd";
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let fits = i + pat.len() <= b.len()
            && pat.iter().zip(&b[i..]).all(|(p, c)| match p {
                b'd' => c.is_ascii_digit(),
                b'+' => *c == b'+' || *c == b'-',
                _ => p == c,
            });
        if fits {
            out.push_str("TIME");
            i += pat.len();
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn script(srv: &str) -> Vec<Vec<String>> {
    let lines: Vec<Vec<&str>> = vec![
        vec!["version"],
        vec!["srv-list"],
        vec!["srv-threadpool-info", srv],
        vec!["srv-threadpool-info", "admin"],
        vec!["srv-threadpool-info", "nope"],
        vec!["srv-threadpool-set", srv, "--min-workers", "1"],
        vec!["srv-threadpool-set", srv, "--max-workers", "3"],
        vec![
            "srv-threadpool-set",
            srv,
            "--max-workers",
            "0",
            "--priority-workers",
            "2",
        ],
        vec!["srv-threadpool-info", srv],
        vec!["srv-threadpool-set", "nope", "--max-workers", "0"],
        vec!["srv-clients-list", srv],
        vec!["srv-clients-info", srv],
        vec!["srv-clients-info", "admin"],
        vec!["srv-clients-info", "nope"],
        vec!["srv-clients-set", srv, "--max-clients", "10"],
        vec!["srv-clients-set", srv, "--max-unauth-clients", "20"],
        vec!["srv-clients-set", srv, "--max-clients", "2000"],
        vec!["srv-clients-info", srv],
        vec!["srv-clients-set", "nope", "--max-clients", "3"],
        vec!["client-info", srv, "1"],
        vec!["client-info", srv, "99"],
        vec!["client-info", "nope", "1"],
        vec!["daemon-log-filters"],
        vec!["daemon-log-filters", "--filters", "1:util 3:+rpc"],
        vec!["daemon-log-filters"],
        vec!["daemon-log-filters", "--filters", "x"],
        vec!["daemon-log-filters", "--filters", ""],
        vec!["daemon-log-filters"],
        vec!["daemon-log-outputs"],
        vec!["daemon-log-outputs", "--outputs", "4:stderr"],
        vec!["daemon-log-outputs"],
        vec!["daemon-log-outputs", "--outputs", "bad"],
        vec!["daemon-log-outputs", "--outputs", ""],
        vec!["daemon-log-outputs"],
        vec!["server-update-tls", srv],
        vec!["server-update-tls", "nope"],
        vec!["daemon-timeout", "--timeout", "0"],
        vec!["client-disconnect", srv, "99"],
        vec!["client-disconnect", srv, "1"],
        vec!["srv-clients-list", srv],
        vec!["client-disconnect", srv, "1"],
    ];
    lines
        .into_iter()
        .map(|l| l.into_iter().map(String::from).collect())
        .collect()
}

fn run_script(d: &Daemon) -> Vec<(String, String)> {
    let _held = d.hold_client();
    let mut out = Vec::new();
    for cmd in script(d.name) {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let text = d.virt_admin(&args);
        if cmd[0] == "client-disconnect" {
            // the client goes away asynchronously in both daemons
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = if cmd[0] == "srv-list" {
            normalize_server_order(&text)
        } else {
            text
        };
        out.push((cmd.join(" "), text));
    }
    out
}

/// libvirt 9.0 lists servers in hash-table order, which differs from run to run of the
/// C daemon itself; compare the listing with its rows sorted by name and renumbered.
fn normalize_server_order(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.starts_with("---")) else {
        return text.to_string();
    };
    let mut names: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    names.sort_unstable();
    let mut out: Vec<String> = lines[..=start].iter().map(|l| l.to_string()).collect();
    out.extend(
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!(" {i:<4} {n}")),
    );
    out.extend(
        lines[start + 1 + names.len()..]
            .iter()
            .map(|l| l.to_string()),
    );
    out.join("\n") + "\n"
}

fn compare(name: &'static str) {
    require(Path::new(VIRT_ADMIN), "install libvirt-clients");
    let c_bin = PathBuf::from(format!("/usr/sbin/{name}"));
    require(&c_bin, "install the libvirt 9.0 daemons");
    let ours = our_bin(name);
    require(&ours, "run `cargo build -p virtlogd -p virtlockd` first");
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (private mount namespaces, system-mode daemons)"
    );

    let c = Daemon::spawn(&c_bin, name);
    let want = run_script(&c);
    drop(c);
    let r = Daemon::spawn(&ours, name);
    let got = run_script(&r);
    drop(r);

    if std::env::var_os("VH_ADMIN_DUMP").is_some() {
        for (cmd, w) in &want {
            eprintln!("=== {cmd}\n{w}");
        }
    }
    let mut diffs = Vec::new();
    for ((cmd, w), (_, g)) in want.iter().zip(&got) {
        if w != g {
            diffs.push(format!("=== {cmd}\n--- C:\n{w}--- ours:\n{g}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{name}: {} of {} virt-admin commands differ:\n{}",
        diffs.len(),
        want.len(),
        diffs.join("\n")
    );
}

#[test]
fn virtlogd_admin_matches_c() {
    compare("virtlogd");
}

#[test]
fn virtlockd_admin_matches_c() {
    compare("virtlockd");
}
