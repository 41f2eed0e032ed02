//! The virConf parser, the typed settings of both daemons, and the log filter and
//! output syntaxes those settings carry.

use vh_common::config::{self, DaemonConfig, DaemonKeys};
use vh_common::logging;

pub fn parse(data: &[u8]) {
    let conf = match config::parse("fuzz.conf", data) {
        Ok(c) => c,
        Err(e) => {
            // The message the daemon prints must be buildable for any error.
            let _ = e.load_failure_message(std::path::Path::new("fuzz.conf"));
            let _ = e.to_string();
            return;
        }
    };
    // Each daemon's own keys; the shared ones are read by both.
    let _ = virtlogd::config::LogdKeys::from_conf(&conf);
    let _ = virtlockd::config::LeaseConfig::from_conf(&conf);
    {
        if let Ok(c) = DaemonConfig::<()>::from_conf(&conf) {
            if let Some(f) = &c.log_filters {
                if let Ok(v) = logging::parse_filters(f) {
                    let _ = logging::format_filters(&v);
                }
            }
            if let Some(o) = &c.log_outputs {
                if let Ok(v) = logging::parse_outputs(o) {
                    let _ = logging::format_outputs(&v);
                }
            }
        }
    }
}
