//! The filesystem the virtlockd benchmarks keep their lockspaces on.
//!
//! Every acquire+release pair creates and unlinks a lease file (AUTOCREATE), so those
//! figures are as much the filesystem's as the daemon's. A Debian host keeps
//! /var/lib/libvirt on a journaled ext4. This VM's root ext4 has no journal, and a
//! journal-less ext4 checks each free inode it considers for a recent deletion
//! (`recently_deleted` in ext4's inode allocator), a cost that grows with every unlink
//! of the last seconds: with 256 owners either daemon spent half its time there and ran
//! at anything from 5,000 to 17,000 pairs/s from one repetition to the next. So the
//! bench makes a fresh ext4 image with mkfs's defaults (journaled), loop-mounts it and
//! puts every lockspace there; the logs stay in the work directory.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct LockFs {
    root: PathBuf,
    mounted: bool,
    /// What the report says about where the lockspaces are.
    what: String,
}

impl LockFs {
    /// Never fails: without a loop device (or mkfs), the lockspaces stay in `fallback`
    /// and the report says why.
    pub fn setup(work: &Path, fallback: PathBuf) -> LockFs {
        let img = work.join("lockspaces.img");
        let root = work.join("lockspaces");
        match mount_fresh_ext4(&img, &root) {
            Ok(()) => LockFs {
                what: format!(
                    "`{}`: a fresh 1 GiB ext4 (mkfs.ext4 defaults, journaled) on a loop device, image in the work directory",
                    root.display()
                ),
                root,
                mounted: true,
            },
            Err(e) => {
                eprintln!("[vh-bench] lockspaces stay in {}: {e}", fallback.display());
                LockFs {
                    what: format!(
                        "`{}`, the work directory (a fresh ext4 could not be mounted: {e})",
                        fallback.display()
                    ),
                    root: fallback,
                    mounted: false,
                }
            }
        }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn describe(&self) -> &str {
        &self.what
    }
}

impl Drop for LockFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.root).status();
        }
    }
}

/// Unmounts what an earlier, interrupted run may have left at `work`'s lockspace mount,
/// so that the work directory can be removed.
pub fn unmount_stale(work: &Path) {
    let root = work.join("lockspaces");
    if root.exists() {
        let _ = Command::new("umount")
            .arg(&root)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mount_fresh_ext4(img: &Path, root: &Path) -> Result<(), String> {
    let f = std::fs::File::create(img).map_err(|e| format!("{}: {e}", img.display()))?;
    f.set_len(1 << 30)
        .map_err(|e| format!("{}: {e}", img.display()))?;
    drop(f);
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(img))?;
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(img)
        .arg(root))
}
