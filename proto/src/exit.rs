//! The daemons' exit statuses: libvirt's `virDaemonErr` codes. Here rather than in the
//! daemon front-end because the man pages (`manual`) document them too.

pub const PIDFILE: i32 = 1;
pub const RUNDIR: i32 = 2;
pub const INIT: i32 = 3;
pub const SIGNAL: i32 = 4;
pub const NETWORK: i32 = 6;
pub const CONFIG: i32 = 7;
pub const REEXEC: i32 = 9;
