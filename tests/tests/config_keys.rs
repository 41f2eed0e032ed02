//! Both daemons' config keys, read through their real parsers: `vh_common::config` for
//! the shared keys and the file, `virtlogd::config::LogdKeys` and
//! `virtlockd::config::LeaseConfig` for each daemon's own.
//!
//! These tests lived in common's `config.rs` while common held every daemon's keys; they
//! moved here word for word when each daemon took its own keys. What they need and
//! production no longer has is one settings struct holding both daemons' keys:
//! `DaemonConfig` below is that view, filled by field copies from the real parsers
//! (`KeySet::Log` reads virtlogd's keys, `KeySet::Lock` virtlockd's; the other daemon's
//! keys keep their defaults, as they did).

use std::path::Path;
use vh_common::config::{self as common, parse, Conf, ConfigError, MAX_CONFIG_FILE_SIZE};
// `crate::manual` for the moved test.
use vh_common::manual;
use virtlockd::config::{LeaseConfig, LeaseLossAction};
use virtlogd::config::{LogdKeys, DEFAULT_LOG_ROOT};

/// Which daemon's keys to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeySet {
    Log,
    Lock,
}

/// Both daemons' keys in one struct (the shape the moved assertions compare).
#[derive(Debug, Clone, PartialEq, Eq)]
struct DaemonConfig {
    log_level: u32,
    log_filters: Option<String>,
    log_outputs: Option<String>,
    max_clients: u32,
    admin_max_clients: u32,
    max_size: u64,
    max_backups: u64,
    max_age_days: u64,
    log_root: String,
    lease: LeaseConfig,
}

impl DaemonConfig {
    fn view(shared: common::DaemonConfig, logd: LogdKeys, lease: LeaseConfig) -> DaemonConfig {
        DaemonConfig {
            log_level: shared.log_level,
            log_filters: shared.log_filters,
            log_outputs: shared.log_outputs,
            max_clients: shared.max_clients,
            admin_max_clients: shared.admin_max_clients,
            max_size: logd.max_size,
            max_backups: logd.max_backups,
            max_age_days: logd.max_age_days,
            log_root: logd.log_root,
            lease,
        }
    }

    fn of_logd(c: common::DaemonConfig<LogdKeys>) -> DaemonConfig {
        let logd = c.own.clone();
        DaemonConfig::view(c.with_own(()), logd, LeaseConfig::default())
    }

    fn of_lockd(c: common::DaemonConfig<LeaseConfig>) -> DaemonConfig {
        let lease = c.own;
        DaemonConfig::view(c.with_own(()), LogdKeys::default(), lease)
    }

    fn from_conf(conf: &Conf, keys: KeySet) -> Result<DaemonConfig, ConfigError> {
        Ok(match keys {
            KeySet::Log => DaemonConfig::of_logd(common::DaemonConfig::from_conf(conf)?),
            KeySet::Lock => DaemonConfig::of_lockd(common::DaemonConfig::from_conf(conf)?),
        })
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig::view(
            common::DaemonConfig::default(),
            LogdKeys::default(),
            LeaseConfig::default(),
        )
    }
}

fn load(path: &Path, explicit: bool, keys: KeySet) -> Result<DaemonConfig, ConfigError> {
    match keys {
        KeySet::Log => common::load(path, explicit).map(DaemonConfig::of_logd),
        KeySet::Lock => common::load(path, explicit).map(DaemonConfig::of_lockd),
    }
}

fn p(s: &str) -> Result<Conf, ConfigError> {
    parse("t.conf", s.as_bytes())
}

#[test]
fn first_duplicate_wins() {
    let c = p("max_size=100\nmax_size=200\n").unwrap();
    let d = DaemonConfig::from_conf(&c, KeySet::Log).unwrap();
    assert_eq!(d.max_size, 100);
}

#[test]
fn typed_defaults_and_values() {
    assert_eq!(
        DaemonConfig::default(),
        DaemonConfig {
            log_level: 0,
            log_filters: None,
            log_outputs: None,
            max_clients: 1024,
            admin_max_clients: 5000,
            max_size: 2097152,
            max_backups: 3,
            max_age_days: 0,
            log_root: "/var/log/libvirt/".into(),
            lease: LeaseConfig::default(),
        }
    );
    let c = p(
        "log_level = 1\nlog_filters=\"1:rpc\"\nlog_outputs='1:stderr'\n\
               max_clients=7\nadmin_max_clients=8\nmax_size=9\nmax_backups=10\nunknown=[1]\n\
               max_age_days=11\nlog_root='/srv/logs'",
    )
    .unwrap();
    let d = DaemonConfig::from_conf(&c, KeySet::Log).unwrap();
    assert_eq!(
        d,
        DaemonConfig {
            log_level: 1,
            log_filters: Some("1:rpc".into()),
            log_outputs: Some("1:stderr".into()),
            max_clients: 7,
            admin_max_clients: 8,
            max_size: 9,
            max_backups: 10,
            max_age_days: 11,
            log_root: "/srv/logs".into(),
            lease: LeaseConfig::default(),
        }
    );
    let l = DaemonConfig::from_conf(&c, KeySet::Lock).unwrap();
    assert_eq!(l.max_size, 2097152);
    assert_eq!(l.max_backups, 3);
    assert_eq!(l.max_clients, 7);
    assert_eq!(l.max_age_days, 0);
    assert_eq!(l.log_root, DEFAULT_LOG_ROOT);
    // virtlockd ignores bad max_size (and the cleaner keys) entirely.
    let c = p("max_size = 'x'\nmax_age_days = -1\nlog_root = 3").unwrap();
    assert!(DaemonConfig::from_conf(&c, KeySet::Lock).is_ok());
}

#[test]
fn lease_keys() {
    let l = |s: &str| DaemonConfig::from_conf(&p(s).unwrap(), KeySet::Lock).map(|c| c.lease);
    assert_eq!(l("").unwrap(), LeaseConfig::default());
    assert_eq!(
        l("").unwrap().renew_interval,
        0,
        "renewal is off by default"
    );
    let on = l("lease_renew_interval = 2").unwrap();
    assert_eq!(
        (on.renew_timeout, on.loss_action),
        (6, LeaseLossAction::Kill)
    );
    let none =
        l("lease_renew_interval=1\nlease_renew_timeout=4\nlease_loss_action='none'").unwrap();
    assert_eq!(
        (none.renew_timeout, none.loss_action),
        (4, LeaseLossAction::None)
    );
    assert!(l("lease_loss_action = 'reboot'").is_err());
    assert!(l("lease_renew_interval = 5\nlease_renew_timeout = 5").is_err());
    // virtlogd does not read them.
    let c = p("lease_loss_action = 'reboot'").unwrap();
    assert!(DaemonConfig::from_conf(&c, KeySet::Log).is_ok());
}

#[test]
fn type_errors() {
    let e = |s: &str| {
        DaemonConfig::from_conf(&p(s).unwrap(), KeySet::Log)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        e("max_size = -1"),
        "internal error: t.conf: expected an unsigned integer for 'max_size' parameter"
    );
    assert_eq!(
        e("max_size = \"10\""),
        "internal error: t.conf: expected an unsigned integer for 'max_size' parameter"
    );
    assert_eq!(
        e("log_filters = 3"),
        "internal error: t.conf: expected a string for 'log_filters' parameter"
    );
    assert_eq!(
        e("log_outputs = [\"1:stderr\"]"),
        "internal error: t.conf: expected a string for 'log_outputs' parameter"
    );
    assert_eq!(
        e("max_clients = 4294967296"),
        "internal error: t.conf: value for 'max_clients' parameter must be in range 0:4294967295"
    );
    // 11.3's texts for the cleaner keys (max_age_days is a size_t, log_root a string).
    assert_eq!(
        e("max_age_days = -1"),
        "internal error: t.conf: expected an unsigned integer for 'max_age_days' parameter"
    );
    assert_eq!(
        e("max_age_days = '3'"),
        "internal error: t.conf: expected an unsigned integer for 'max_age_days' parameter"
    );
    assert_eq!(
        e("log_root = 1"),
        "internal error: t.conf: expected a string for 'log_root' parameter"
    );
    // 11.3's order: max_backups before max_age_days before log_root.
    assert_eq!(
        e("log_root = 1\nmax_age_days = -1\nmax_backups = -1"),
        "internal error: t.conf: expected an unsigned integer for 'max_backups' parameter"
    );
    // libvirt's order: log_level is checked before max_size.
    assert_eq!(
        e("max_size=-1\nlog_level='x'"),
        "internal error: t.conf: expected an unsigned integer for 'log_level' parameter"
    );
}

#[test]
fn load_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent.conf");
    assert_eq!(
        load(&missing, false, KeySet::Log).unwrap(),
        DaemonConfig::default()
    );
    let e = load(&missing, true, KeySet::Log).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Failed to open file '{}': No such file or directory",
            missing.display()
        )
    );
    assert_eq!(
        e.load_failure_message(&missing),
        format!(
            "Can't load config file: Failed to open file '{0}': No such file or directory: {0}",
            missing.display()
        )
    );

    let f = dir.path().join("v.conf");
    std::fs::write(&f, "max_backups = 5\n").unwrap();
    assert_eq!(load(&f, true, KeySet::Log).unwrap().max_backups, 5);
    assert_eq!(load(&f, false, KeySet::Log).unwrap().max_backups, 5);

    std::fs::write(&f, "max_backups = \n").unwrap();
    assert_eq!(
        load(&f, false, KeySet::Log).unwrap_err().to_string(),
        format!(
            "configuration file syntax error: {}:1: expecting a value",
            f.display()
        )
    );

    // Exactly 10 MiB is accepted, one byte more is not.
    let mut big = vec![b' '; MAX_CONFIG_FILE_SIZE as usize];
    big[0] = b'#';
    std::fs::write(&f, &big).unwrap();
    assert!(load(&f, true, KeySet::Log).is_ok());
    big.push(b'\n');
    std::fs::write(&f, &big).unwrap();
    assert_eq!(
        load(&f, true, KeySet::Log).unwrap_err().to_string(),
        format!(
            "Failed to read file '{}': Argument list too long",
            f.display()
        )
    );
}

/// The documented defaults are the ones the daemons use, and every documented key
/// is one the config parser reads (a wrong type is an error naming it).
#[test]
fn config_keys_match_the_parser() {
    let d = DaemonConfig::default();
    let default = |n: &str| {
        crate::manual::CONFIG_KEYS
            .iter()
            .find(|k| k.name == n)
            .unwrap()
            .default
    };
    assert_eq!(default("max_size"), d.max_size.to_string());
    assert_eq!(default("max_backups"), d.max_backups.to_string());
    assert_eq!(default("max_clients"), d.max_clients.to_string());
    assert_eq!(
        default("admin_max_clients"),
        d.admin_max_clients.to_string()
    );
    for k in crate::manual::CONFIG_KEYS {
        let bad = if k.default.starts_with('"') {
            format!("{} = 1\n", k.name)
        } else {
            format!("{} = \"x\"\n", k.name)
        };
        let conf = parse("t.conf", bad.as_bytes()).unwrap();
        let e = DaemonConfig::from_conf(&conf, KeySet::Log).unwrap_err();
        assert!(e.to_string().contains(k.name), "{}: {e}", k.name);
    }
}
