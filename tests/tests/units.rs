//! Our systemd units are drop-ins for both packagings: Debian 13's libvirt 11.3 units
//! (captured in `fixtures/units-11.3/`) and the Debian 12 libvirt 9.0 units installed on
//! this machine. They carry 11.3's settings (Type=notify, its hardening, its
//! LimitNOFILE) plus a short, explained list of lines kept from 9.0; every 9.0 line they
//! drop is listed here with what replaces it. `tests/systemd/run.sh` proves they run under
//! a real systemd 252.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 6] = [
    "virtlogd.service",
    "virtlogd.socket",
    "virtlogd-admin.socket",
    "virtlockd.service",
    "virtlockd.socket",
    "virtlockd-admin.socket",
];

/// Lines ours has on top of 11.3's, per unit, and why.
const EXTRA_OVER_11_3: &[(&str, &str, &str)] = &[
    (
        "virtlogd.service",
        "[Unit] Before=libvirtd.service",
        "kept from 9.0: at shutdown virtlogd stops after libvirtd, still draining the logs",
    ),
    (
        "virtlockd.service",
        "[Unit] Before=libvirtd.service",
        "kept from 9.0: at shutdown the leases outlive libvirtd",
    ),
];

/// 9.0 lines ours does not have, per unit (a `*` unit means every one), and what
/// replaces them.
const DROPPED_FROM_9_0: &[(&str, &str, &str)] = &[
    ("*", "[Unit] Description=", "11.3's wording"),
    ("*", "[Unit] Documentation=https://libvirt.org", "11.3 writes https://libvirt.org/"),
    (
        "*.service",
        "[Unit] Requires=",
        "11.3's BindsTo= on the main socket and Wants= on the admin socket, both with After=",
    ),
    (
        "*.socket",
        "[Unit] Before=libvirtd.service",
        "sockets are up before sockets.target, which libvirtd.service (After=basic.target) follows anyway",
    ),
    (
        "*.service",
        "[Service] LimitNOFILE=",
        "11.3's 1024:524288; the daemon raises its soft limit to the hard one",
    ),
];

/// The setting lines of a unit (comments and blank lines dropped), each prefixed with
/// its section, compared as a set: systemd does not care about line order.
fn settings(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        out.insert(format!("{section} {line}"));
    }
    out
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn unit_matches(pattern: &str, unit: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => unit.ends_with(suffix),
        None => pattern == unit,
    }
}

#[test]
fn units_are_debian_13s_plus_listed_extras() {
    for unit in UNITS {
        let ours = settings(&read(&repo().join("systemd").join(unit)));
        let mut want = settings(&read(&repo().join("fixtures/units-11.3").join(unit)));
        for (u, line, _why) in EXTRA_OVER_11_3 {
            if *u == unit {
                want.insert((*line).to_string());
            }
        }
        let missing: Vec<_> = want.difference(&ours).collect();
        let extra: Vec<_> = ours.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{unit} vs Debian 13's (libvirt 11.3) + EXTRA_OVER_11_3: missing {missing:?}, unexplained extra {extra:?}"
        );
    }
}

#[test]
fn units_cover_debian_12s_installed_ones() {
    let debian = Path::new("/lib/systemd/system");
    assert!(
        debian.join("virtlogd.service").exists(),
        "Debian's libvirt units are missing: install libvirt-daemon-system (.ci/install-deps)"
    );
    for unit in UNITS {
        let ours = settings(&read(&repo().join("systemd").join(unit)));
        let old = settings(&read(&debian.join(unit)));
        let new = settings(&read(&repo().join("fixtures/units-11.3").join(unit)));
        // Every 9.0 line is either kept or replaced for a listed reason.
        let unexplained: Vec<_> = old
            .difference(&ours)
            .filter(|line| {
                !DROPPED_FROM_9_0
                    .iter()
                    .any(|(u, prefix, _)| unit_matches(u, unit) && line.starts_with(prefix))
            })
            .collect();
        assert!(
            unexplained.is_empty(),
            "{unit}: Debian 12's lines {unexplained:?} are missing from ours and not in DROPPED_FROM_9_0"
        );
        // Nothing in ours comes from neither packaging nor EXTRA_OVER_11_3.
        let foreign: Vec<_> = ours
            .iter()
            .filter(|l| !old.contains(*l) && !new.contains(*l))
            .filter(|l| !EXTRA_OVER_11_3.iter().any(|(u, x, _)| *u == unit && x == l))
            .collect();
        assert!(
            foreign.is_empty(),
            "{unit}: lines from neither packaging: {foreign:?}"
        );
    }
}

/// systemd 252 (Debian 12's, installed here) must know every directive: a key it does not
/// know is only warned about and ignored, which would silently drop hardening.
#[test]
fn units_parse_cleanly_with_this_systemd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec!["verify".to_string(), "--man=no".to_string()];
    for unit in UNITS {
        let dst = dir.path().join(unit);
        std::fs::copy(repo().join("systemd").join(unit), &dst).expect("copy unit");
        args.push(dst.display().to_string());
    }
    let out = Command::new("systemd-analyze")
        .args(&args)
        .output()
        .expect("systemd-analyze (package systemd) is required");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify complained (status {}): {ours:#?}\n{stderr}",
        out.status
    );
}
