//! virtlockd load: registered owners doing ACQUIRE/RELEASE round trips.

use crate::daemon::{Daemon, Res};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};
use vh_common::connection::blocking::{CallError, Client};
use vh_common::xdr::Encoder;
use virtlockd::protocol as kp;

/// Owner PIDs that are not ours: a daemon only kills an owner whose connection's peer
/// PID equals the registered PID, so these never get the bench killed.
const FAKE_PID_BASE: u32 = 3_000_000;

pub fn connect(d: &Daemon) -> Res<Client> {
    let c = Client::connect(&d.socket(), kp::PROGRAM, kp::VERSION)?;
    c.stream().set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(c)
}

pub fn register(c: &mut Client, i: u32) -> Result<(), CallError> {
    let mut uuid = [0u8; 16];
    uuid[..4].copy_from_slice(&(i + 1).to_be_bytes());
    uuid[15] = 0xbe;
    let a = kp::RegisterArgs {
        owner: kp::Owner {
            uuid,
            name: format!("bench{i}"),
            id: 1,
            pid: FAKE_PID_BASE + i,
        },
        flags: 0,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    c.call(kp::proc_::REGISTER, e.as_bytes()).map(|_| ())
}

pub fn create_lockspace(c: &mut Client, dir: &Path) -> Res<()> {
    let mut e = Encoder::new();
    e.string(&dir.to_string_lossy());
    c.call(kp::proc_::CREATE_LOCKSPACE, e.as_bytes())?;
    Ok(())
}

fn resource(proc_: i32, c: &mut Client, dir: &str, name: &str, flags: u32) -> Res<()> {
    let a = kp::ResourceArgs {
        path: dir.to_owned(),
        name: name.to_owned(),
        flags,
    };
    let mut e = Encoder::new();
    a.encode(&mut e);
    c.call(proc_, e.as_bytes())?;
    Ok(())
}

pub fn acquire(c: &mut Client, dir: &str, name: &str) -> Res<()> {
    resource(
        kp::proc_::ACQUIRE_RESOURCE,
        c,
        dir,
        name,
        kp::ACQUIRE_AUTOCREATE,
    )
}

pub fn release(c: &mut Client, dir: &str, name: &str) -> Res<()> {
    resource(kp::proc_::RELEASE_RESOURCE, c, dir, name, 0)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Rtt {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Not in the report; `vh-bench one` prints them to show the shape of the tail.
    #[allow(dead_code)]
    pub p999_us: f64,
    #[allow(dead_code)]
    pub max_us: f64,
    /// Fewest and most round trips one owner completed: how evenly the daemon shares
    /// itself out (a fair server gives every owner the same count).
    pub owner_min: usize,
    pub owner_max: usize,
    pub rss_kib: u64,
}

/// `owners` threads, each its own connection: REGISTER, then ACQUIRE+RELEASE of its own
/// resource in a directory lockspace for `dur`. Latency is that of the pair.
pub fn round_trips(d: &Daemon, dir: &Path, owners: usize, dur: Duration) -> Res<Rtt> {
    crate::logd::fresh_dir(dir)?;
    let mut c0 = connect(d)?;
    create_lockspace(&mut c0, dir)?;
    let dirs = dir.to_string_lossy().into_owned();
    let start = Arc::new(Barrier::new(owners + 1));
    let done = Arc::new(Barrier::new(owners + 1));
    let mut hs = Vec::with_capacity(owners);
    for i in 0..owners {
        let mut c = connect(d)?;
        register(&mut c, i as u32)?;
        let (start, done, dirs) = (start.clone(), done.clone(), dirs.clone());
        hs.push(thread::Builder::new().stack_size(256 * 1024).spawn(
            move || -> Result<Vec<u32>, String> {
                let name = format!("res{i}");
                let mut lat = Vec::with_capacity(4096);
                start.wait();
                let end = Instant::now() + dur;
                let mut err = None;
                while Instant::now() < end {
                    let t = Instant::now();
                    if let Err(e) =
                        acquire(&mut c, &dirs, &name).and_then(|_| release(&mut c, &dirs, &name))
                    {
                        err = Some(e.to_string());
                        break;
                    }
                    lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
                // Keep the connection open until everyone has stopped (RSS below).
                done.wait();
                drop(c);
                match err {
                    Some(e) => Err(e),
                    None => Ok(lat),
                }
            },
        )?);
    }
    start.wait();
    let t0 = Instant::now();
    done.wait();
    let secs = t0.elapsed().as_secs_f64();
    let rss = d.rss_kib()?;
    let mut all: Vec<u32> = Vec::new();
    let (mut owner_min, mut owner_max) = (usize::MAX, 0);
    for h in hs {
        let v = h.join().map_err(|_| "owner thread panicked")??;
        owner_min = owner_min.min(v.len());
        owner_max = owner_max.max(v.len());
        all.extend(v);
    }
    if all.is_empty() {
        return Err("no round trips completed".into());
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(Rtt {
        per_sec: all.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: pct(1.0),
        owner_min,
        owner_max,
        rss_kib: rss,
    })
}

/// `n` leases held by `conns` registered connections (returned, so they stay held).
pub fn hold_leases(d: &Daemon, dir: &Path, n: usize, conns: usize) -> Res<Vec<Client>> {
    crate::logd::fresh_dir(dir)?;
    let mut c0 = connect(d)?;
    create_lockspace(&mut c0, dir)?;
    let dirs = dir.to_string_lossy().into_owned();
    let mut v = Vec::with_capacity(conns);
    for k in 0..conns {
        let mut c = connect(d)?;
        register(&mut c, 100_000 + k as u32)?;
        v.push(c);
    }
    for i in 0..n {
        let c = &mut v[i % conns];
        acquire(c, &dirs, &format!("lease{i}"))?;
    }
    Ok(v)
}

pub fn ping(c: &mut Client) -> Res<()> {
    register(c, 999_999)?;
    Ok(())
}
