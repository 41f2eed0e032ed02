//! The exec-restart state file (SIGUSR1), in libvirt 9.0's JSON format: the part both
//! daemons share. This module knows the document's framing (`magic`, our
//! [`COUNTERS_KEY`]), the `daemon` object (servers, services, sockets, clients), the
//! located-error walker ([`Obj`]) both daemons read their own sections with, and the
//! file's I/O. Each daemon owns its own section and whole document:
//! `virtlogd::state` (`handler`, `LogdState`) and `virtlockd::state` (`defaultLockspace`,
//! `lockspaces`, the lock clients' `privateData`, `LockdState`).
//!
//! On SIGUSR1 the daemon describes its servers, services, listening sockets, clients and
//! its own handler state (virtlogd's open log pipes, virtlockd's lockspaces) in one JSON
//! document, clears close-on-exec on every descriptor named in it, writes the document to
//! the state file and execs itself with the original argv. The new image (same pid) reads
//! the file back, unlinks it and adopts the descriptors.
//!
//! The format must be exactly libvirt's, in both directions: when a C daemon is replaced by
//! ours, the C process writes the file and execs us; when ours is rolled back, we write it
//! and exec the C binary. See `rpc-wire.md` §6, `virtlogd.md` §7 and `virtlockd.md` §6.
//!
//! Reading tolerates every older shape libvirt itself tolerates (servers as an object, as an
//! array, or absent; virtlockd's pre-2015 `server` key; optional `max_anonymous_clients`,
//! `next_client_id`, client `id`, `auth_pending`, `conn_time`, socket `unlinkUNIX`).
//! A missing required key is reported by name together with where it was expected.
//!
//! Writing produces 11.3's text byte for byte (its empty arrays are `[]`; 9.0 wrote
//! `[`, a blank line, `]`: both daemons parse either) and libvirt's key order and JSON
//! types, the same in 9.0 and 11.3: `magic` is a decimal string,
//! booleans are JSON booleans, `keepaliveInterval` −1 is written as 4294967295,
//! `conn_time` is left out when 0, and the servers object is sorted by name, so `"admin"`
//! comes before the daemon's own server.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Largest state file the new image accepts (libvirt reads at most 10 MiB).
pub const STATE_FILE_MAX_LEN: u64 = 10 * 1024 * 1024;

/// Name of the admin server in the `servers` object.
pub const ADMIN_SERVER: &str = "admin";

/// Mode the state file is created with (before the umask), as libvirt does.
pub const STATE_FILE_MODE: u32 = 0o700;

/// `VIR_NET_SERVER_SERVICE_AUTH_NONE`: the only auth method these daemons use.
pub const AUTH_NONE: i32 = 0;

/// Why a state file could not be read or a state document could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    /// Opening or reading the state file failed.
    #[error("Unable to read restart state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file is larger than [`STATE_FILE_MAX_LEN`].
    #[error("Restart state file {path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    /// The document is not JSON (or not UTF-8).
    #[error("Unable to parse restart state JSON: {0}")]
    Parse(String),
    /// The top-level `magic` string is absent (or not a string).
    #[error("Missing magic data in JSON document")]
    MissingMagic,
    /// A required key is absent.
    #[error("Missing {key} data in JSON document (in {at})")]
    Missing { key: String, at: String },
    /// A key is present with the wrong JSON type or an out-of-range value.
    #[error("Malformed {key} data in JSON document (in {at}): expected {expected}")]
    Malformed {
        key: String,
        at: String,
        expected: &'static str,
    },
    /// The document is well-formed but not acceptable (limits, server names, ...).
    #[error("Invalid restart state (in {at}): {reason}")]
    Invalid { at: String, reason: String },
}

impl RestartError {
    /// The key the error is about, for `Missing` and `Malformed`.
    pub fn key(&self) -> Option<&str> {
        match self {
            RestartError::Missing { key, .. } | RestartError::Malformed { key, .. } => Some(key),
            RestartError::MissingMagic => Some("magic"),
            _ => None,
        }
    }
}

/// Why a daemon could not restore its part of a state document it understood.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A refusal the daemon words as an RPC error (a poisoned table, a bad limit).
    #[error(transparent)]
    Rpc(#[from] vh_proto::error::RpcError),
    /// A table the restore must fill is unusable: its lock was poisoned.
    #[error("{0} poisoned")]
    Poisoned(&'static str),
    #[error(transparent)]
    Io(#[from] io::Error),
}

type Result<T> = std::result::Result<T, RestartError>;

/// The `magic` value for a process: its pid as a decimal string.
pub fn restart_magic(pid: u32) -> String {
    pid.to_string()
}

// ---------------------------------------------------------------------------------------
// Reading helpers: typed access to one JSON object, with the object's location for errors.
// ---------------------------------------------------------------------------------------

pub fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

pub fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

fn display_at(at: &str) -> String {
    if at.is_empty() {
        "top level".to_string()
    } else {
        at.to_string()
    }
}

pub fn missing(key: &str, at: &str) -> RestartError {
    RestartError::Missing {
        key: key.to_string(),
        at: display_at(at),
    }
}

pub fn malformed(key: &str, at: &str, expected: &'static str) -> RestartError {
    RestartError::Malformed {
        key: key.to_string(),
        at: display_at(at),
        expected,
    }
}

pub fn invalid(at: &str, reason: impl Into<String>) -> RestartError {
    RestartError::Invalid {
        at: display_at(at),
        reason: reason.into(),
    }
}

/// One JSON object being read, and where it sits in the document (`daemon.servers.admin`).
pub struct Obj<'a> {
    pub map: &'a Map<String, Value>,
    pub at: String,
}

impl<'a> Obj<'a> {
    /// `value` must be an object; `key` names it in the error if it is not.
    pub fn new(value: &'a Value, key: &str, at: String) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj { map, at }),
            _ => {
                // Report against the parent location, naming the offending key.
                let parent = at
                    .rsplit_once('.')
                    .map(|(p, _)| p.to_string())
                    .unwrap_or_default();
                Err(malformed(key, &parent, "an object"))
            }
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    pub fn req(&self, key: &str) -> Result<&'a Value> {
        self.map.get(key).ok_or_else(|| missing(key, &self.at))
    }

    pub fn bad(&self, key: &str, expected: &'static str) -> RestartError {
        malformed(key, &self.at, expected)
    }

    pub fn child_at(&self, key: &str) -> String {
        join(&self.at, key)
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        let v = self.req(key)?;
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.bad(key, "an unsigned 32-bit integer"))
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        v.as_u64()
            .ok_or_else(|| self.bad(key, "an unsigned 64-bit integer"))
    }

    pub fn i32(&self, key: &str) -> Result<i32> {
        let v = self.req(key)?;
        v.as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| self.bad(key, "a signed 32-bit integer"))
    }

    pub fn i64(&self, key: &str) -> Result<i64> {
        let v = self.req(key)?;
        v.as_i64()
            .ok_or_else(|| self.bad(key, "a signed 64-bit integer"))
    }

    pub fn bool(&self, key: &str) -> Result<bool> {
        let v = self.req(key)?;
        v.as_bool().ok_or_else(|| self.bad(key, "a boolean"))
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| self.bad(key, "a string"))
    }

    pub fn uuid(&self, key: &str) -> Result<Uuid> {
        let s = self.str(key)?;
        Uuid::parse_str(s).map_err(|_| self.bad(key, "a UUID string"))
    }

    pub fn array(&self, key: &str) -> Result<&'a Vec<Value>> {
        let v = self.req(key)?;
        v.as_array().ok_or_else(|| self.bad(key, "an array"))
    }

    pub fn object(&self, key: &str) -> Result<Obj<'a>> {
        let v = self.req(key)?;
        Obj::new(v, key, self.child_at(key))
    }

    /// The array `key`, every element an object, each read by `parse` at its own
    /// location (`<here>.key[i]`). A non-object element is reported before any element
    /// is read, against this object, as `key[i]`.
    pub fn each<T>(
        &self,
        key: &str,
        mut parse: impl FnMut(&Obj<'a>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let at = self.child_at(key);
        objects(self.array(key)?, key, &self.at)?
            .iter()
            .enumerate()
            .map(|(i, o)| {
                parse(&Obj {
                    map: o.map,
                    at: index(&at, i),
                })
            })
            .collect()
    }
}

/// Elements of an array that must all be objects.
pub fn objects<'a>(items: &'a [Value], key: &str, at: &str) -> Result<Vec<Obj<'a>>> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(map) => Ok(Obj {
                map,
                at: index(at, i),
            }),
            _ => Err(malformed(&format!("{key}[{i}]"), at, "an object")),
        })
        .collect()
}

pub fn root(value: &Value) -> Result<Obj<'_>> {
    match value {
        Value::Object(map) => Ok(Obj {
            map,
            at: String::new(),
        }),
        _ => Err(malformed("document", "", "a JSON object")),
    }
}

/// A state object the walker reads: its keys from an [`Obj`] (`parse`, what [`Obj::each`]
/// and [`Obj::object`] callers use), or on its own from a bare `Value`, its location in
/// errors then being its [`FromObj::NAME`].
pub trait FromObj: Sized {
    /// The object's name at the top of a walk (`sock`, `service`, `resource`, ...).
    const NAME: &'static str;

    /// Reads the object's keys in libvirt's order (the first bad key is the one
    /// reported).
    fn parse(o: &Obj<'_>) -> Result<Self>;

    /// Reads a bare object.
    fn from_value(value: &Value) -> Result<Self> {
        Self::parse(&Obj::new(value, Self::NAME, String::from(Self::NAME))?)
    }
}

pub fn parse_text(text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| RestartError::Parse(e.to_string()))
}

/// libvirt's layout (two-space pretty printing, final newline), written straight from
/// the typed document.
pub fn pretty_doc<T: Serialize>(doc: &T) -> String {
    // Cannot fail: every map key is a string and every value a plain JSON type.
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// A document as a re-exec hands it to the next image: compact JSON. The next image
/// may be libvirt's, whose readers (9.0's yajl, 11.3's json-c) take any valid JSON;
/// libvirt's own pretty layout ([`pretty_doc`]) was more than half of the bytes with
/// 10,000 leases (its indentation is a write per level on every line), and both
/// writing and reading them sat inside the re-exec pause.
pub fn compact_doc<T: Serialize>(doc: &T) -> String {
    // Cannot fail: every map key is a string and every value a plain JSON type.
    let mut s = serde_json::to_string(doc).unwrap_or_default();
    s.push('\n');
    s
}

/// Serialize/Deserialize through `serde_json::Value`, using the hand-written rules.
macro_rules! serde_via_value {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(
                &self,
                serializer: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                self.to_value().serialize(serializer)
            }
        }

        deserialize_via_value!($ty);
    };
}

/// Deserialize through `serde_json::Value`, using the hand-written rules.
macro_rules! deserialize_via_value {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                let value = Value::deserialize(deserializer)?;
                Self::from_value(&value).map_err(serde::de::Error::custom)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// SOCKET
// ---------------------------------------------------------------------------------------

/// One `virNetSocket`: a listening socket of a service or the connection of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketState {
    pub fd: RawFd,
    /// Always −1 here (only command-backed sockets have one).
    pub errfd: RawFd,
    /// Always 0 here (only command-backed sockets have one).
    pub pid: i32,
    /// true for accepted connections, false for listening sockets.
    pub is_client: bool,
    /// true if the daemon bound the socket itself and must unlink its path on close;
    /// false for sockets from systemd and for connections.
    pub unlink_unix: bool,
}

impl FromObj for SocketState {
    const NAME: &'static str = "sock";

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let fd = o.i32("fd")?;
        let pid = o.i32("pid")?;
        let errfd = o.i32("errfd")?;
        let is_client = o.bool("isClient")?;
        // libvirt falls back to the default both when the key is absent and when it is
        // not a boolean.
        let unlink_unix = o
            .get("unlinkUNIX")
            .and_then(Value::as_bool)
            .unwrap_or(!is_client);
        Ok(SocketState {
            fd,
            errfd,
            pid,
            is_client,
            unlink_unix,
        })
    }
}

impl SocketState {
    /// A listening socket (`unlink_unix`: whether we bound it ourselves).
    pub fn listener(fd: RawFd, unlink_unix: bool) -> Self {
        SocketState {
            fd,
            errfd: -1,
            pid: 0,
            is_client: false,
            unlink_unix,
        }
    }

    /// An accepted connection.
    pub fn connection(fd: RawFd) -> Self {
        SocketState {
            fd,
            errfd: -1,
            pid: 0,
            is_client: true,
            unlink_unix: false,
        }
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("fd".into(), self.fd.into());
        m.insert("errfd".into(), self.errfd.into());
        m.insert("pid".into(), self.pid.into());
        m.insert("isClient".into(), self.is_client.into());
        m.insert("unlinkUNIX".into(), self.unlink_unix.into());
        Value::Object(m)
    }

    fn push_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.fd);
        if self.errfd != -1 {
            out.push(self.errfd);
        }
    }
}

serde_via_value!(SocketState);

// ---------------------------------------------------------------------------------------
// SERVICE
// ---------------------------------------------------------------------------------------

/// One `virNetServerService`: a set of listening sockets sharing auth settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub auth: i32,
    pub readonly: bool,
    pub nrequests_client_max: u32,
    pub socks: Vec<SocketState>,
}

impl FromObj for ServiceState {
    const NAME: &'static str = "service";

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let auth = o.i32("auth")?;
        let readonly = o.bool("readonly")?;
        let nrequests_client_max = o.u32("nrequests_client_max")?;
        let socks = o.each("socks", SocketState::parse)?;
        Ok(ServiceState {
            auth,
            readonly,
            nrequests_client_max,
            socks,
        })
    }
}

impl ServiceState {
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("auth".into(), self.auth.into());
        m.insert("readonly".into(), self.readonly.into());
        m.insert(
            "nrequests_client_max".into(),
            self.nrequests_client_max.into(),
        );
        m.insert(
            "socks".into(),
            Value::Array(self.socks.iter().map(SocketState::to_value).collect()),
        );
        Value::Object(m)
    }
}

serde_via_value!(ServiceState);

// ---------------------------------------------------------------------------------------
// CLIENT
// ---------------------------------------------------------------------------------------

/// One connected `virNetServerClient`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientState {
    pub id: u64,
    pub auth: i32,
    pub auth_pending: bool,
    pub readonly: bool,
    pub nrequests_max: u32,
    /// Connect time in epoch seconds; 0 = unknown (then not written).
    pub conn_time: i64,
    pub sock: SocketState,
    /// Daemon-specific data: `{}` for virtlogd and the admin servers, virtlockd's
    /// `LockClientPrivate` (`virtlockd::state`) for its main server.
    pub private_data: Value,
    /// Our own key: I/O the client had half done at hand-off. libvirt looks up the
    /// keys it knows by name and never sees this one.
    pub carry: Option<ClientCarry>,
}

/// Key of [`ClientCarry`] in a CLIENT object.
pub const CARRY_KEY: &str = "virtHelpersCarry";

/// A client's half-done I/O at hand-off (`"virtHelpersCarry"`): the bytes live in a
/// memory file handed over like the sockets, so the state document stays small
/// whatever a slow peer left half sent or half read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCarry {
    /// The memory file: `input` bytes, then `output` bytes.
    pub fd: RawFd,
    /// Bytes of a request read so far (length word included).
    pub input: u64,
    /// Fds received with that request.
    pub input_fds: Vec<RawFd>,
    /// Bytes of a reply not yet written.
    pub output: u64,
    /// Fds of that reply not yet sent.
    pub output_fds: Vec<RawFd>,
}

impl ClientCarry {
    fn parse(o: &Obj<'_>) -> Result<Self> {
        let fds = |key: &str| -> Result<Vec<RawFd>> {
            o.array(key)?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_i64()
                        .and_then(|n| RawFd::try_from(n).ok())
                        .ok_or_else(|| malformed(&format!("{key}[{i}]"), &o.at, "an fd number"))
                })
                .collect()
        };
        Ok(ClientCarry {
            fd: o.i32("fd")?,
            input: o.u64("input")?,
            input_fds: fds("inputFds")?,
            output: o.u64("output")?,
            output_fds: fds("outputFds")?,
        })
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("fd".into(), self.fd.into());
        m.insert("input".into(), self.input.into());
        m.insert("inputFds".into(), self.input_fds.clone().into());
        m.insert("output".into(), self.output.into());
        m.insert("outputFds".into(), self.output_fds.clone().into());
        Value::Object(m)
    }

    fn push_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.fd);
        out.extend(&self.input_fds);
        out.extend(&self.output_fds);
    }
}

impl ClientState {
    /// Reads a client; a client without `id` gets `*next_client_id`, which is advanced
    /// (libvirt allocates a fresh id from the server in that case).
    fn parse(o: &Obj<'_>, next_client_id: &mut u64) -> Result<Self> {
        let auth = o.i32("auth")?;
        let auth_pending = if o.has("auth_pending") {
            let pending = o.bool("auth_pending")?;
            if pending && auth == AUTH_NONE {
                return Err(invalid(
                    &o.at,
                    "Invalid auth_pending and auth combination in JSON state document",
                ));
            }
            pending
        } else {
            // Only AUTH_NONE implies an authenticated client.
            auth != AUTH_NONE
        };
        let readonly = o.bool("readonly")?;
        let nrequests_max = o.u32("nrequests_max")?;
        let sock = o.object("sock")?;
        let id = if o.has("id") {
            o.u64("id")?
        } else {
            let id = *next_client_id;
            *next_client_id = next_client_id.saturating_add(1);
            id
        };
        let conn_time = if o.has("conn_time") {
            o.i64("conn_time")?
        } else {
            0
        };
        let sock = SocketState::parse(&sock)?;
        let private_data = o.req("privateData")?.clone();
        let carry = if o.has(CARRY_KEY) {
            Some(ClientCarry::parse(&o.object(CARRY_KEY)?)?)
        } else {
            None
        };
        Ok(ClientState {
            id,
            auth,
            auth_pending,
            readonly,
            nrequests_max,
            conn_time,
            sock,
            private_data,
            carry,
        })
    }

    /// Reads a client on its own; a missing `id` becomes 1.
    pub fn from_value(value: &Value) -> Result<Self> {
        let mut next = 1;
        Self::parse(
            &Obj::new(value, "client", String::from("client"))?,
            &mut next,
        )
    }

    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), self.id.into());
        m.insert("auth".into(), self.auth.into());
        m.insert("auth_pending".into(), self.auth_pending.into());
        m.insert("readonly".into(), self.readonly.into());
        m.insert("nrequests_max".into(), self.nrequests_max.into());
        if self.conn_time != 0 {
            m.insert("conn_time".into(), self.conn_time.into());
        }
        m.insert("sock".into(), self.sock.to_value());
        m.insert("privateData".into(), self.private_data.clone());
        if let Some(c) = &self.carry {
            m.insert(CARRY_KEY.into(), c.to_value());
        }
        Value::Object(m)
    }
}

serde_via_value!(ClientState);

// ---------------------------------------------------------------------------------------
// SERVER
// ---------------------------------------------------------------------------------------

/// One `virNetServer` ("admin", "virtlogd" or "virtlockd").
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub min_workers: u32,
    pub max_workers: u32,
    pub priority_workers: u32,
    pub max_clients: u32,
    /// At most `max_clients`.
    pub max_anonymous_clients: u32,
    /// −1 = keepalive disabled (what these daemons use); written as 4294967295.
    pub keepalive_interval: i64,
    pub keepalive_count: u32,
    /// Next client id to hand out (≥ 1).
    pub next_client_id: u64,
    pub services: Vec<ServiceState>,
    pub clients: Vec<ClientState>,
}

impl FromObj for ServerState {
    const NAME: &'static str = "server";

    fn parse(o: &Obj<'_>) -> Result<Self> {
        let min_workers = o.u32("min_workers")?;
        let max_workers = o.u32("max_workers")?;
        let priority_workers = o.u32("priority_workers")?;
        let max_clients = o.u32("max_clients")?;
        let max_anonymous_clients = if o.has("max_anonymous_clients") {
            let n = o.u32("max_anonymous_clients")?;
            if n > max_clients {
                return Err(invalid(
                    &o.at,
                    format!(
                        "max_anonymous_clients ({n}) must not exceed max_clients ({max_clients})"
                    ),
                ));
            }
            n
        } else {
            max_clients
        };
        let keepalive_interval = keepalive_interval(o)?;
        let keepalive_count = o.u32("keepaliveCount")?;
        let mut next_client_id = match o.get("next_client_id").and_then(Value::as_u64) {
            Some(n) => n,
            None => {
                tracing::warn!(
                    "Missing next_client_id data in JSON document (in {}), using 1",
                    display_at(&o.at)
                );
                1
            }
        };

        let services = o.each("services", ServiceState::parse)?;
        let clients = o.each("clients", |c| ClientState::parse(c, &mut next_client_id))?;

        Ok(ServerState {
            min_workers,
            max_workers,
            priority_workers,
            max_clients,
            max_anonymous_clients,
            keepalive_interval,
            keepalive_count,
            next_client_id,
            services,
            clients,
        })
    }
}

impl ServerState {
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("min_workers".into(), self.min_workers.into());
        m.insert("max_workers".into(), self.max_workers.into());
        m.insert("priority_workers".into(), self.priority_workers.into());
        m.insert("max_clients".into(), self.max_clients.into());
        m.insert(
            "max_anonymous_clients".into(),
            self.max_anonymous_clients.into(),
        );
        // libvirt stores an int and writes it as unsigned: −1 becomes 4294967295.
        m.insert(
            "keepaliveInterval".into(),
            (self.keepalive_interval as u32).into(),
        );
        m.insert("keepaliveCount".into(), self.keepalive_count.into());
        m.insert("next_client_id".into(), self.next_client_id.into());
        m.insert(
            "services".into(),
            Value::Array(self.services.iter().map(ServiceState::to_value).collect()),
        );
        m.insert(
            "clients".into(),
            Value::Array(self.clients.iter().map(ClientState::to_value).collect()),
        );
        Value::Object(m)
    }

    /// Every descriptor that must survive the exec: listening sockets, client sockets,
    /// and their `errfd`s when set.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut out = Vec::new();
        for svc in &self.services {
            for s in &svc.socks {
                s.push_fds(&mut out);
            }
        }
        for c in &self.clients {
            c.sock.push_fds(&mut out);
            if let Some(carry) = &c.carry {
                carry.push_fds(&mut out);
            }
        }
        out
    }
}

/// `keepaliveInterval` is read as unsigned and used as an int: 4294967295 means −1.
/// A negative number (what a signed writer would produce) is accepted as well.
fn keepalive_interval(o: &Obj<'_>) -> Result<i64> {
    let key = "keepaliveInterval";
    let v = o.req(key)?;
    if let Some(n) = v.as_u64() {
        if let Ok(n) = u32::try_from(n) {
            return Ok(i64::from(n as i32));
        }
    } else if let Some(n) = v.as_i64() {
        if let Ok(n) = i32::try_from(n) {
            return Ok(i64::from(n));
        }
    }
    Err(o.bad(key, "a 32-bit integer"))
}

serde_via_value!(ServerState);

// ---------------------------------------------------------------------------------------
// DAEMON
// ---------------------------------------------------------------------------------------

/// `virNetDaemon`: the servers by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DaemonState {
    /// In document order when read; written sorted by name.
    pub servers: Vec<(String, ServerState)>,
}

impl DaemonState {
    /// Reads the `daemon` object (or virtlockd's older `server` object). `own_name` is the
    /// daemon's main server ("virtlogd"/"virtlockd"): the name given to a server stored
    /// without one (no `servers` key, or `servers` as an array). Only `own_name` and
    /// "admin" are accepted, and `own_name` must be present.
    pub fn from_value(value: &Value, own_name: &str) -> Result<Self> {
        let o = Obj::new(value, "daemon", String::from("daemon"))?;
        Self::parse(&o, own_name)
    }

    pub fn parse(o: &Obj<'_>, own_name: &str) -> Result<Self> {
        let mut servers = Vec::new();
        match o.get("servers") {
            // Very old state: the object itself is the one server.
            None => servers.push((own_name.to_string(), ServerState::parse(o)?)),
            Some(Value::Object(map)) => {
                let at = o.child_at("servers");
                for (name, v) in map {
                    if name != own_name && name != ADMIN_SERVER {
                        return Err(invalid(
                            &at,
                            format!("Unexpected server name '{name}' during restart"),
                        ));
                    }
                    let so = Obj::new(v, name, join(&at, name))?;
                    servers.push((name.clone(), ServerState::parse(&so)?));
                }
            }
            Some(Value::Array(items)) => {
                let at = o.child_at("servers");
                // The list of default names holds only the daemon's own server.
                if items.len() > 1 {
                    return Err(invalid(
                        &at,
                        format!(
                            "Server count {} greater than default name count 1",
                            items.len()
                        ),
                    ));
                }
                for so in objects(items, "servers", &o.at)? {
                    servers.push((own_name.to_string(), ServerState::parse(&so)?));
                }
            }
            Some(_) => return Err(o.bad("servers", "an object or an array")),
        }
        if !servers.iter().any(|(n, _)| n == own_name) {
            return Err(invalid(
                &o.at,
                format!("No server named '{own_name}' in JSON document"),
            ));
        }
        Ok(DaemonState { servers })
    }

    /// `{ "servers": { name: SERVER, ... } }`, names sorted (so "admin" comes first).
    pub fn to_value(&self) -> Value {
        let mut sorted: Vec<&(String, ServerState)> = self.servers.iter().collect();
        sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut servers = Map::new();
        for (name, srv) in sorted {
            servers.insert(name.clone(), srv.to_value());
        }
        let mut m = Map::new();
        m.insert("servers".into(), Value::Object(servers));
        Value::Object(m)
    }

    /// The server called `name`.
    pub fn server(&self, name: &str) -> Option<&ServerState> {
        self.servers.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// The server called `name`, mutably.
    pub fn server_mut(&mut self, name: &str) -> Option<&mut ServerState> {
        self.servers
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Descriptors of every server (see [`ServerState::inherited_fds`]).
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        self.servers
            .iter()
            .flat_map(|(_, s)| s.inherited_fds())
            .collect()
    }
}

impl Serialize for DaemonState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

// ---------------------------------------------------------------------------------------
// Top-level framing shared by both daemons' documents
// ---------------------------------------------------------------------------------------

/// The top-level `magic` (the writer's pid as a decimal string).
pub fn magic_of(o: &Obj<'_>) -> Result<String> {
    o.get("magic")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(RestartError::MissingMagic)
}

/// Top-level key of the re-exec document holding our daemons' own counters (operator
/// metrics). libvirt 9.0 looks its keys up by name and never lists an object's keys,
/// so a document carrying it still restores into the C daemons.
pub const COUNTERS_KEY: &str = "vhCounters";

/// A daemon's whole state document (virtlogd's `LogdState`, virtlockd's `LockdState`):
/// its two readers, and what both write the same way.
pub trait StateDocument: Serialize + Sized {
    /// The common case, read straight into typed rows by serde's derive. Anything
    /// unusual (a wrong type, a duplicate key, an older shape) gives `None`, and the
    /// walk then reports it precisely; a document both paths accept gives the same
    /// result from either.
    fn parse_fast(text: &str) -> Option<Self>;

    /// The walk over a parsed `Value`, with located errors.
    fn from_value(value: &Value) -> Result<Self>;

    /// Parses a state document's text.
    fn parse(text: &str) -> Result<Self> {
        if let Some(doc) = Self::parse_fast(text) {
            return Ok(doc);
        }
        Self::from_value(&parse_text(text)?)
    }

    /// The document as a `Value` (same keys and order as the text).
    fn to_value(&self) -> Value {
        // Cannot fail: every map key is a string.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The document as libvirt writes it: pretty-printed, keys in libvirt's order.
    fn to_json_string(&self) -> String {
        pretty_doc(self)
    }
}

/// serde's entry point for a whole document: through the walk, with its located errors
/// (a document's `Deserialize` calls this).
pub fn deserialize_document<'de, D: Deserializer<'de>, T: StateDocument>(
    deserializer: D,
) -> std::result::Result<T, D::Error> {
    let value = Value::deserialize(deserializer)?;
    T::from_value(&value).map_err(serde::de::Error::custom)
}

/// A UUID as the state document writes it (lowercase, hyphenated) and reads it (any
/// form `Uuid::parse_str` takes), for serde's `with` attribute.
pub mod uuid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Uuid::encode_buffer();
        s.serialize_str(u.hyphenated().encode_lower(&mut buf))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------
// Files and descriptors
// ---------------------------------------------------------------------------------------

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes the state file.
///
/// libvirt opens the file itself with O_WRONLY|O_CREAT|O_TRUNC, mode 0700. We create
/// `<path>.tmp` the same way (after removing a stale one, and exclusively, so a leftover
/// file's mode or a planted symlink is never reused), write, and rename it over
/// `path`, so a failed write never leaves a half-written state file. Nothing is
/// fsynced: the only reader is this same process right after exec, through the page
/// cache, and a machine crash ends the process whose fds the document describes.
pub fn write_state_file(path: &Path, json: &str) -> io::Result<()> {
    let tmp = tmp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(STATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(json.as_bytes())?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

fn unlink_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(
                "Unable to remove restart state file {}: {}",
                path.display(),
                e
            );
        }
    }
}

/// Reads and removes the state file; `None` if there is none. Whether it is meant for
/// this process (its magic) is for the caller to check on the parsed document (see
/// [`magic_matches`]), so the document is read once.
pub fn read_state_file(path: &Path) -> Result<Option<String>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            unlink_quietly(path);
            return Err(RestartError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    // Sized once from the file (`take` hides the size from read_to_end, which would
    // otherwise grow the buffer by doubling through a document of a thousand entries).
    let hint = file
        .metadata()
        .map_or(0, |m| m.len().min(STATE_FILE_MAX_LEN + 1));
    let mut bytes = Vec::with_capacity(hint as usize + 1);
    let read = file.take(STATE_FILE_MAX_LEN + 1).read_to_end(&mut bytes);
    unlink_quietly(path);
    if let Err(e) = read {
        return Err(RestartError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    if bytes.len() as u64 > STATE_FILE_MAX_LEN {
        return Err(RestartError::TooLarge {
            path: path.to_path_buf(),
            limit: STATE_FILE_MAX_LEN,
        });
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| RestartError::Parse(format!("state file is not UTF-8: {e}")))?;
    Ok(Some(text))
}

/// Whether a document's magic (`None`: it has none) is the one this process wants. A
/// stale file, another pid's (a crash between writing it and exec, say), is ignored
/// with libvirt's warning: the daemon then starts afresh.
pub fn magic_matches(got: Option<&str>, my_pid: u32) -> Result<bool> {
    let got = got.ok_or(RestartError::MissingMagic)?;
    let want = restart_magic(my_pid);
    if got != want {
        tracing::warn!(
            "Found restart exec file with old magic {} vs wanted {}",
            got,
            want
        );
        return Ok(false);
    }
    Ok(true)
}

/// The magic of a document, by a typed scan that skips everything else. For documents
/// the full parse refused: a stale file is ignored whatever else is wrong with it.
pub fn scan_magic(text: &str) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct MagicOnly {
        magic: Option<Value>,
    }
    let doc: MagicOnly =
        serde_json::from_str(text).map_err(|e| RestartError::Parse(e.to_string()))?;
    Ok(doc
        .magic
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned))
}

/// Consumes the state file in one step ([`read_state_file`], then [`scan_magic`]):
///
/// * no file: `Ok(None)` (normal start);
/// * otherwise the file is read (at most [`STATE_FILE_MAX_LEN`] bytes) and unlinked at
///   once, whatever the outcome;
/// * a read error, an oversized file, invalid JSON or a missing `magic` is an error;
/// * a `magic` other than `my_pid` is a stale file: a warning is logged and `Ok(None)`
///   returned (normal start);
/// * otherwise the document's text is returned.
///
/// The daemon itself reads the file and checks the magic of the parsed document
/// instead, so that the document is parsed once (see `daemon::main`).
pub fn take_state_file(path: &Path, my_pid: u32) -> Result<Option<String>> {
    let Some(text) = read_state_file(path)? else {
        return Ok(None);
    };
    let magic = scan_magic(&text)?;
    Ok(magic_matches(magic.as_deref(), my_pid)?.then_some(text))
}

/// The close-on-exec switches live with fd passing; re-exported at their old path.
pub use vh_proto::fdpass::{clear_cloexec, set_cloexec};

/// Helpers for the tests of the state documents (here and in each daemon's
/// `state.rs`): JSON surgery on a fixture, and one server object to build documents
/// around. Compiled for tests only (the daemons' test builds turn on the
/// `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
#[allow(clippy::expect_used, clippy::unwrap_used)]
pub mod test_support {
    use super::{RestartError, StateDocument};
    use serde_json::{json, Value};

    /// The keys every SERVER object must have.
    pub const SERVER_KEYS: [&str; 8] = [
        "min_workers",
        "max_workers",
        "priority_workers",
        "max_clients",
        "keepaliveInterval",
        "keepaliveCount",
        "services",
        "clients",
    ];

    /// `fixture` without `key` at `pointer` is refused, the error naming the key.
    pub fn assert_missing<T: StateDocument + std::fmt::Debug>(
        fixture: &str,
        pointer: &str,
        key: &str,
    ) {
        let mut doc = value(fixture);
        remove(&mut doc, pointer, key);
        let e = T::from_value(&doc).unwrap_err();
        assert!(
            matches!(e, RestartError::Missing { key: ref k, .. } if k == key),
            "{pointer} {key}: {e:?}"
        );
        assert!(e.to_string().contains(key), "{e}");
    }

    pub fn value(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    /// The typed fast path reads `fixture` as the `Value` walk does, and reads back
    /// what we write.
    pub fn assert_fast_parse_agrees<T>(fixture: &str)
    where
        T: StateDocument + PartialEq + std::fmt::Debug + Clone,
    {
        let walk = T::from_value(&super::parse_text(fixture).unwrap()).unwrap();
        assert_eq!(T::parse_fast(fixture), Some(walk.clone()));
        let text = walk.to_json_string();
        assert_eq!(T::parse_fast(&text), Some(walk));
    }

    /// libvirt's `fixture` parses; what we write from it parses back the same and has
    /// its values and its key order; serde's entry point reads it alike. Returns the
    /// parsed document.
    pub fn assert_round_trips_like_fixture<T>(fixture: &str) -> T
    where
        T: StateDocument + PartialEq + std::fmt::Debug + serde::de::DeserializeOwned,
    {
        let st = T::parse(fixture).unwrap();
        let written = st.to_json_string();
        assert_eq!(T::parse(&written).unwrap(), st);
        let ours = value(&written);
        let theirs = value(fixture);
        assert_eq!(ours, theirs);
        assert_eq!(keys(&ours), keys(&theirs));
        let via_serde: T = serde_json::from_str(fixture).unwrap();
        assert_eq!(via_serde, st);
        st
    }

    /// Every object key with its path, in document order.
    pub fn key_order(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let p = format!("{at}/{k}");
                    out.push(p.clone());
                    key_order(child, &p, out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    key_order(child, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    pub fn keys(v: &Value) -> Vec<String> {
        let mut out = Vec::new();
        key_order(v, "", &mut out);
        out
    }

    pub fn remove(doc: &mut Value, pointer: &str, key: &str) {
        doc.pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("no object at {pointer}"))
            .shift_remove(key)
            .unwrap_or_else(|| panic!("no key {key} at {pointer}"));
    }

    pub fn set(doc: &mut Value, pointer: &str, key: &str, v: Value) {
        doc.pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("no object at {pointer}"))
            .insert(key.to_string(), v);
    }

    pub fn server_json() -> Value {
        json!({
            "min_workers": 0, "max_workers": 0, "priority_workers": 0,
            "max_clients": 1024, "max_anonymous_clients": 1024,
            "keepaliveInterval": 4294967295u64, "keepaliveCount": 0,
            "next_client_id": 5,
            "services": [ { "auth": 0, "readonly": false, "nrequests_client_max": 1,
                "socks": [ { "fd": 3, "errfd": -1, "pid": 0, "isClient": false,
                             "unlinkUNIX": false } ] } ],
            "clients": [ { "id": 4, "auth": 0, "auth_pending": false, "readonly": false,
                "nrequests_max": 1, "conn_time": 1717000123,
                "sock": { "fd": 11, "errfd": -1, "pid": 0, "isClient": true,
                          "unlinkUNIX": false },
                "privateData": {} } ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{remove, server_json, set};
    use super::*;
    use serde_json::json;

    const LOCKD_FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/virtlockd-9.0-restart-exec.json"
    ));

    #[test]
    fn missing_next_client_id_defaults_to_one_and_feeds_missing_client_ids() {
        let mut srv = server_json();
        srv.as_object_mut().unwrap().shift_remove("next_client_id");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.next_client_id, 1);
        assert_eq!(s.clients[0].id, 4);

        // Clients without ids get fresh ones from the server's counter.
        let mut srv = server_json();
        let c = srv["clients"][0].clone();
        srv["clients"] = json!([c.clone(), c]);
        remove(&mut srv, "/clients/0", "id");
        remove(&mut srv, "/clients/1", "id");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.clients[0].id, 5);
        assert_eq!(s.clients[1].id, 6);
        assert_eq!(s.next_client_id, 7);
        // A non-number counts as missing.
        set(&mut srv, "", "next_client_id", json!("9"));
        assert_eq!(ServerState::from_value(&srv).unwrap().next_client_id, 3);
    }

    #[test]
    fn unlink_unix_defaults_to_not_is_client() {
        let listener =
            SocketState::from_value(&json!({ "fd": 3, "errfd": -1, "pid": 0, "isClient": false }))
                .unwrap();
        assert!(listener.unlink_unix);
        let conn =
            SocketState::from_value(&json!({ "fd": 9, "errfd": -1, "pid": 0, "isClient": true }))
                .unwrap();
        assert!(!conn.unlink_unix);
        // Explicit values win, including the systemd case.
        let activated = SocketState::from_value(
            &json!({ "fd": 3, "errfd": -1, "pid": 0, "isClient": false, "unlinkUNIX": false }),
        )
        .unwrap();
        assert!(!activated.unlink_unix);
        // Always written.
        assert_eq!(conn.to_value()["unlinkUNIX"], json!(false));
    }

    #[test]
    fn max_anonymous_clients_defaults_and_is_bounded() {
        let mut srv = server_json();
        remove(&mut srv, "", "max_anonymous_clients");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.max_anonymous_clients, 1024);
        assert_eq!(s.to_value()["max_anonymous_clients"], json!(1024));

        let mut srv = server_json();
        set(&mut srv, "", "max_anonymous_clients", json!(1024));
        assert!(ServerState::from_value(&srv).is_ok());
        set(&mut srv, "", "max_anonymous_clients", json!(1025));
        let e = ServerState::from_value(&srv).unwrap_err();
        assert!(matches!(e, RestartError::Invalid { .. }), "{e}");
        set(&mut srv, "", "max_anonymous_clients", json!("12"));
        let e = ServerState::from_value(&srv).unwrap_err();
        assert_eq!(e.key(), Some("max_anonymous_clients"));
    }

    #[test]
    fn keepalive_interval_unsigned_minus_one() {
        let mut srv = server_json();
        assert_eq!(
            ServerState::from_value(&srv).unwrap().keepalive_interval,
            -1
        );
        set(&mut srv, "", "keepaliveInterval", json!(-1));
        assert_eq!(
            ServerState::from_value(&srv).unwrap().keepalive_interval,
            -1
        );
        set(&mut srv, "", "keepaliveInterval", json!(5));
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.keepalive_interval, 5);
        assert_eq!(s.to_value()["keepaliveInterval"], json!(5));
        set(&mut srv, "", "keepaliveInterval", json!(4294967296u64));
        assert!(ServerState::from_value(&srv).is_err());
        set(&mut srv, "", "keepaliveInterval", json!(1.5));
        assert!(ServerState::from_value(&srv).is_err());

        let mut s = ServerState::from_value(&server_json()).unwrap();
        s.keepalive_interval = -1;
        assert_eq!(s.to_value()["keepaliveInterval"], json!(4294967295u64));
    }

    #[test]
    fn conn_time_optional_and_omitted_when_zero() {
        let mut srv = server_json();
        remove(&mut srv, "/clients/0", "conn_time");
        let s = ServerState::from_value(&srv).unwrap();
        assert_eq!(s.clients[0].conn_time, 0);
        let v = s.clients[0].to_value();
        assert!(v.get("conn_time").is_none());
        let order: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            order,
            [
                "id",
                "auth",
                "auth_pending",
                "readonly",
                "nrequests_max",
                "sock",
                "privateData"
            ]
        );
        let s = ServerState::from_value(&server_json()).unwrap();
        assert_eq!(s.clients[0].to_value()["conn_time"], json!(1717000123));
    }

    #[test]
    fn auth_pending_is_derived_and_checked() {
        let mut c = server_json()["clients"][0].clone();
        remove(&mut c, "", "auth_pending");
        assert!(!ClientState::from_value(&c).unwrap().auth_pending);
        set(&mut c, "", "auth", json!(1));
        assert!(ClientState::from_value(&c).unwrap().auth_pending);
        set(&mut c, "", "auth", json!(0));
        set(&mut c, "", "auth_pending", json!(true));
        let e = ClientState::from_value(&c).unwrap_err();
        assert!(e.to_string().contains("auth_pending"), "{e}");
    }

    #[test]
    fn unknown_keys_from_older_writers_are_ignored() {
        let mut srv = server_json();
        set(&mut srv, "", "keepaliveRequired", json!(false));
        set(&mut srv, "", "mdnsGroupName", json!("x"));
        assert!(ServerState::from_value(&srv).is_ok());
    }

    #[test]
    fn carried_io_round_trips_and_names_its_fds() {
        let mut srv = server_json();
        set(
            &mut srv,
            "/clients/0",
            CARRY_KEY,
            json!({ "fd": 20, "input": 6, "inputFds": [21], "output": 900, "outputFds": [] }),
        );
        let parsed = ServerState::from_value(&srv).unwrap();
        let carry = parsed.clients[0].carry.clone().unwrap();
        assert_eq!(
            carry,
            ClientCarry {
                fd: 20,
                input: 6,
                input_fds: vec![21],
                output: 900,
                output_fds: vec![],
            }
        );
        assert_eq!(parsed.inherited_fds(), vec![3, 11, 20, 21]);
        assert_eq!(ServerState::from_value(&parsed.to_value()).unwrap(), parsed);
        // Absent unless there is something to carry.
        let plain = ServerState::from_value(&server_json()).unwrap();
        assert!(plain.clients[0].carry.is_none());
        assert!(plain.to_value()["clients"][0].get(CARRY_KEY).is_none());
        // Our own key: a malformed one is reported.
        set(&mut srv, "/clients/0", CARRY_KEY, json!({ "fd": 20 }));
        assert!(ServerState::from_value(&srv).is_err());
    }

    // ---- files ------------------------------------------------------------------------

    #[test]
    fn take_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlogd-restart-exec.json");
        assert!(take_state_file(&p, 1).unwrap().is_none());
    }

    #[test]
    fn take_stale_magic_is_none_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("virtlockd-restart-exec.json");
        fs::write(&p, LOCKD_FIXTURE).unwrap();
        assert!(take_state_file(&p, 9999).unwrap().is_none());
        assert!(!p.exists());
    }

    #[test]
    fn take_without_magic_or_bad_json_is_an_error_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::write(&p, r#"{"daemon": {}}"#).unwrap();
        let e = take_state_file(&p, 1).unwrap_err();
        assert!(matches!(e, RestartError::MissingMagic));
        assert!(!p.exists());

        fs::write(&p, "{not json").unwrap();
        assert!(matches!(
            take_state_file(&p, 1),
            Err(RestartError::Parse(_))
        ));
        assert!(!p.exists());

        fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(take_state_file(&p, 1).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn take_enforces_ten_mib_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        // Exactly 10 MiB of valid JSON is accepted.
        let head = r#"{"magic": "77", "pad": ""#;
        let tail = "\"}";
        let pad = STATE_FILE_MAX_LEN as usize - head.len() - tail.len();
        let doc = format!("{head}{}{tail}", "x".repeat(pad));
        assert_eq!(doc.len() as u64, STATE_FILE_MAX_LEN);
        fs::write(&p, &doc).unwrap();
        assert_eq!(
            take_state_file(&p, 77).unwrap().map(|t| t.len()),
            Some(doc.len())
        );
        assert!(!p.exists());

        // One byte more is refused, and the file is still removed.
        let doc = format!("{head}{}{tail}", "x".repeat(pad + 1));
        fs::write(&p, &doc).unwrap();
        let e = take_state_file(&p, 77).unwrap_err();
        assert!(matches!(e, RestartError::TooLarge { .. }), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn write_state_file_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("no-such-dir").join("state.json");
        assert!(write_state_file(&p, "{}").is_err());
    }

    #[test]
    fn magic_is_decimal_pid() {
        assert_eq!(restart_magic(3412), "3412");
    }
}
