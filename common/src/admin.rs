//! libvirt's admin program (`0x06900690` v1, procedures 1–20) as virtlogd and virtlockd
//! 9.0 serve it on their "admin" server: server and client listing, client limits,
//! thread-pool parameters, client info and disconnect, the daemon's log filters and
//! outputs, and the idle timeout; plus 11.2's daemon shutdown (procedure 20).
//!
//! The program talks to the daemon through [`AdminTarget`], which [`Daemon`] implements;
//! the unit tests use a fake. It holds the target weakly, since the daemon owns the
//! servers that own this program.
//!
//! Every check comes in 9.0's order (server lookup, then the typed-parameter decoding,
//! then the flags, then validation), and every error carries 9.0's code, domain and text.

use crate::daemon::Daemon;
use crate::error::{code, domain, RpcError};
use crate::logging::LogError;
use crate::server::{
    lock_table, CallContext, ClientInfo, ClientLimits, DispatchError, Program, Reply, Server,
};
use crate::xdr::{Decoder, Encoder, XdrError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

pub const ADMIN_PROGRAM: u32 = 0x0690_0690;
pub const ADMIN_PROTOCOL_VERSION: u32 = 1;
pub const ADMIN_STRING_MAX: usize = 4_194_304;
pub const ADMIN_SERVER_LIST_MAX: usize = 16_384;
pub const ADMIN_SERVER_THREADPOOL_PARAMETERS_MAX: usize = 32;
pub const ADMIN_CLIENT_LIST_MAX: usize = 16_384;
pub const ADMIN_CLIENT_INFO_PARAMETERS_MAX: usize = 64;
pub const ADMIN_SERVER_CLIENT_LIMITS_MAX: usize = 32;

/// `LIBVIR_VERSION_NUMBER` we report (11.3.0): where 9.0 and 11.3 differ these daemons
/// behave as 11.3 (procedure 20, the config rules, the log cleaner), and nothing but
/// virt-admin's `version` reads it (libvirtd, lockd.so and the log manager never ask).
/// The same value goes to `--version` ([`crate::cli::LIBVIRT_VERSION`]).
pub const LIB_VERSION: u64 = 11_003_000;

/// libvirt's `VIR_TYPED_PARAM_FIELD_LENGTH`: names must be shorter than this.
const FIELD_LENGTH: usize = 80;

/// `VIR_CLIENT_TRANS_UNIX`.
const TRANSPORT_UNIX: u32 = 0;

/// Procedure numbers.
pub mod proc_ {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_GET_LIB_VERSION: i32 = 3;
    pub const CONNECT_LIST_SERVERS: i32 = 4;
    pub const CONNECT_LOOKUP_SERVER: i32 = 5;
    pub const SERVER_GET_THREADPOOL_PARAMETERS: i32 = 6;
    pub const SERVER_SET_THREADPOOL_PARAMETERS: i32 = 7;
    pub const SERVER_LIST_CLIENTS: i32 = 8;
    pub const SERVER_LOOKUP_CLIENT: i32 = 9;
    pub const CLIENT_GET_INFO: i32 = 10;
    pub const CLIENT_CLOSE: i32 = 11;
    pub const SERVER_GET_CLIENT_LIMITS: i32 = 12;
    pub const SERVER_SET_CLIENT_LIMITS: i32 = 13;
    pub const CONNECT_GET_LOGGING_OUTPUTS: i32 = 14;
    pub const CONNECT_GET_LOGGING_FILTERS: i32 = 15;
    pub const CONNECT_SET_LOGGING_OUTPUTS: i32 = 16;
    pub const CONNECT_SET_LOGGING_FILTERS: i32 = 17;
    pub const SERVER_UPDATE_TLS_FILES: i32 = 18;
    pub const CONNECT_SET_DAEMON_TIMEOUT: i32 = 19;
    /// libvirt 11.2+ (`virt-admin daemon-shutdown [--preserve]`).
    pub const CONNECT_DAEMON_SHUTDOWN: i32 = 20;
}

/// `VIR_DAEMON_SHUTDOWN_PRESERVE`: preserve state (running guests) before the quit. These
/// daemons have no state to preserve by stopping (11.3 registers no stop callback in
/// virtlogd or virtlockd), so it quits exactly as without the flag.
pub const DAEMON_SHUTDOWN_PRESERVE: u32 = 1;

/// Typed-parameter names (`libvirt-admin.h`).
pub mod names {
    pub const WORKERS_MIN: &str = "minWorkers";
    pub const WORKERS_MAX: &str = "maxWorkers";
    pub const WORKERS_CURRENT: &str = "nWorkers";
    pub const WORKERS_FREE: &str = "freeWorkers";
    pub const WORKERS_PRIORITY: &str = "prioWorkers";
    pub const JOB_QUEUE_DEPTH: &str = "jobQueueDepth";
    pub const CLIENTS_MAX: &str = "nclients_max";
    pub const CLIENTS_CURRENT: &str = "nclients";
    pub const CLIENTS_UNAUTH_MAX: &str = "nclients_unauth_max";
    pub const CLIENTS_UNAUTH_CURRENT: &str = "nclients_unauth";
    pub const INFO_READONLY: &str = "readonly";
    pub const INFO_UNIX_USER_ID: &str = "unix_user_id";
    pub const INFO_UNIX_USER_NAME: &str = "unix_user_name";
    pub const INFO_UNIX_GROUP_ID: &str = "unix_group_id";
    pub const INFO_UNIX_GROUP_NAME: &str = "unix_group_name";
    pub const INFO_UNIX_PROCESS_ID: &str = "unix_process_id";
}

/// What the admin program needs from the daemon.
pub trait AdminTarget: Send + Sync + 'static {
    /// Every server, in the order 9.0 lists them.
    fn servers(&self) -> Vec<Arc<Server>>;
    /// Current outputs (`LEVEL:DEST[:NAME]`, space separated) and their number.
    fn log_outputs(&self) -> (String, usize);
    /// Current filters (each followed by a space) and their number.
    fn log_filters(&self) -> (String, usize);
    /// Replaces the outputs; "" restores the default. `Err` is libvirt's message.
    fn set_log_outputs(&self, outputs: &str) -> Result<(), LogError>;
    /// Replaces the filters; "" clears them.
    fn set_log_filters(&self, filters: &str) -> Result<(), LogError>;
    /// The idle auto-shutdown timeout, 0 = never.
    fn set_timeout(&self, secs: u32);
    /// Quits the daemon (admin CONNECT_DAEMON_SHUTDOWN); the quit has begun on return.
    fn shutdown(&self, preserve: bool);
}

impl AdminTarget for Daemon {
    fn servers(&self) -> Vec<Arc<Server>> {
        // libvirt keeps its servers in a hash table. After a fresh start 9.0 lists the
        // daemon's own server first for both daemons (a daemon restored from a re-exec
        // state file may list them the other way round).
        vec![self.main.clone(), self.admin.clone()]
    }
    fn log_outputs(&self) -> (String, usize) {
        (self.log.outputs(), self.log.output_count())
    }
    fn log_filters(&self) -> (String, usize) {
        // 9.0 stores every match as the glob `*MATCH*` and reports it that way, with no
        // `+` flag: "1:util 3:+rpc" reads back as "1:*util* 3:*rpc* ".
        let filters = self.log.settings().filters;
        let mut s = String::new();
        for f in &filters {
            s.push_str(&format!("{}:*{}* ", f.priority.number(), f.pattern));
        }
        (s, filters.len())
    }
    fn set_log_outputs(&self, outputs: &str) -> Result<(), LogError> {
        self.log.set_outputs(outputs)
    }
    fn set_log_filters(&self, filters: &str) -> Result<(), LogError> {
        self.log.set_filters(filters)
    }
    fn set_timeout(&self, secs: u32) {
        Daemon::set_timeout(self, secs)
    }
    fn shutdown(&self, _preserve: bool) {
        self.request_quit()
    }
}

/// The admin program for a daemon, to be registered on its "admin" server.
pub fn admin_program(daemon: Weak<Daemon>) -> Arc<dyn Program> {
    let target: Weak<dyn AdminTarget> = daemon;
    Arc::new(AdminProgram::new(target))
}

/// A typed parameter's value (`admin_typed_param_value`).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i32),
    UInt(u32),
    LLong(i64),
    ULLong(u64),
    Double(f64),
    Boolean(i32),
    String(String),
}

impl ParamValue {
    fn type_code(&self) -> i32 {
        match self {
            ParamValue::Int(_) => 1,
            ParamValue::UInt(_) => 2,
            ParamValue::LLong(_) => 3,
            ParamValue::ULLong(_) => 4,
            ParamValue::Double(_) => 5,
            ParamValue::Boolean(_) => 6,
            ParamValue::String(_) => 7,
        }
    }

    /// `virTypedParameterTypeToString`.
    fn type_name(&self) -> &'static str {
        match self {
            ParamValue::Int(_) => "int",
            ParamValue::UInt(_) => "uint",
            ParamValue::LLong(_) => "llong",
            ParamValue::ULLong(_) => "ullong",
            ParamValue::Double(_) => "double",
            ParamValue::Boolean(_) => "boolean",
            ParamValue::String(_) => "string",
        }
    }
}

/// One `admin_typed_param`. The name is kept as raw bytes, as C sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedParam {
    pub field: Vec<u8>,
    pub value: ParamValue,
}

impl TypedParam {
    fn new(field: &str, value: ParamValue) -> Self {
        TypedParam {
            field: field.as_bytes().to_vec(),
            value,
        }
    }

    fn field_lossy(&self) -> String {
        String::from_utf8_lossy(&self.field).into_owned()
    }

    fn encode(&self, e: &mut Encoder) {
        e.opaque(&self.field);
        e.i32(self.value.type_code());
        match &self.value {
            ParamValue::Int(v) | ParamValue::Boolean(v) => {
                e.i32(*v);
            }
            ParamValue::UInt(v) => {
                e.u32(*v);
            }
            ParamValue::LLong(v) => {
                e.i64(*v);
            }
            ParamValue::ULLong(v) => {
                e.u64(*v);
            }
            ParamValue::Double(v) => {
                e.f64(*v);
            }
            ParamValue::String(s) => {
                e.string(s);
            }
        }
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self, XdrError> {
        let field = d.string_lossless(ADMIN_STRING_MAX)?;
        let value = match d.i32()? {
            1 => ParamValue::Int(d.i32()?),
            2 => ParamValue::UInt(d.u32()?),
            3 => ParamValue::LLong(d.i64()?),
            4 => ParamValue::ULLong(d.u64()?),
            5 => ParamValue::Double(d.f64()?),
            6 => ParamValue::Boolean(d.i32()?),
            7 => ParamValue::String(
                String::from_utf8_lossy(&d.string_lossless(ADMIN_STRING_MAX)?).into_owned(),
            ),
            // The XDR union has no default arm: an unknown type fails to decode.
            t => return Err(XdrError::BadDiscriminant(t)),
        };
        Ok(TypedParam { field, value })
    }
}

/// Smallest encoding of one parameter: empty name, type, 4-byte value.
const PARAM_MIN_SIZE: usize = 12;

fn decode_params(d: &mut Decoder<'_>, max: usize) -> Result<Vec<TypedParam>, XdrError> {
    let n = d.array_len(max, PARAM_MIN_SIZE)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TypedParam::decode(d)?);
    }
    Ok(v)
}

/// `virTypedParamsSerialize`: leaves out strings unless `string_ok`.
fn encode_params(params: &[TypedParam], max: usize, string_ok: bool) -> Result<Vec<u8>, RpcError> {
    let kept: Vec<&TypedParam> = params
        .iter()
        .filter(|p| string_ok || !matches!(p.value, ParamValue::String(_)))
        .collect();
    if params.len() > max {
        return Err(RpcError::new(
            code::RPC,
            domain::NONE,
            format!("too many parameters '{}' for limit '{max}'", params.len()),
        ));
    }
    let mut e = Encoder::new();
    e.u32(kept.len() as u32);
    for p in kept {
        p.encode(&mut e);
    }
    Ok(e.into_inner())
}

/// The checks of `virTypedParamsDeserialize` that XDR does not already make.
fn check_deserialized(params: &[TypedParam]) -> Result<(), RpcError> {
    for p in params {
        if p.field.len() >= FIELD_LENGTH {
            return Err(RpcError::internal(
                domain::NONE,
                format!("parameter {} too big for destination", p.field_lossy()),
            ));
        }
    }
    Ok(())
}

/// `virTypedParamsValidate` against `keys` (all UINT here): the parameters are walked
/// in name order, so the first problem reported is the one libvirt reports.
fn validate_uint(params: &[TypedParam], keys: &[&str]) -> Result<(), RpcError> {
    let mut sorted: Vec<&TypedParam> = params.iter().collect();
    sorted.sort_by(|a, b| c_str(&a.field).cmp(c_str(&b.field)));
    let mut keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    keys.sort();
    let (mut i, mut j) = (0, 0);
    let mut last: Option<&[u8]> = None;
    while i < sorted.len() && j < keys.len() {
        let p = sorted[i];
        let name = c_str(&p.field);
        if name != keys[j] {
            j += 1;
            continue;
        }
        if last == Some(name) {
            return Err(RpcError::new(
                code::INVALID_ARG,
                domain::NONE,
                format!("parameter '{}' occurs multiple times", lossy(name)),
            ));
        }
        if !matches!(p.value, ParamValue::UInt(_)) {
            return Err(RpcError::new(
                code::INVALID_ARG,
                domain::NONE,
                format!(
                    "invalid type '{}' for parameter '{}', expected 'uint'",
                    p.value.type_name(),
                    lossy(name)
                ),
            ));
        }
        last = Some(name);
        i += 1;
    }
    if j == keys.len() && i != sorted.len() {
        return Err(RpcError::new(
            code::ARGUMENT_UNSUPPORTED,
            domain::NONE,
            format!(
                "parameter '{}' not supported",
                lossy(c_str(&sorted[i].field))
            ),
        ));
    }
    Ok(())
}

/// The part of a name C sees (up to the first NUL).
fn c_str(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `virTypedParamsGet` for a validated UINT: the first parameter of that name.
fn get_uint(params: &[TypedParam], name: &str) -> Option<u32> {
    params.iter().find_map(|p| match p.value {
        ParamValue::UInt(v) if c_str(&p.field) == name.as_bytes() => Some(v),
        _ => None,
    })
}

fn check_flags(flags: u32, function: &str) -> Result<(), RpcError> {
    RpcError::check_flags(domain::ADMIN, function, flags, 0)
}

/// The thread pool these daemons report: no workers, every call run inline. Only the
/// numbers an admin may change are kept.
#[derive(Debug, Clone, Copy, Default)]
struct Pool {
    min: u32,
    max: u32,
    prio: u32,
}

/// The admin program.
pub struct AdminProgram {
    target: Weak<dyn AdminTarget>,
    pools: Mutex<BTreeMap<String, Pool>>,
}

fn read_name(d: &mut Decoder<'_>) -> Result<Vec<u8>, XdrError> {
    d.string_lossless(ADMIN_STRING_MAX)
}

/// `admin_nonnull_client`: only the server name and the id are looked at.
fn read_client(d: &mut Decoder<'_>) -> Result<(Vec<u8>, u64), XdrError> {
    let srv = read_name(d)?;
    let id = d.u64()?;
    let _timestamp = d.i64()?;
    let _transport = d.u32()?;
    Ok((srv, id))
}

fn encode_client(e: &mut Encoder, server: &str, c: &ClientInfo) {
    e.string(server);
    e.u64(c.id);
    e.i64(c.conn_time);
    e.u32(TRANSPORT_UNIX);
}

/// How an unknown server is reported: by the daemon's lookup (domain RPC), or
/// re-reported by the hand-written dispatchers (domain ADMIN).
#[derive(Clone, Copy, PartialEq)]
enum Lookup {
    Rpc,
    Admin,
}

fn no_server(name: &[u8], how: Lookup) -> RpcError {
    let name = lossy(c_str(name));
    match how {
        Lookup::Rpc => RpcError::new(
            code::NO_SERVER,
            domain::RPC,
            format!("No server named '{name}'"),
        ),
        Lookup::Admin => RpcError::new(
            code::NO_SERVER,
            domain::ADMIN,
            format!("no server with matching name '{name}' found"),
        ),
    }
}

fn no_client(id: u64, how: Lookup) -> RpcError {
    match how {
        Lookup::Rpc => RpcError::new(
            code::NO_CLIENT,
            domain::RPC,
            format!("No client with matching ID '{id}'"),
        ),
        Lookup::Admin => RpcError::new(
            code::NO_CLIENT,
            domain::ADMIN,
            format!("no client with matching id '{id}' found"),
        ),
    }
}

fn client_of(server: &Server, id: u64, how: Lookup) -> Result<ClientInfo, RpcError> {
    server.client(id).ok_or_else(|| no_client(id, how))
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

fn group_name(gid: u32) -> Option<String> {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

/// `adminClientGetInfo` for a local (UNIX socket) client.
fn client_info_params(c: &ClientInfo) -> Vec<TypedParam> {
    let mut v = vec![TypedParam::new(
        names::INFO_READONLY,
        ParamValue::Boolean(0),
    )];
    v.push(TypedParam::new(
        names::INFO_UNIX_USER_ID,
        ParamValue::Int(c.uid as i32),
    ));
    if let Some(n) = user_name(c.uid) {
        v.push(TypedParam::new(
            names::INFO_UNIX_USER_NAME,
            ParamValue::String(n),
        ));
    }
    v.push(TypedParam::new(
        names::INFO_UNIX_GROUP_ID,
        ParamValue::Int(c.gid as i32),
    ));
    if let Some(n) = group_name(c.gid) {
        v.push(TypedParam::new(
            names::INFO_UNIX_GROUP_NAME,
            ParamValue::String(n),
        ));
    }
    v.push(TypedParam::new(
        names::INFO_UNIX_PROCESS_ID,
        ParamValue::Int(c.pid),
    ));
    v
}

/// A procedure family's answer: the reply payload, or the error reply.
type Handled = Result<Vec<u8>, DispatchError>;

impl AdminProgram {
    pub fn new(target: Weak<dyn AdminTarget>) -> Self {
        AdminProgram {
            target,
            pools: Mutex::new(BTreeMap::new()),
        }
    }

    fn target(&self) -> Result<Arc<dyn AdminTarget>, RpcError> {
        self.target.upgrade().ok_or_else(RpcError::unset)
    }

    fn server(&self, name: &[u8], how: Lookup) -> Result<Arc<Server>, RpcError> {
        let wanted = c_str(name);
        self.target()?
            .servers()
            .into_iter()
            .find(|s| s.name().as_bytes() == wanted)
            .ok_or_else(|| no_server(name, how))
    }

    fn pool(&self, server: &str) -> Pool {
        // A poisoned map still holds the pools set before (see `lock_table`); reading it
        // as empty would report and then store libvirt's defaults over them.
        lock_table(&self.pools)
            .get(server)
            .copied()
            .unwrap_or_default()
    }

    fn set_pool(&self, server: &str, pool: Pool) {
        lock_table(&self.pools).insert(server.to_string(), pool);
    }

    /// One call, routed to its procedure family.
    fn handle(&self, ctx: &mut CallContext<'_>, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        // The families are runs of libvirt's procedure numbers (fixed by the protocol).
        use proc_::*;
        match proc_ {
            CONNECT_OPEN..=CONNECT_LOOKUP_SERVER => self.connection(ctx, proc_, d),
            CONNECT_SET_DAEMON_TIMEOUT..=CONNECT_DAEMON_SHUTDOWN => self.connection(ctx, proc_, d),
            SERVER_GET_THREADPOOL_PARAMETERS..=SERVER_SET_THREADPOOL_PARAMETERS => {
                self.threadpool(proc_, d)
            }
            SERVER_LIST_CLIENTS..=CLIENT_CLOSE => self.clients(ctx, proc_, d),
            SERVER_GET_CLIENT_LIMITS..=SERVER_SET_CLIENT_LIMITS => self.client_limits(proc_, d),
            CONNECT_GET_LOGGING_OUTPUTS..=CONNECT_SET_LOGGING_FILTERS => self.logging(proc_, d),
            SERVER_UPDATE_TLS_FILES => self.tls(d),
            _ => Err(DispatchError::UnknownProcedure),
        }
    }

    /// The connection itself and the daemon as a whole: open, close, version, the
    /// server list, the idle timeout, shutdown.
    fn connection(&self, ctx: &mut CallContext<'_>, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        let mut e = Encoder::new();
        match proc_ {
            proc_::CONNECT_OPEN => {
                let flags = d.u32()?;
                check_flags(flags, "adminDispatchConnectOpen")?;
            }
            proc_::CONNECT_CLOSE => {
                ctx.close_after_reply = true;
            }
            proc_::CONNECT_GET_LIB_VERSION => {
                e.u64(LIB_VERSION);
            }
            proc_::CONNECT_LIST_SERVERS => {
                let need_results = d.u32()?;
                let flags = d.u32()?;
                check_flags(flags, "adminConnectListServers")?;
                let servers = self.target()?.servers();
                if need_results != 0 {
                    e.u32(servers.len() as u32);
                    for s in &servers {
                        e.string(s.name());
                    }
                } else {
                    e.u32(0);
                }
                e.u32(servers.len() as u32);
            }
            proc_::CONNECT_LOOKUP_SERVER => {
                let name = read_name(d)?;
                let _flags = d.u32()?; // 9.0's check here is a no-op
                let srv = self.server(&name, Lookup::Rpc)?;
                e.string(srv.name());
            }
            proc_::CONNECT_SET_DAEMON_TIMEOUT => {
                let timeout = d.u32()?;
                let flags = d.u32()?;
                check_flags(flags, "adminConnectSetDaemonTimeout")?;
                self.target()?.set_timeout(timeout);
            }
            proc_::CONNECT_DAEMON_SHUTDOWN => {
                let flags = d.u32()?;
                RpcError::check_flags(
                    domain::ADMIN,
                    "adminConnectDaemonShutdown",
                    flags,
                    DAEMON_SHUTDOWN_PRESERVE,
                )?;
                // The servers close before this returns: no reply goes out (as 11.3).
                self.target()?
                    .shutdown(flags & DAEMON_SHUTDOWN_PRESERVE != 0);
            }
            _ => return Err(DispatchError::UnknownProcedure),
        }
        Ok(e.into_inner())
    }

    /// A server's worker pool parameters (recorded, not applied: see [`Pool`]).
    fn threadpool(&self, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        let e = Encoder::new();
        match proc_ {
            proc_::SERVER_GET_THREADPOOL_PARAMETERS => {
                let name = read_name(d)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Rpc)?;
                check_flags(flags, "adminServerGetThreadPoolParameters")?;
                let pool = self.pool(srv.name());
                let params = [
                    (names::WORKERS_MIN, pool.min),
                    (names::WORKERS_MAX, pool.max),
                    (names::WORKERS_CURRENT, pool.min),
                    (names::WORKERS_FREE, 0),
                    (names::WORKERS_PRIORITY, pool.prio),
                    (names::JOB_QUEUE_DEPTH, 0),
                ]
                .map(|(n, v)| TypedParam::new(n, ParamValue::UInt(v)));
                return Ok(encode_params(
                    &params,
                    ADMIN_SERVER_THREADPOOL_PARAMETERS_MAX,
                    false,
                )?);
            }
            proc_::SERVER_SET_THREADPOOL_PARAMETERS => {
                let name = read_name(d)?;
                let params = decode_params(d, ADMIN_SERVER_THREADPOOL_PARAMETERS_MAX)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Admin)?;
                check_deserialized(&params)?;
                check_flags(flags, "adminServerSetThreadPoolParameters")?;
                validate_uint(
                    &params,
                    &[
                        names::WORKERS_MIN,
                        names::WORKERS_MAX,
                        names::WORKERS_PRIORITY,
                    ],
                )?;
                let mut pool = self.pool(srv.name());
                let min = get_uint(&params, names::WORKERS_MIN);
                let max = get_uint(&params, names::WORKERS_MAX);
                let prio = get_uint(&params, names::WORKERS_PRIORITY);
                if min.unwrap_or(pool.min) > max.unwrap_or(pool.max) {
                    return Err(RpcError::new(
                        code::INVALID_ARG,
                        domain::NONE,
                        "minWorkers cannot be larger than maxWorkers",
                    )
                    .into());
                }
                if let Some(m) = max {
                    if (m == 0) != (pool.max == 0) {
                        return Err(RpcError::new(
                            code::INVALID_ARG,
                            domain::NONE,
                            "maxWorkers must not be switched from zero to non-zero and vice versa",
                        )
                        .into());
                    }
                    pool.max = m;
                }
                if let Some(m) = min {
                    pool.min = m;
                }
                if let Some(p) = prio {
                    pool.prio = p;
                }
                self.set_pool(srv.name(), pool);
            }
            _ => return Err(DispatchError::UnknownProcedure),
        }
        Ok(e.into_inner())
    }

    /// A server's clients: listing, lookup, information, closing one.
    fn clients(&self, ctx: &mut CallContext<'_>, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        let mut e = Encoder::new();
        match proc_ {
            proc_::SERVER_LIST_CLIENTS => {
                let name = read_name(d)?;
                let need_results = d.u32()?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Rpc)?;
                check_flags(flags, "adminServerListClients")?;
                let clients = srv.clients();
                if clients.len() > ADMIN_CLIENT_LIST_MAX {
                    return Err(RpcError::internal(
                        domain::ADMIN,
                        format!(
                            "Too many clients '{}' for limit '{ADMIN_CLIENT_LIST_MAX}'",
                            clients.len()
                        ),
                    )
                    .into());
                }
                if need_results != 0 {
                    e.u32(clients.len() as u32);
                    for c in &clients {
                        encode_client(&mut e, srv.name(), c);
                    }
                } else {
                    e.u32(0);
                }
                e.u32(clients.len() as u32);
            }
            proc_::SERVER_LOOKUP_CLIENT => {
                let name = read_name(d)?;
                let id = d.u64()?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Rpc)?;
                check_flags(flags, "adminServerLookupClient")?;
                let c = client_of(&srv, id, Lookup::Rpc)?;
                encode_client(&mut e, srv.name(), &c);
            }
            proc_::CLIENT_GET_INFO => {
                let (name, id) = read_client(d)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Admin)?;
                let c = client_of(&srv, id, Lookup::Admin)?;
                check_flags(flags, "adminClientGetInfo")?;
                return Ok(encode_params(
                    &client_info_params(&c),
                    ADMIN_CLIENT_INFO_PARAMETERS_MAX,
                    true,
                )?);
            }
            proc_::CLIENT_CLOSE => {
                let (name, id) = read_client(d)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Rpc)?;
                client_of(&srv, id, Lookup::Rpc)?;
                check_flags(flags, "adminClientClose")?;
                if Arc::ptr_eq(&srv, ctx.server) && id == ctx.client.id {
                    // Closing our own connection: finish this reply, then hang up.
                    ctx.close_after_reply = true;
                } else {
                    srv.close_client(id);
                }
            }
            _ => return Err(DispatchError::UnknownProcedure),
        }
        Ok(e.into_inner())
    }

    /// A server's client limits.
    fn client_limits(&self, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        let e = Encoder::new();
        match proc_ {
            proc_::SERVER_GET_CLIENT_LIMITS => {
                let name = read_name(d)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Rpc)?;
                check_flags(flags, "adminServerGetClientLimits")?;
                let l = srv.limits();
                let params = [
                    (names::CLIENTS_MAX, l.max_clients),
                    (names::CLIENTS_CURRENT, srv.nclients()),
                    (names::CLIENTS_UNAUTH_MAX, l.max_unauth),
                    // auth is NONE everywhere: nobody waits for authentication
                    (names::CLIENTS_UNAUTH_CURRENT, 0),
                ]
                .map(|(n, v)| TypedParam::new(n, ParamValue::UInt(v as u32)));
                return Ok(encode_params(
                    &params,
                    ADMIN_SERVER_CLIENT_LIMITS_MAX,
                    false,
                )?);
            }
            proc_::SERVER_SET_CLIENT_LIMITS => {
                let name = read_name(d)?;
                let params = decode_params(d, ADMIN_SERVER_CLIENT_LIMITS_MAX)?;
                let flags = d.u32()?;
                let srv = self.server(&name, Lookup::Admin)?;
                check_deserialized(&params)?;
                check_flags(flags, "adminServerSetClientLimits")?;
                validate_uint(&params, &[names::CLIENTS_MAX, names::CLIENTS_UNAUTH_MAX])?;
                let cur = srv.limits();
                let max =
                    get_uint(&params, names::CLIENTS_MAX).map_or(cur.max_clients, |v| v as usize);
                let unauth = get_uint(&params, names::CLIENTS_UNAUTH_MAX)
                    .map_or(cur.max_unauth, |v| v as usize);
                if max < unauth {
                    return Err(RpcError::new(
                        code::INVALID_ARG,
                        domain::RPC,
                        // 11.3's wording (9.0 had the two halves swapped; we follow 11.3)
                        "The overall maximum number of clients must not be less than the number of clients waiting for authentication",
                    )
                    .into());
                }
                srv.set_limits(ClientLimits {
                    max_clients: max,
                    max_unauth: unauth,
                });
            }
            _ => return Err(DispatchError::UnknownProcedure),
        }
        Ok(e.into_inner())
    }

    /// The daemon's logging outputs and filters.
    fn logging(&self, proc_: i32, d: &mut Decoder<'_>) -> Handled {
        let mut e = Encoder::new();
        match proc_ {
            proc_::CONNECT_GET_LOGGING_OUTPUTS => {
                let flags = d.u32()?;
                check_flags(flags, "adminConnectGetLoggingOutputs")?;
                let (outputs, n) = self.target()?.log_outputs();
                e.string(&outputs);
                e.u32(n as u32);
            }
            proc_::CONNECT_GET_LOGGING_FILTERS => {
                let flags = d.u32()?;
                check_flags(flags, "adminConnectGetLoggingFilters")?;
                let (filters, n) = self.target()?.log_filters();
                if n == 0 {
                    e.optional_string(None);
                } else {
                    e.optional_string(Some(&filters));
                }
                e.u32(n as u32);
            }
            proc_::CONNECT_SET_LOGGING_OUTPUTS | proc_::CONNECT_SET_LOGGING_FILTERS => {
                let s = d.optional(|d| d.string_lossless(ADMIN_STRING_MAX))?;
                let flags = d.u32()?;
                let outputs = proc_ == proc_::CONNECT_SET_LOGGING_OUTPUTS;
                check_flags(
                    flags,
                    if outputs {
                        "adminConnectSetLoggingOutputs"
                    } else {
                        "adminConnectSetLoggingFilters"
                    },
                )?;
                let s = s.map(|b| lossy(c_str(&b))).unwrap_or_default();
                let t = self.target()?;
                let r = if outputs {
                    t.set_log_outputs(&s)
                } else {
                    t.set_log_filters(&s)
                };
                // libvirt's text without the "invalid argument: " the code adds.
                r.map_err(|e| RpcError::new(code::INVALID_ARG, domain::NONE, e.0))?;
            }
            _ => return Err(DispatchError::UnknownProcedure),
        }
        Ok(e.into_inner())
    }

    /// SERVER_UPDATE_TLS_FILES: there is no TLS service, so always an error, as
    /// libvirt's (once the server and flags are checked).
    fn tls(&self, d: &mut Decoder<'_>) -> Handled {
        let name = read_name(d)?;
        let flags = d.u32()?;
        self.server(&name, Lookup::Rpc)?;
        check_flags(flags, "adminServerUpdateTlsFiles")?;
        Err(RpcError::internal(
            domain::RPC,
            "no tls service found, unable to update tls files",
        )
        .into())
    }
}

impl Program for AdminProgram {
    fn program(&self) -> u32 {
        ADMIN_PROGRAM
    }

    fn version(&self) -> u32 {
        ADMIN_PROTOCOL_VERSION
    }

    fn dispatch(
        &self,
        ctx: &mut CallContext<'_>,
        proc_: i32,
        args: &[u8],
    ) -> Result<Reply, DispatchError> {
        if !(1..=proc_::CONNECT_DAEMON_SHUTDOWN).contains(&proc_) {
            return Err(DispatchError::UnknownProcedure);
        }
        let mut d = Decoder::new(args);
        self.handle(ctx, proc_, &mut d).map(Reply::payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, status, Header, HEADER_LEN};
    use crate::server::{NoHooks, Private, RunState};

    struct Fake {
        servers: Vec<Arc<Server>>,
        outputs: Mutex<String>,
        filters: Mutex<String>,
        timeout: Mutex<u32>,
    }

    impl AdminTarget for Fake {
        fn servers(&self) -> Vec<Arc<Server>> {
            self.servers.clone()
        }
        fn log_outputs(&self) -> (String, usize) {
            let o = self.outputs.lock().unwrap().clone();
            let n = o.split(' ').filter(|s| !s.is_empty()).count();
            (o, n)
        }
        fn log_filters(&self) -> (String, usize) {
            let f = self.filters.lock().unwrap().clone();
            let n = f.split(' ').filter(|s| !s.is_empty()).count();
            (f, n)
        }
        fn set_log_outputs(&self, o: &str) -> Result<(), LogError> {
            if !o.is_empty() && !o.contains(':') {
                return Err(LogError(format!("Malformed format for log output '{o}'")));
            }
            *self.outputs.lock().unwrap() = if o.is_empty() {
                "3:stderr".into()
            } else {
                o.into()
            };
            Ok(())
        }
        fn set_log_filters(&self, f: &str) -> Result<(), LogError> {
            *self.filters.lock().unwrap() = f.into();
            Ok(())
        }
        fn set_timeout(&self, secs: u32) {
            *self.timeout.lock().unwrap() = secs;
        }
        fn shutdown(&self, preserve: bool) {
            SHUTDOWNS.lock().unwrap().push(preserve);
        }
    }

    /// What the fakes were asked: one entry per shutdown, its PRESERVE flag. Only the
    /// shutdown test reads it.
    static SHUTDOWNS: Mutex<Vec<bool>> = Mutex::new(Vec::new());

    struct Rig {
        fake: Arc<Fake>,
        prog: AdminProgram,
        admin: Arc<Server>,
        me: ClientInfo,
        private: Private,
    }

    fn rig(main_name: &str, main_first: bool) -> Rig {
        let (_tx, rx) = tokio::sync::watch::channel(RunState::Running);
        let lim = |n| ClientLimits {
            max_clients: n,
            max_unauth: n,
        };
        let main = Server::new(main_name, 0, lim(1024), Arc::new(NoHooks), rx.clone());
        let admin = Server::new("admin", 0, lim(5000), Arc::new(NoHooks), rx);
        let servers = if main_first {
            vec![main, admin.clone()]
        } else {
            vec![admin.clone(), main]
        };
        let fake = Arc::new(Fake {
            servers,
            outputs: Mutex::new("3:stderr".into()),
            filters: Mutex::new(String::new()),
            timeout: Mutex::new(0),
        });
        let weak: Weak<dyn AdminTarget> = Arc::downgrade(&fake) as Weak<dyn AdminTarget>;
        Rig {
            fake,
            prog: AdminProgram::new(weak),
            admin,
            me: ClientInfo {
                id: 1,
                pid: 1,
                uid: 0,
                gid: 0,
                conn_time: 0,
                fd: -1,
            },
            private: Box::new(()),
        }
    }

    impl Rig {
        /// Dispatches one call body (header + args) and returns the reply frame and
        /// whether the connection would close after it.
        fn call_body(&mut self, body: &[u8]) -> (Vec<u8>, bool) {
            let h = Header::decode(&mut Decoder::new(body)).unwrap();
            let mut ctx = CallContext {
                server: &self.admin,
                client: &self.me,
                private: &mut self.private,
                fds: Vec::new(),
                close_after_reply: false,
            };
            let res = self.prog.dispatch(&mut ctx, h.proc_, &body[HEADER_LEN..]);
            let close = ctx.close_after_reply;
            let frame = match res {
                Ok(r) => protocol::encode_frame(&h.reply(false, status::OK), None, &r.payload),
                Err(DispatchError::Failed(e)) => protocol::encode_error_frame(&h, &e),
                Err(DispatchError::Decode(_)) => protocol::encode_error_frame(
                    &h,
                    &RpcError::rpc("Unable to decode message payload"),
                ),
                Err(DispatchError::UnknownProcedure) => protocol::encode_error_frame(
                    &h,
                    &RpcError::rpc(format!("unknown procedure: {}", h.proc_)),
                ),
            };
            (frame, close)
        }

        fn call(&mut self, proc_: i32, args: &[u8]) -> Result<Vec<u8>, DispatchError> {
            let mut ctx = CallContext {
                server: &self.admin,
                client: &self.me,
                private: &mut self.private,
                fds: Vec::new(),
                close_after_reply: false,
            };
            self.prog.dispatch(&mut ctx, proc_, args).map(|r| r.payload)
        }

        fn err(&mut self, proc_: i32, args: &[u8]) -> RpcError {
            match self.call(proc_, args) {
                Err(DispatchError::Failed(e)) => e,
                other => panic!("expected an error, got {other:?}"),
            }
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn tohex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Splits a byte stream into length-prefixed frames (length word excluded).
    fn frames(stream: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i + 4 <= stream.len() {
            let len = u32::from_be_bytes([stream[i], stream[i + 1], stream[i + 2], stream[i + 3]])
                as usize;
            out.push(stream[i + 4..i + len].to_vec());
            i += len;
        }
        out
    }

    fn replay(file: &str, main_name: &str, main_first: bool) -> usize {
        let path = format!("{}/../fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let conns: serde_json::Value = serde_json::from_str(&text).unwrap();
        let conns = conns.as_array().unwrap();
        let admin_fd = conns
            .iter()
            .filter_map(|c| c["listen_fd"].as_i64())
            .max()
            .unwrap();
        let mut calls = 0;
        for c in conns
            .iter()
            .filter(|c| c["listen_fd"].as_i64() == Some(admin_fd))
        {
            let mut up = Vec::new();
            let mut down = Vec::new();
            for ev in c["events"].as_array().unwrap() {
                let b = unhex(ev["hex"].as_str().unwrap());
                if ev["dir"] == "client->daemon" {
                    up.extend(b);
                } else {
                    down.extend(b);
                }
            }
            let mut r = rig(main_name, main_first);
            let want = frames(&down);
            let got_calls = frames(&up);
            assert_eq!(want.len(), got_calls.len());
            for (i, (call, reply)) in got_calls.iter().zip(&want).enumerate() {
                let (frame, close) = r.call_body(call);
                let reply = &with_our_version(reply);
                assert_eq!(
                    tohex(&frame[4..]),
                    tohex(reply),
                    "{file}: call {i} of a connection"
                );
                assert_eq!(close, i + 1 == got_calls.len(), "only CONNECT_CLOSE closes");
                calls += 1;
            }
        }
        calls
    }

    /// The recorded CONNECT_GET_LIB_VERSION reply carries 9.0.0; we report
    /// [`LIB_VERSION`] (the version is the one deliberate difference in that reply).
    fn with_our_version(reply: &[u8]) -> Vec<u8> {
        let h = Header::decode(&mut Decoder::new(reply)).unwrap();
        let mut v = reply.to_vec();
        if h.proc_ == proc_::CONNECT_GET_LIB_VERSION && h.status == status::OK {
            assert_eq!(v.len(), HEADER_LEN + 8);
            assert_eq!(v[HEADER_LEN..], 9_000_000u64.to_be_bytes());
            v[HEADER_LEN..].copy_from_slice(&LIB_VERSION.to_be_bytes());
        }
        v
    }

    #[test]
    fn replays_virtlogd_fixture() {
        assert!(replay("virtlogd-9.0-transcripts.json", "virtlogd", false) >= 20);
    }

    #[test]
    fn replays_virtlockd_fixture() {
        assert!(replay("virtlockd-9.0-transcripts.json", "virtlockd", true) >= 18);
    }

    fn srv(name: &str) -> Encoder {
        let mut e = Encoder::new();
        e.string(name);
        e
    }

    fn args(e: &mut Encoder) -> Vec<u8> {
        e.as_bytes().to_vec()
    }

    fn uint_param(e: &mut Encoder, name: &str, v: u32) {
        e.string(name).i32(2).u32(v);
    }

    #[test]
    fn unknown_procedures() {
        let mut r = rig("virtlogd", true);
        assert!(matches!(
            r.call(0, &[]),
            Err(DispatchError::UnknownProcedure)
        ));
        // 20 is 11.2's CONNECT_DAEMON_SHUTDOWN; 21 does not exist in 11.3.
        assert!(matches!(
            r.call(21, &[]),
            Err(DispatchError::UnknownProcedure)
        ));
        assert!(matches!(
            r.call(-1, &[]),
            Err(DispatchError::UnknownProcedure)
        ));
    }

    /// 11.3's `virCheckFlags(VIR_DAEMON_SHUTDOWN_PRESERVE)`: unknown bits are refused
    /// (naming only them) and the daemon stays up; 0 and PRESERVE both quit.
    #[test]
    fn daemon_shutdown_flags() {
        let mut r = rig("virtlogd", true);
        let e = r.err(proc_::CONNECT_DAEMON_SHUTDOWN, &[0, 0, 0, 3]);
        assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::ADMIN));
        assert_eq!(
            e.message(),
            "unsupported flags (0x2) in function adminConnectDaemonShutdown"
        );
        let e = r.err(proc_::CONNECT_DAEMON_SHUTDOWN, &[0x80, 0, 0, 0]);
        assert_eq!(
            e.message(),
            "unsupported flags (0x80000000) in function adminConnectDaemonShutdown"
        );
        assert!(SHUTDOWNS.lock().unwrap().is_empty());
        assert_eq!(
            r.call(proc_::CONNECT_DAEMON_SHUTDOWN, &[0, 0, 0, 1])
                .unwrap(),
            Vec::<u8>::new()
        );
        assert_eq!(
            r.call(proc_::CONNECT_DAEMON_SHUTDOWN, &[0, 0, 0, 0])
                .unwrap(),
            Vec::<u8>::new()
        );
        assert_eq!(*SHUTDOWNS.lock().unwrap(), vec![true, false]);
        // A short body is a decode error, as for every generated dispatcher.
        assert!(matches!(
            r.call(proc_::CONNECT_DAEMON_SHUTDOWN, &[0, 0]),
            Err(DispatchError::Decode(_))
        ));
    }

    #[test]
    fn bad_flags_are_admin_invalid_arg() {
        let mut r = rig("virtlogd", true);
        let e = r.err(proc_::CONNECT_OPEN, &[0, 0, 0, 4]);
        assert_eq!((e.code, e.domain), (code::INVALID_ARG, domain::ADMIN));
        assert_eq!(
            e.message(),
            "unsupported flags (0x4) in function adminDispatchConnectOpen"
        );
        let e = r.err(proc_::CONNECT_LIST_SERVERS, &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(
            e.message(),
            "unsupported flags (0x1) in function adminConnectListServers"
        );
        // LOOKUP_SERVER ignores its flags, as 9.0 does.
        let a = args(srv("admin").u32(7));
        assert!(r.call(proc_::CONNECT_LOOKUP_SERVER, &a).is_ok());
        let a = args(srv("virtlogd").u32(2));
        let e = r.err(proc_::SERVER_GET_CLIENT_LIMITS, &a);
        assert_eq!(
            e.message(),
            "unsupported flags (0x2) in function adminServerGetClientLimits"
        );
        let e = r.err(proc_::CONNECT_SET_DAEMON_TIMEOUT, &[0, 0, 0, 5, 0, 0, 0, 8]);
        assert_eq!(
            e.message(),
            "unsupported flags (0x8) in function adminConnectSetDaemonTimeout"
        );
        assert_eq!(*r.fake.timeout.lock().unwrap(), 0);
    }

    #[test]
    fn unknown_server_domains() {
        let mut r = rig("virtlogd", true);
        let a = args(srv("nope").u32(0));
        for p in [
            proc_::CONNECT_LOOKUP_SERVER,
            proc_::SERVER_GET_THREADPOOL_PARAMETERS,
            proc_::SERVER_GET_CLIENT_LIMITS,
            proc_::SERVER_UPDATE_TLS_FILES,
        ] {
            let e = r.err(p, &a);
            assert_eq!(
                (e.code, e.domain),
                (code::NO_SERVER, domain::RPC),
                "proc {p}"
            );
            assert_eq!(e.message(), "Server not found: No server named 'nope'");
        }
        let a = args(srv("nope").u32(0).u32(0));
        let e = r.err(proc_::SERVER_SET_CLIENT_LIMITS, &a);
        assert_eq!((e.code, e.domain), (code::NO_SERVER, domain::ADMIN));
        assert_eq!(
            e.message(),
            "Server not found: no server with matching name 'nope' found"
        );
        let e = r.err(proc_::SERVER_SET_THREADPOOL_PARAMETERS, &a);
        assert_eq!((e.code, e.domain), (code::NO_SERVER, domain::ADMIN));
        let a = args(srv("nope").u64(1).i64(0).u32(0).u32(0));
        let e = r.err(proc_::CLIENT_GET_INFO, &a);
        assert_eq!((e.code, e.domain), (code::NO_SERVER, domain::ADMIN));
        let e = r.err(proc_::CLIENT_CLOSE, &a);
        assert_eq!((e.code, e.domain), (code::NO_SERVER, domain::RPC));
    }

    #[test]
    fn unknown_client_domains() {
        let mut r = rig("virtlogd", true);
        let a = args(srv("virtlogd").u64(9).u32(0));
        let e = r.err(proc_::SERVER_LOOKUP_CLIENT, &a);
        assert_eq!((e.code, e.domain), (code::NO_CLIENT, domain::RPC));
        assert_eq!(
            e.message(),
            "Client not found: No client with matching ID '9'"
        );
        let a = args(srv("virtlogd").u64(9).i64(0).u32(0).u32(0));
        let e = r.err(proc_::CLIENT_CLOSE, &a);
        assert_eq!((e.code, e.domain), (code::NO_CLIENT, domain::RPC));
        let e = r.err(proc_::CLIENT_GET_INFO, &a);
        assert_eq!((e.code, e.domain), (code::NO_CLIENT, domain::ADMIN));
        assert_eq!(
            e.message(),
            "Client not found: no client with matching id '9' found"
        );
    }

    #[test]
    fn client_limits_set() {
        let mut r = rig("virtlogd", true);
        let main = r.fake.servers[0].clone();
        let mut e = srv("virtlogd");
        e.u32(2);
        uint_param(&mut e, "nclients_max", 2000);
        uint_param(&mut e, "nclients_unauth_max", 1500);
        e.u32(0);
        r.call(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes())
            .unwrap();
        assert_eq!(
            main.limits(),
            ClientLimits {
                max_clients: 2000,
                max_unauth: 1500
            }
        );
        // max below unauth
        let mut e = srv("virtlogd");
        e.u32(1);
        uint_param(&mut e, "nclients_max", 10);
        e.u32(0);
        let err = r.err(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes());
        assert_eq!((err.code, err.domain), (code::INVALID_ARG, domain::RPC));
        assert!(err
            .message()
            .starts_with("invalid argument: The overall maximum"));
        assert_eq!(main.limits().max_clients, 2000);
        // unknown name, wrong type, duplicate
        let mut e = srv("virtlogd");
        e.u32(1);
        uint_param(&mut e, "nclients", 10);
        e.u32(0);
        let err = r.err(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes());
        assert_eq!(
            (err.code, err.domain),
            (code::ARGUMENT_UNSUPPORTED, domain::NONE)
        );
        assert_eq!(
            err.message(),
            "argument unsupported: parameter 'nclients' not supported"
        );
        let mut e = srv("virtlogd");
        e.u32(1);
        e.string("nclients_max").i32(1).i32(10);
        e.u32(0);
        let err = r.err(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes());
        assert_eq!(
            err.message(),
            "invalid argument: invalid type 'int' for parameter 'nclients_max', expected 'uint'"
        );
        let mut e = srv("virtlogd");
        e.u32(2);
        uint_param(&mut e, "nclients_max", 10);
        uint_param(&mut e, "nclients_max", 10);
        e.u32(0);
        let err = r.err(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes());
        assert_eq!(
            err.message(),
            "invalid argument: parameter 'nclients_max' occurs multiple times"
        );
        // field name too long for libvirt's 80-byte buffer
        let long = "x".repeat(80);
        let mut e = srv("virtlogd");
        e.u32(1);
        uint_param(&mut e, &long, 1);
        e.u32(0);
        let err = r.err(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes());
        assert_eq!((err.code, err.domain), (code::INTERNAL_ERROR, domain::NONE));
        assert_eq!(
            err.message(),
            format!("internal error: parameter {long} too big for destination")
        );
        // more than ADMIN_SERVER_CLIENT_LIMITS_MAX: an XDR failure, before allocation
        let mut e = srv("virtlogd");
        e.u32(33);
        assert!(matches!(
            r.call(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes()),
            Err(DispatchError::Decode(_))
        ));
        // unknown typed-param type
        let mut e = srv("virtlogd");
        e.u32(1).string("nclients_max").i32(8).u32(1).u32(0);
        assert!(matches!(
            r.call(proc_::SERVER_SET_CLIENT_LIMITS, e.as_bytes()),
            Err(DispatchError::Decode(_))
        ));
    }

    #[test]
    fn threadpool_set() {
        let mut r = rig("virtlogd", true);
        let set = |r: &mut Rig, ps: &[(&str, u32)]| {
            let mut e = srv("virtlogd");
            e.u32(ps.len() as u32);
            for (n, v) in ps {
                uint_param(&mut e, n, *v);
            }
            e.u32(0);
            r.call(proc_::SERVER_SET_THREADPOOL_PARAMETERS, e.as_bytes())
        };
        let msg = |res: Result<Vec<u8>, DispatchError>| match res {
            Err(DispatchError::Failed(e)) => e.message().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            msg(set(&mut r, &[("minWorkers", 1)])),
            "invalid argument: minWorkers cannot be larger than maxWorkers"
        );
        assert_eq!(
            msg(set(&mut r, &[("maxWorkers", 3)])),
            "invalid argument: maxWorkers must not be switched from zero to non-zero and vice versa"
        );
        assert_eq!(
            msg(set(&mut r, &[("nWorkers", 3)])),
            "argument unsupported: parameter 'nWorkers' not supported"
        );
        set(&mut r, &[("maxWorkers", 0), ("prioWorkers", 2)]).unwrap();
        let got = r
            .call(
                proc_::SERVER_GET_THREADPOOL_PARAMETERS,
                &args(srv("virtlogd").u32(0)),
            )
            .unwrap();
        let mut d = Decoder::new(&got);
        let ps = decode_params(&mut d, 32).unwrap();
        let vals: Vec<_> = ps.iter().map(|p| p.value.clone()).collect();
        assert_eq!(
            vals,
            [0, 0, 0, 0, 2, 0].map(ParamValue::UInt).to_vec(),
            "prioWorkers reads back"
        );
    }

    #[test]
    fn client_info_and_close() {
        let mut r = rig("virtlogd", true);
        // Our own connection is not registered with the server in this rig, so no
        // client exists; CONNECT_CLOSE marks the connection.
        let body = {
            let mut e = Encoder::new();
            Header {
                prog: ADMIN_PROGRAM,
                vers: 1,
                proc_: proc_::CONNECT_CLOSE,
                type_: 0,
                serial: 3,
                status: 0,
            }
            .encode(&mut e);
            e.into_inner()
        };
        let (frame, close) = r.call_body(&body);
        assert!(close);
        assert_eq!(frame.len(), 28);
        let ps = client_info_params(&ClientInfo {
            id: 1,
            pid: 42,
            uid: 0,
            gid: 0,
            conn_time: 0,
            fd: -1,
        });
        let names: Vec<String> = ps.iter().map(|p| p.field_lossy()).collect();
        assert_eq!(
            names,
            [
                "readonly",
                "unix_user_id",
                "unix_user_name",
                "unix_group_id",
                "unix_group_name",
                "unix_process_id"
            ]
        );
        assert_eq!(ps[5].value, ParamValue::Int(42));
        // strings are kept for CLIENT_GET_INFO, dropped elsewhere
        let with = encode_params(&ps, 64, true).unwrap();
        let without = encode_params(&ps, 64, false).unwrap();
        assert_eq!(&with[..4], &[0, 0, 0, 6]);
        assert_eq!(&without[..4], &[0, 0, 0, 4]);
    }

    #[test]
    fn logging_calls() {
        let mut r = rig("virtlogd", true);
        let mut e = Encoder::new();
        e.optional_string(Some("1:util 3:rpc")).u32(0);
        r.call(proc_::CONNECT_SET_LOGGING_FILTERS, e.as_bytes())
            .unwrap();
        let got = r.call(proc_::CONNECT_GET_LOGGING_FILTERS, &[0; 4]).unwrap();
        let mut d = Decoder::new(&got);
        assert_eq!(
            d.optional_string(100).unwrap().as_deref(),
            Some("1:util 3:rpc")
        );
        assert_eq!(d.u32().unwrap(), 2);
        let mut e = Encoder::new();
        e.optional_string(Some("bad")).u32(0);
        let err = r.err(proc_::CONNECT_SET_LOGGING_OUTPUTS, e.as_bytes());
        assert_eq!((err.code, err.domain), (code::INVALID_ARG, domain::NONE));
        assert_eq!(
            err.message(),
            "invalid argument: Malformed format for log output 'bad'"
        );
        // absent = reset
        let mut e = Encoder::new();
        e.optional_string(None).u32(0);
        r.call(proc_::CONNECT_SET_LOGGING_OUTPUTS, e.as_bytes())
            .unwrap();
        let err = r.err(proc_::SERVER_UPDATE_TLS_FILES, &args(srv("admin").u32(0)));
        assert_eq!((err.code, err.domain), (code::INTERNAL_ERROR, domain::RPC));
        assert_eq!(
            err.message(),
            "internal error: no tls service found, unable to update tls files"
        );
        r.call(
            proc_::CONNECT_SET_DAEMON_TIMEOUT,
            &[0, 0, 0, 30, 0, 0, 0, 0],
        )
        .unwrap();
        assert_eq!(*r.fake.timeout.lock().unwrap(), 30);
    }

    #[test]
    fn validation_order_follows_sorted_names() {
        // An unknown name sorting before the known ones is reported even when a known
        // one has the wrong type.
        let ps = vec![
            TypedParam::new("aaa", ParamValue::UInt(1)),
            TypedParam::new("nclients_max", ParamValue::Int(1)),
        ];
        let e = validate_uint(&ps, &["nclients_max", "nclients_unauth_max"]).unwrap_err();
        assert_eq!(e.code, code::ARGUMENT_UNSUPPORTED);
        let ps = vec![
            TypedParam::new("zzz", ParamValue::UInt(1)),
            TypedParam::new("nclients_max", ParamValue::Int(1)),
        ];
        let e = validate_uint(&ps, &["nclients_max", "nclients_unauth_max"]).unwrap_err();
        assert_eq!(e.code, code::INVALID_ARG);
        assert!(validate_uint(&[], &["nclients_max"]).is_ok());
    }
}
