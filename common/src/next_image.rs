//! Which program a re-exec will run, found before the hand-off starts.
//!
//! A re-exec runs `argv[0]` again (a PATH search when it has no slash, as libvirt's
//! `execvp`). That file may be ours or libvirt's C daemon (an upgrade or a downgrade
//! between the two replaces it), and some hand-offs are only safe into ours: an fd the
//! next image does not know about stays open in it forever. So the file is resolved as
//! `execvp` would, opened, and checked for a marker section that only an image which
//! takes such a hand-off carries; the exec then runs exactly that open file
//! (`execveat(fd, "", …, AT_EMPTY_PATH)`), so a package upgrade that replaces the path
//! between the check and the exec cannot swap in an image that did not pass it.
//! Anything else (no marker, not ELF, a script, any failure) is "not ours", and the
//! exec is the plain `execvp` of before.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A marker: the name of an ELF section and the exact bytes it holds.
#[derive(Debug, Clone, Copy)]
pub struct Marker {
    pub section: &'static str,
    pub contents: &'static [u8],
}

/// The next image, opened, when it carries the marker.
#[derive(Debug)]
pub struct NextImage {
    file: File,
}

impl NextImage {
    /// Resolves `argv0` as `execvp` does and opens it if it carries `marker`. `None`
    /// for anything else, a failure included: the caller then hands off as to a
    /// stranger.
    pub fn probe(argv0: &OsStr, marker: Marker) -> Option<NextImage> {
        Self::probe_in(argv0, std::env::var_os("PATH").as_deref(), marker)
    }

    /// [`Self::probe`] with the search path given (`None`: PATH unset).
    fn probe_in(argv0: &OsStr, path: Option<&OsStr>, marker: Marker) -> Option<NextImage> {
        let file = resolve(argv0, path)?;
        has_marker(&file, marker).then_some(NextImage { file })
    }

    /// Runs this very file with `argv` and the current environment. Returns only on
    /// failure.
    pub fn exec(&self, argv: &[CString]) -> io::Error {
        let env: Result<Vec<CString>, _> = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv)
            })
            .collect();
        let Ok(env) = env else {
            return io::Error::from_raw_os_error(libc::EINVAL);
        };
        match nix::unistd::execveat(
            Some(self.file.as_raw_fd()),
            c"",
            argv,
            &env,
            nix::fcntl::AtFlags::AT_EMPTY_PATH,
        ) {
            Ok(never) => match never {},
            Err(e) => e.into(),
        }
    }
}

/// The file `execvp(argv0)` would run, opened close-on-exec (the exec through the fd
/// works all the same for an ELF file; a script is never ours).
fn resolve(argv0: &OsStr, path: Option<&OsStr>) -> Option<File> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
            .filter(|_| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok())
    };
    if argv0.is_empty() {
        return None;
    }
    if argv0.as_bytes().contains(&b'/') {
        return open(Path::new(argv0));
    }
    // glibc's default search path when PATH is unset.
    let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
    path.as_bytes().split(|&b| b == b':').find_map(|dir| {
        // An empty entry is the current directory.
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        open(&PathBuf::from(OsStr::from_bytes(dir)).join(argv0))
    })
}

/// Whether `file` is an ELF file with a section named `marker.section` holding exactly
/// `marker.contents`. Only the file header, the section header table and the section
/// names are read (not the symbol tables of a 12 MB binary: this runs in the re-exec's
/// pause).
fn has_marker(file: &File, marker: Marker) -> bool {
    use object::read::elf::{FileHeader, SectionHeader};
    let data = object::ReadCache::new(file);
    let found = || -> object::Result<bool> {
        let header = object::elf::FileHeader64::<object::Endianness>::parse(&data)?;
        let endian = header.endian()?;
        let sections = header.sections(endian, &data)?;
        // The names' table in one read: a lookup by name would read each name apart.
        let names_at = object::SectionIndex(header.shstrndx(endian, &data)? as usize);
        let names = sections.section(names_at)?.data(endian, &data)?;
        let wanted = marker.section.as_bytes();
        for section in sections.iter() {
            let name = names
                .get(section.sh_name(endian) as usize..)
                .unwrap_or_default();
            if name
                .strip_prefix(wanted)
                .is_some_and(|rest| rest.first() == Some(&0))
            {
                return Ok(section.data(endian, &data)? == marker.contents);
            }
        }
        Ok(false)
    };
    // Not ELF, not 64-bit, a truncated or odd table: not ours.
    found().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// This test binary carries its own marker, as the daemons do.
    #[used]
    #[link_section = ".vh_test_marker"]
    static TEST_MARKER: [u8; 16] = *b"vh-test-marker-1";

    const MARKER: Marker = Marker {
        section: ".vh_test_marker",
        contents: &TEST_MARKER,
    };

    fn own_exe() -> OsString {
        // Kept by the reference: the linker may otherwise drop an unreferenced section.
        std::hint::black_box(&TEST_MARKER);
        std::env::current_exe().unwrap().into_os_string()
    }

    #[test]
    fn an_image_with_the_marker_is_ours() {
        assert!(NextImage::probe(&own_exe(), MARKER).is_some());
    }

    #[test]
    fn other_contents_or_another_section_are_not_ours() {
        let other = Marker {
            section: ".vh_test_marker",
            contents: b"vh-test-marker-2",
        };
        assert!(NextImage::probe(&own_exe(), other).is_none());
        let prefix = Marker {
            section: ".vh_test",
            contents: &TEST_MARKER,
        };
        assert!(NextImage::probe(&own_exe(), prefix).is_none());
    }

    #[test]
    fn a_binary_without_it_or_a_script_is_not_ours() {
        assert!(NextImage::probe(OsStr::new("/bin/sh"), MARKER).is_none());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(NextImage::probe(script.as_os_str(), MARKER).is_none());
        assert!(NextImage::probe(OsStr::new("no-such-program-h19"), MARKER).is_none());
    }

    #[test]
    fn a_bare_name_is_searched_in_path() {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().as_os_str().to_owned();
        let name = exe.file_name().unwrap().to_owned();
        let mut path = OsString::from("/nonexistent-h19::");
        path.push(&dir);
        std::hint::black_box(&TEST_MARKER);
        assert!(NextImage::probe_in(&name, Some(&path), MARKER).is_some());
        assert!(NextImage::probe_in(&name, Some(OsStr::new("/nonexistent-h19")), MARKER).is_none());
    }
}
