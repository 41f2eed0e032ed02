//! The log cleaner of libvirt 11.3 (`max_age_days`, `log_root` in virtlogd.conf): once a
//! day it deletes the log chains under `log_root` that nobody wrote to for
//! `max_age_days` days.
//!
//! 11.3's rules, which this follows:
//! * It runs only when `max_age_days` > 0; the first pass is 24 h after the daemon
//!   started (or re-executed), then every 24 h.
//! * It walks `log_root` and the directories directly under it (one level), following
//!   symlinks (`stat`); entries that cannot be stat'ed are skipped.
//! * A regular file whose path matches `^(.*)\.log(\.(\d+))?$` belongs to the chain
//!   `$1`; `NAME.log` has index 0, `NAME.log.N` index N. An index that does not fit an
//!   `int` puts the file in no chain.
//! * A file whose index is above `max_backups` is deleted at once, whatever its age.
//! * A chain's age is the newest mtime of its files. A chain no newer than now −
//!   `max_age_days` days loses `NAME.log` and `NAME.log.0` up to its highest index seen.
//! * Chains of the logs open in the daemon are never deleted.
//!
//! Where we are safer than 11.3 (README, "Deliberate differences"):
//! * Open logs are recognised by the canonical path of their directory. 11.3 compares
//!   path strings, and its default `log_root` ends in `/`, so its walk sees
//!   `/var/log/libvirt//qemu/g.log` while the open log is `/var/log/libvirt/qemu/g.log`:
//!   an open log that has been quiet for `max_age_days` is deleted under the guest.
//! * Whether a chain's log is open is asked again right before its files go, with opens
//!   held off meanwhile (a guest may start while a pass runs; 11.3's single thread
//!   cannot see that happen).
//! * `now − max_age_days × 86400` saturates (11.3's wraps for absurd values, which can
//!   make every chain look expired).
//! * A path that is not UTF-8 is in no chain (GRegex's UTF-8 matching is undefined there).
//!
//! The pass does blocking file work: the daemon runs it on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{debug, warn};

/// How often a pass runs, and how long after start the first one does (11.3's timer).
pub const PERIOD: Duration = Duration::from_secs(24 * 3600);

/// How deep below `log_root` the walk goes (11.3: the root and one level of subdirs).
const DEPTH: u32 = 1;

/// What a pass needs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub max_age_days: u64,
    pub max_backups: u64,
    /// As configured: the walk joins names onto it with `/`, as 11.3 does.
    pub log_root: String,
}

impl Settings {
    /// Whether the cleaner runs at all.
    pub fn enabled(&self) -> bool {
        self.max_age_days > 0
    }

    /// The newest mtime an expired chain may have, for a pass at `now` (seconds).
    pub fn oldest_to_keep(&self, now: i64) -> i64 {
        let age = i64::try_from(self.max_age_days.saturating_mul(86_400)).unwrap_or(i64::MAX);
        now.saturating_sub(age)
    }
}

/// The chain a log path belongs to and its index: 11.3's `^(.*)\.log(\.(\d+))?$` on the
/// whole path. `None` for a path that is no log's, or whose index overflows an `int`.
pub fn chain_of(path: &[u8]) -> Option<(&[u8], u64)> {
    // PCRE's `$` also matches before a final newline; `.` never matches a newline.
    let p = path.strip_suffix(b"\n").unwrap_or(path);
    if p.contains(&b'\n') || std::str::from_utf8(p).is_err() {
        return None;
    }
    if let Some(prefix) = p.strip_suffix(b".log") {
        return Some((prefix, 0));
    }
    let digits_at = p.iter().rposition(|c| !c.is_ascii_digit())? + 1;
    let (head, digits) = p.split_at(digits_at);
    if digits.is_empty() {
        return None;
    }
    let prefix = head.strip_suffix(b".log.")?;
    // virStrToLong_i: the index must fit an int.
    let index: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((prefix, index as u64))
}

/// A chain prefix with its directory resolved, for comparing with the open logs.
fn canonical(prefix: &Path) -> PathBuf {
    match (prefix.parent(), prefix.file_name()) {
        (Some(dir), Some(name)) => match fs::canonicalize(dir) {
            Ok(d) => d.join(name),
            Err(_) => prefix.to_path_buf(),
        },
        _ => prefix.to_path_buf(),
    }
}

/// The canonical chains of a set of open log paths.
pub fn open_chains(open_logs: &[PathBuf]) -> HashSet<PathBuf> {
    open_logs
        .iter()
        .filter_map(|p| chain_of(p.as_os_str().as_bytes()))
        .map(|(prefix, _)| canonical(Path::new(OsStr::from_bytes(prefix))))
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
struct Chain {
    newest: i64,
    max_index: u64,
}

/// What one pass deleted, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub deleted: Vec<PathBuf>,
}

/// How a pass asks, for one expired chain (its canonical prefix), to run that chain's
/// deletion: only if no log of the chain is open, and with opens held off meanwhile.
pub type Gate<'a> = &'a dyn Fn(&Path, &mut dyn FnMut());

/// One pass at time `now`. `open_logs` are the paths open when it starts; `gate` runs
/// each expired chain's deletion against the daemon's live table.
pub fn pass(settings: &Settings, now: i64, open_logs: &[PathBuf], gate: Gate<'_>) -> Report {
    let mut report = Report::default();
    let protected = open_chains(open_logs);
    let mut chains: HashMap<Vec<u8>, Chain> = HashMap::new();
    walk(
        settings,
        settings.log_root.as_bytes(),
        DEPTH,
        &mut chains,
        &mut report,
    );
    let oldest = settings.oldest_to_keep(now);
    let mut expired: Vec<(Vec<u8>, Chain)> = chains
        .into_iter()
        .filter(|(_, c)| c.newest <= oldest)
        .collect();
    expired.sort_by(|a, b| a.0.cmp(&b.0));
    for (prefix, chain) in expired {
        let prefix = PathBuf::from(OsStr::from_bytes(&prefix));
        let key = canonical(&prefix);
        if protected.contains(&key) {
            debug!(chain = %prefix.display(), "log chain is open; kept");
            continue;
        }
        gate(&key, &mut || {
            delete(&with_suffix(&prefix, ".log"), &mut report);
            for i in 0..=chain.max_index {
                delete(&with_suffix(&prefix, &format!(".log.{i}")), &mut report);
            }
        });
    }
    report
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn walk(
    settings: &Settings,
    dir: &[u8],
    depth_left: u32,
    chains: &mut HashMap<Vec<u8>, Chain>,
    report: &mut Report,
) {
    let dir_path = Path::new(OsStr::from_bytes(dir));
    let entries = match fs::read_dir(dir_path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!("Unable to open directory {}: {e}", dir_path.display());
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // 11.3 stops reading a directory at the first error.
                warn!("Unable to read directory {}: {e}", dir_path.display());
                return;
            }
        };
        // 11.3 joins with "/" whatever the root ends with.
        let mut path = dir.to_vec();
        path.push(b'/');
        path.extend_from_slice(entry.file_name().as_bytes());
        let p = Path::new(OsStr::from_bytes(&path));
        let meta = match fs::metadata(p) {
            Ok(m) => m,
            Err(e) => {
                warn!("Unable to stat {}: {e}", p.display());
                continue;
            }
        };
        if meta.is_dir() {
            if depth_left > 0 {
                walk(settings, &path, depth_left - 1, chains, report);
            }
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        let Some((prefix, index)) = chain_of(&path) else {
            continue;
        };
        if index > settings.max_backups {
            delete(p, report);
            continue;
        }
        let c = chains.entry(prefix.to_vec()).or_default();
        c.newest = c.newest.max(meta.mtime());
        c.max_index = c.max_index.max(index);
    }
}

fn delete(path: &Path, report: &mut Report) {
    match fs::remove_file(path) {
        Ok(()) => report.deleted.push(path.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("Unable to delete {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filetime::{set_file_mtime, FileTime};

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_800_000_000;

    fn settings(root: &Path, days: u64, backups: u64) -> Settings {
        Settings {
            max_age_days: days,
            max_backups: backups,
            log_root: root.to_str().unwrap().to_string(),
        }
    }

    /// Creates `rel` under `root` with its mtime `age_days` before [`NOW`].
    fn file(root: &Path, rel: &str, age_days: i64) -> PathBuf {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, b"x").unwrap();
        set_file_mtime(&p, FileTime::from_unix_time(NOW - age_days * DAY, 0)).unwrap();
        p
    }

    fn never_open(_: &Path, delete: &mut dyn FnMut()) {
        delete()
    }

    fn names(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walkdir(root) {
            out.push(e.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
        out.sort();
        out
    }

    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                v.extend(walkdir(&p));
            } else {
                v.push(p);
            }
        }
        v
    }

    #[test]
    fn chain_names() {
        assert_eq!(chain_of(b"/a/g.log"), Some((&b"/a/g"[..], 0)));
        assert_eq!(chain_of(b"/a/g.log.0"), Some((&b"/a/g"[..], 0)));
        assert_eq!(chain_of(b"/a/g.log.12"), Some((&b"/a/g"[..], 12)));
        assert_eq!(chain_of(b"/a/g.log.007"), Some((&b"/a/g"[..], 7)));
        assert_eq!(chain_of(b"/a/g.log.log"), Some((&b"/a/g.log"[..], 0)));
        assert_eq!(chain_of(b"/a/g.log.1.log"), Some((&b"/a/g.log.1"[..], 0)));
        assert_eq!(chain_of(b"/a/.log"), Some((&b"/a/"[..], 0)));
        assert_eq!(chain_of(b"/a/g.log\n"), Some((&b"/a/g"[..], 0)));
        assert_eq!(chain_of(b"/a/g.txt"), None);
        assert_eq!(chain_of(b"/a/g.log."), None);
        assert_eq!(chain_of(b"/a/g.log.x"), None);
        assert_eq!(chain_of(b"/a/g.log.1x"), None);
        assert_eq!(chain_of(b"/a/glog.1"), None);
        assert_eq!(chain_of(b"/a/g.LOG"), None);
        assert_eq!(chain_of(b"/a\n/g.log"), None);
        assert_eq!(chain_of(b"/a/g.log\n\n"), None);
        assert_eq!(chain_of(b"/a/\xff.log"), None);
        // virStrToLong_i: an index beyond INT_MAX puts the file in no chain.
        assert_eq!(
            chain_of(b"/a/g.log.2147483647"),
            Some((&b"/a/g"[..], 2147483647))
        );
        assert_eq!(chain_of(b"/a/g.log.2147483648"), None);
    }

    #[test]
    fn deletes_expired_chains_keeps_fresh_ones() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        file(root, "old.log", 40);
        file(root, "old.log.0", 50);
        file(root, "old.log.2", 60); // .1 missing: .0 to .2 are still tried
        file(root, "young.log", 40);
        file(root, "young.log.0", 2); // one fresh file keeps the whole chain
        file(root, "edge.log", 30); // exactly max_age_days old: expired (<=)
        file(root, "notes.txt", 400);
        file(root, "qemu/g1.log", 31);
        file(root, "qemu/g1-serial.log.1", 90);
        file(root, "qemu/deep/g2.log", 400); // two levels down: never looked at
        let r = pass(&settings(root, 30, 3), NOW, &[], &never_open);
        assert_eq!(
            names(root),
            ["notes.txt", "qemu/deep/g2.log", "young.log", "young.log.0"]
        );
        assert!(r.deleted.contains(&root.join("old.log.2")));
        assert_eq!(r.deleted.len(), 6);
    }

    #[test]
    fn backups_above_max_go_whatever_their_age() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        file(root, "g.log", 0);
        file(root, "g.log.0", 0);
        file(root, "g.log.2", 0);
        file(root, "g.log.3", 0);
        file(root, "g.log.10", 0);
        file(root, "qemu/h.log.3", 0);
        pass(&settings(root, 30, 2), NOW, &[], &never_open);
        assert_eq!(names(root), ["g.log", "g.log.0", "g.log.2"]);
    }

    #[test]
    fn open_chains_are_kept_even_through_a_trailing_slash_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let open = file(root, "qemu/g1.log", 100);
        file(root, "qemu/g1.log.0", 100);
        file(root, "qemu/g2.log", 100);
        // 11.3's default root ends in '/': its walk sees ".../libvirt//qemu/g1.log".
        let mut s = settings(root, 1, 3);
        s.log_root.push('/');
        pass(&s, NOW, std::slice::from_ref(&open), &never_open);
        assert_eq!(names(root), ["qemu/g1.log", "qemu/g1.log.0"]);
        // Asked again right before deleting: a log opened while the pass ran is kept.
        file(root, "qemu/g3.log", 100);
        let g3 = canonical(&root.join("qemu/g3"));
        pass(&s, NOW, &[open], &|k: &Path, delete: &mut dyn FnMut()| {
            if k != g3 {
                delete()
            }
        });
        assert_eq!(names(root), ["qemu/g1.log", "qemu/g1.log.0", "qemu/g3.log"]);
    }

    #[test]
    fn symlinks_and_odd_entries() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let elsewhere = t.path().join("elsewhere");
        file(&elsewhere, "target.log", 100);
        file(&elsewhere, "sub/x.log", 100);
        fs::create_dir_all(&root).unwrap();
        // A symlinked file counts with its target's mtime; deleting it unlinks the link.
        std::os::unix::fs::symlink(elsewhere.join("target.log"), root.join("link.log")).unwrap();
        // A symlinked directory is walked (stat follows it).
        std::os::unix::fs::symlink(elsewhere.join("sub"), root.join("sub")).unwrap();
        // A dangling link cannot be stat'ed: skipped.
        std::os::unix::fs::symlink(t.path().join("nowhere"), root.join("dangling.log")).unwrap();
        // A directory named like a log is not a file.
        fs::create_dir_all(root.join("dir.log")).unwrap();
        pass(&settings(&root, 1, 3), NOW, &[], &never_open);
        assert!(
            !root.join("link.log").exists() && fs::symlink_metadata(root.join("link.log")).is_err()
        );
        assert!(elsewhere.join("target.log").exists());
        assert!(!elsewhere.join("sub/x.log").exists());
        assert!(fs::symlink_metadata(root.join("dangling.log")).is_ok());
        assert!(root.join("dir.log").is_dir());
    }

    #[test]
    fn missing_root_and_limits() {
        let t = tempfile::tempdir().unwrap();
        let r = pass(
            &settings(&t.path().join("none"), 1, 3),
            NOW,
            &[],
            &never_open,
        );
        assert!(r.deleted.is_empty());
        let s = settings(t.path(), 0, 3);
        assert!(!s.enabled());
        assert!(settings(t.path(), 1, 3).enabled());
        assert_eq!(settings(t.path(), 2, 3).oldest_to_keep(NOW), NOW - 2 * DAY);
        // Saturates instead of wrapping into the future.
        assert_eq!(
            settings(t.path(), u64::MAX, 3).oldest_to_keep(NOW),
            NOW - i64::MAX
        );
        file(t.path(), "g.log", 20_000);
        pass(&settings(t.path(), u64::MAX, 3), NOW, &[], &never_open);
        assert!(t.path().join("g.log").exists());
    }
}
