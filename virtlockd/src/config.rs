//! virtlockd's own keys of `virtlockd.conf`: lease renewal and fencing (not libvirt 9.0
//! settings). The keys both daemons read, and the file syntax, are `vh_common::config`'s;
//! virtlogd's `max_size`/`max_backups` and cleaner keys are not read here.

use vh_common::config::{Conf, ConfigError, DaemonKeys};

/// What virtlockd does when it can no longer prove it still holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseLossAction {
    /// SIGKILL every owner process holding a lease in the lockspace.
    #[default]
    Kill,
    /// Log (and count) only.
    None,
}

/// `lease_renew_interval`, `lease_renew_timeout` and `lease_loss_action` of virtlockd.conf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseConfig {
    /// Seconds between renewals of each lockspace holding leases; 0 = renewal off.
    pub renew_interval: u64,
    /// Seconds without a successful renewal after which the leases count as lost.
    pub renew_timeout: u64,
    pub loss_action: LeaseLossAction,
}

impl DaemonKeys for LeaseConfig {
    fn from_conf(conf: &Conf) -> Result<LeaseConfig, ConfigError> {
        let mut l = LeaseConfig::default();
        let max = 86_400;
        if let Some(v) = conf.get_unsigned("lease_renew_interval", max)? {
            l.renew_interval = v;
        }
        // Three missed renewals by default.
        l.renew_timeout = conf
            .get_unsigned("lease_renew_timeout", max)?
            .unwrap_or(3 * l.renew_interval);
        if let Some(v) = conf.get_string("lease_loss_action")? {
            l.loss_action = match v.as_str() {
                "kill" => LeaseLossAction::Kill,
                "none" => LeaseLossAction::None,
                _ => {
                    return Err(ConfigError::Internal(format!(
                        "{}: lease_loss_action must be \"kill\" or \"none\", not \"{v}\"",
                        conf.filename
                    )))
                }
            };
        }
        if l.renew_interval > 0 && l.renew_timeout <= l.renew_interval {
            return Err(ConfigError::Internal(format!(
                "{}: lease_renew_timeout ({}) must be larger than lease_renew_interval ({})",
                conf.filename, l.renew_timeout, l.renew_interval
            )));
        }
        Ok(l)
    }
}
