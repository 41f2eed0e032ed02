//! The keeper's ordering against a stand-in notify socket (its own process: the keeper's
//! hooks are process-wide).

// In a cfg(test) module, where the workspace allows unwrap (a panic is the report).
#[cfg(test)]
mod keeper_order {
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use vh_common::fdstore::{parse_snapshot, FdStore};
    use vh_common::fdstore_keeper::{self as keeper, FdKind, Keeper};

    /// The messages the store received so far: (text, number of fds).
    fn drain(rx: &UnixDatagram) -> Vec<(String, usize)> {
        rx.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        while let Ok((text, fds)) = vh_testkit::recv_notify(rx) {
            out.push((text, fds.len()));
        }
        out
    }

    fn name_of(msg: &str) -> &str {
        msg.lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("")
    }

    fn table(k: &Keeper) -> std::collections::HashMap<String, RawFd> {
        parse_snapshot(&k.latest().unwrap().1).unwrap().0
    }

    #[test]
    fn stored_before_named_removed_after_dropped_and_reused_numbers_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let k = Keeper::start(FdStore::at(path.as_os_str()), None).unwrap();
        let slots = drain(&rx);
        assert_eq!(slots.len(), 2, "{slots:?}");
        assert!(slots.iter().all(|(m, n)| m.contains("FDPOLL=0") && *n == 1));
        assert!(keeper::active());

        // Nothing is written before `go`.
        let (a, _aw) = nix::unistd::pipe().unwrap();
        assert_eq!(
            k.write(&[(a.as_raw_fd(), FdKind::Log)], "early").unwrap(),
            0
        );
        assert!(k.latest().is_none());
        k.go();
        assert!(k.due());

        let (b, _bw) = nix::unistd::pipe().unwrap();
        let fds = [(a.as_raw_fd(), FdKind::Log), (b.as_raw_fd(), FdKind::Lease)];
        assert_eq!(k.write(&fds, "doc1").unwrap(), 2);
        let m = drain(&rx);
        assert_eq!(m.len(), 2, "one FDSTORE per new fd: {m:?}");
        let (a_name, b_name) = (name_of(&m[0].0).to_string(), name_of(&m[1].0).to_string());
        assert!(a_name.starts_with("vh-log-") && b_name.starts_with("vh-lease-"));
        assert_eq!(table(&k)[&b_name], b.as_raw_fd());
        assert!(!k.due(), "written");

        // Nothing changed: the same fds are not stored again.
        keeper::touch();
        assert!(k.due());
        assert_eq!(k.write(&fds, "doc1 again").unwrap(), 0);
        assert!(drain(&rx).is_empty());

        // The lease is closed and its number reused by another lease (same kind): only
        // `closing` tells them apart. The new one is stored under a new name, the old name
        // removed after the snapshot without it.
        let b_num = b.as_raw_fd();
        keeper::closing(b_num);
        drop(b);
        let (c, _cw) = nix::unistd::pipe().unwrap();
        let c = if c.as_raw_fd() == b_num {
            c
        } else {
            nix::unistd::dup2(c.as_raw_fd(), b_num).unwrap();
            // SAFETY: dup2 just opened b_num; nothing else owns it.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(b_num) }
        };
        assert_eq!(c.as_raw_fd(), b_num);
        let fds = [(a.as_raw_fd(), FdKind::Log), (c.as_raw_fd(), FdKind::Lease)];
        assert_eq!(k.write(&fds, "doc2").unwrap(), 1);
        let m = drain(&rx);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].0.starts_with("FDSTORE=1") && m[0].1 == 1);
        let c_name = name_of(&m[0].0).to_string();
        assert_ne!(c_name, b_name);
        assert_eq!(m[1].0, format!("FDSTOREREMOVE=1\nFDNAME={b_name}"));
        let t = table(&k);
        assert_eq!(t[&c_name], b_num);
        assert!(!t.contains_key(&b_name));

        // A log gone from the document: removed after the snapshot without it.
        keeper::touch();
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "doc3").unwrap(),
            0
        );
        let m = drain(&rx);
        assert_eq!(m, vec![(format!("FDSTOREREMOVE=1\nFDNAME={a_name}"), 0)]);
        assert_eq!(parse_snapshot(&k.latest().unwrap().1).unwrap().1, "doc3");
        assert_eq!(k.stats().stored, 3, "c and two slots");

        // Before a re-exec: everything out of the store, nothing stored after.
        k.clear();
        let m = drain(&rx);
        let removed: Vec<&str> = m.iter().map(|(t, _)| name_of(t)).collect();
        assert_eq!(removed.len(), 3, "{m:?}");
        assert!(removed.contains(&c_name.as_str()));
        assert!(removed.contains(&"vh-state-a") && removed.contains(&"vh-state-b"));
        assert!(!keeper::active());
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "frozen")
                .unwrap(),
            0
        );
        assert!(drain(&rx).is_empty());
        // A failed exec: slots stored again, then everything with the next snapshot.
        k.resume_after_failed_exec();
        assert_eq!(drain(&rx).len(), 2);
        assert_eq!(
            k.write(&[(c.as_raw_fd(), FdKind::Lease)], "doc4").unwrap(),
            1
        );
    }
}
