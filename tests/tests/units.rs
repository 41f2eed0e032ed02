//! Our systemd units must carry the same settings as Debian 12's libvirt 9.0 units, so
//! swapping the binaries changes nothing about how systemd runs them.

use std::collections::BTreeSet;
use std::path::Path;

/// The setting lines of a unit (comments and blank lines dropped), order kept per
/// section but compared as a set: systemd does not care about line order.
fn settings(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
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

#[test]
fn units_match_debian_12() {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let debian = Path::new("/lib/systemd/system");
    assert!(
        debian.join("virtlogd.service").exists(),
        "Debian's libvirt units are missing: install libvirt-daemon-system (.ci/install-deps)"
    );
    for unit in [
        "virtlogd.service",
        "virtlogd.socket",
        "virtlogd-admin.socket",
        "virtlockd.service",
        "virtlockd.socket",
        "virtlockd-admin.socket",
    ] {
        let a = std::fs::read_to_string(ours.join(unit)).expect("our unit");
        let b = std::fs::read_to_string(debian.join(unit)).expect("Debian's unit");
        assert_eq!(
            settings(&a),
            settings(&b),
            "{unit} differs from Debian 12's"
        );
    }
}
