//! Harness code shared by the fuzz targets (one module per target).
//!
//! | module | job |
//! |---|---|
//! | [`decode`] | frame + header + argument decoding of the log, lock and admin programs |
//! | [`conf`] | the virConf parser and the typed settings built from it |
//! | [`state`] | the re-exec state documents of both daemons |
//! | [`admin_target`] | a stand-in daemon for the admin program |
//! | [`sequence`] | whole in-process servers driven by sequences of client operations |

pub mod admin_target;
pub mod conf;
pub mod decode;
pub mod sequence;
pub mod state;
