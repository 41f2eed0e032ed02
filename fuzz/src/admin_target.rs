//! A stand-in for the daemon behind the admin program: it lists the servers it is
//! given and keeps the log settings as plain strings, so admin calls never touch the
//! process's real logging.

use std::sync::{Arc, Mutex};
use vh_common::admin::AdminTarget;
use vh_common::logging::LogError;
use vh_common::server::Server;

#[derive(Default)]
pub struct FakeDaemon {
    pub servers: Vec<Arc<Server>>,
    outputs: Mutex<String>,
    filters: Mutex<String>,
}

impl FakeDaemon {
    pub fn new(servers: Vec<Arc<Server>>) -> Arc<Self> {
        Arc::new(FakeDaemon {
            servers,
            ..Default::default()
        })
    }
}

fn get(m: &Mutex<String>) -> (String, usize) {
    let s = m.lock().map(|s| s.clone()).unwrap_or_default();
    let n = s.split_whitespace().count();
    (s, n)
}

impl AdminTarget for FakeDaemon {
    fn servers(&self) -> Vec<Arc<Server>> {
        self.servers.clone()
    }
    fn log_outputs(&self) -> (String, usize) {
        get(&self.outputs)
    }
    fn log_filters(&self) -> (String, usize) {
        get(&self.filters)
    }
    fn set_log_outputs(&self, outputs: &str) -> Result<(), LogError> {
        // The real parser, so its errors are exercised too.
        vh_common::logging::parse_outputs(outputs)?;
        if let Ok(mut o) = self.outputs.lock() {
            *o = outputs.to_string();
        }
        Ok(())
    }
    fn set_log_filters(&self, filters: &str) -> Result<(), LogError> {
        vh_common::logging::parse_filters(filters)?;
        if let Ok(mut f) = self.filters.lock() {
            *f = filters.to_string();
        }
        Ok(())
    }
    fn set_timeout(&self, _secs: u32) {}
    fn shutdown(&self, _preserve: bool) {}
}
