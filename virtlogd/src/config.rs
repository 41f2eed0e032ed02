//! virtlogd's own keys of `virtlogd.conf`: rollover (`max_size`, `max_backups`) and
//! 11.3's log cleaner (`max_age_days`, `log_root`). The keys both daemons read, and the
//! file syntax, are `vh_common::config`'s.

use vh_common::config::{Conf, ConfigError, DaemonKeys};

/// 11.3's `log_root` default (`LOCALSTATEDIR "/log/libvirt/"`, trailing slash included:
/// it shows in the paths the cleaner builds).
pub const DEFAULT_LOG_ROOT: &str = "/var/log/libvirt/";

/// virtlogd's keys, over the shared ones in [`vh_common::config::DaemonConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogdKeys {
    /// Rollover size in bytes (0 disables rollover).
    pub max_size: u64,
    /// Number of backups kept.
    pub max_backups: u64,
    /// 11.3: days after their last change that log chains are deleted; 0 = never (the
    /// cleaner does not run).
    pub max_age_days: u64,
    /// 11.3: the directory the cleaner walks.
    pub log_root: String,
}

impl Default for LogdKeys {
    fn default() -> Self {
        LogdKeys {
            max_size: 2_097_152,
            max_backups: 3,
            max_age_days: 0,
            log_root: DEFAULT_LOG_ROOT.to_string(),
        }
    }
}

impl DaemonKeys for LogdKeys {
    /// 11.3's order: `max_size`, `max_backups`, `max_age_days`, `log_root` (the first bad
    /// one is the one reported).
    fn from_conf(conf: &Conf) -> Result<LogdKeys, ConfigError> {
        let mut k = LogdKeys::default();
        if let Some(v) = conf.get_unsigned("max_size", u64::MAX)? {
            k.max_size = v;
        }
        if let Some(v) = conf.get_unsigned("max_backups", u64::MAX)? {
            k.max_backups = v;
        }
        if let Some(v) = conf.get_unsigned("max_age_days", u64::MAX)? {
            k.max_age_days = v;
        }
        if let Some(v) = conf.get_string("log_root")? {
            k.log_root = v;
        }
        Ok(k)
    }
}
