//! `/proc/self/mountinfo`: which paths are mount points, and of what.
//!
//! Parsing is pure ([`parse`]); paths are unescaped (the kernel writes space, tab, newline
//! and backslash as `\040`, `\011`, `\012`, `\134`) and kept as raw bytes, so any path
//! round-trips. Reading the table never touches the mount points themselves, so a dead FUSE
//! mount (ENOTCONN) is still seen as a mount point.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::error::{HostError, Result};

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u64,
    /// Id of the parent mount.
    pub parent_id: u64,
    /// Device number of the mounted filesystem (`st_dev` of files in it).
    pub major: u32,
    /// Minor half of the device number.
    pub minor: u32,
    /// The directory (or file) of the filesystem that is the root of this mount; not `/` for
    /// bind mounts of a subtree, `/loop0` for a bind of `/dev/loop0`.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`...).
    pub mount_options: String,
    /// Filesystem type (`ext4`, `fuse`, `devtmpfs`...).
    pub fs_type: String,
    /// Mount source (`/dev/loop0`, `nbdfuse`...).
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// Whether the mount is read-only (the per-mount `ro` flag).
    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// Parses a whole mountinfo table. Malformed lines are an error, not skipped: a table we
/// cannot read must not make a mounted path look unmounted. Bytes, not text: paths need not
/// be UTF-8.
pub fn parse(text: &[u8]) -> std::result::Result<Vec<MountEntry>, String> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(parse_line)
        .collect()
}

fn parse_line(line: &[u8]) -> std::result::Result<MountEntry, String> {
    let bad = |what: &str| {
        format!(
            "malformed mountinfo line ({what}): {:?}",
            String::from_utf8_lossy(line)
        )
    };
    let mut fields = line.split(|&b| b == b' ');
    let mut next = |what: &str| fields.next().ok_or_else(|| bad(what));
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    let num = |f: &[u8], what: &str| text(f).parse::<u64>().map_err(|_| bad(what));
    let mount_id = num(next("mount id")?, "mount id")?;
    let parent_id = num(next("parent id")?, "parent id")?;
    let dev = text(next("major:minor")?);
    let (major, minor) = dev.split_once(':').ok_or_else(|| bad("major:minor"))?;
    let major = major.parse().map_err(|_| bad("major"))?;
    let minor = minor.parse().map_err(|_| bad("minor"))?;
    let root = unescape(next("root")?);
    let mount_point = unescape(next("mount point")?);
    let mount_options = text(next("mount options")?);
    // Optional fields up to the "-" separator.
    while next("separator")? != b"-" {}
    let fs_type = text(next("fs type")?);
    let source = text(unescape(next("source")?).as_os_str().as_encoded_bytes());
    let super_options = text(next("super options").unwrap_or_default());
    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

/// Undoes the kernel's octal escapes (`\040` -> space). A backslash not followed by three
/// octal digits is kept as is.
pub fn unescape(b: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && is_octal_triplet(&b[i + 1..i + 4]) {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            // Three octal digits can exceed a byte (\777); the kernel never writes those.
            match u8::try_from(v) {
                Ok(byte) => {
                    out.push(byte);
                    i += 4;
                    continue;
                }
                Err(_) => out.push(b[i]),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

fn is_octal_triplet(s: &[u8]) -> bool {
    s.len() == 3 && s.iter().all(|c| (b'0'..=b'7').contains(c))
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read() -> Result<Vec<MountEntry>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read(path).map_err(|e| HostError::io("read", path, e))?;
    parse(&text).map_err(|why| HostError::BadState {
        path: path.into(),
        why,
    })
}

/// The path as mountinfo would show it: absolute, symlinks resolved when it can be resolved.
/// A path that cannot be resolved (missing, or a dead FUSE mount answering ENOTCONN) is
/// resolved through its parent, then taken as given.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    if let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
        if let Ok(p) = std::fs::canonicalize(parent) {
            return p.join(name);
        }
    }
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// The topmost mount at `path` (the last matching line: later mounts stack over earlier ones).
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let want = normalize(path);
    Ok(read()?.into_iter().rev().find(|e| e.mount_point == want))
}

/// Whether `path` is a mount point, according to mountinfo.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some())
}

/// The mount points of the block device `major:minor`.
pub fn mount_points_of(major: u32, minor: u32) -> Result<Vec<PathBuf>> {
    Ok(read()?
        .into_iter()
        .filter(|e| e.major == major && e.minor == minor)
        .map(|e| e.mount_point)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue
40 22 0:5 /loop0 /var/lib/kubelet/pods/x/vol\\134dev rw,nosuid - devtmpfs udev rw,size=10k
41 22 7:0 / /tmp/a\\011b ro,relatime - ext4 /dev/loop0 ro
";

    #[test]
    fn parses_fields_and_optional_tags() {
        let v = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].mount_id, 36);
        assert_eq!(v[1].parent_id, 22);
        assert_eq!((v[1].major, v[1].minor), (98, 0));
        assert_eq!(v[1].root, Path::new("/mnt1"));
        assert_eq!(v[1].mount_point, Path::new("/mnt two"));
        assert_eq!(v[1].fs_type, "ext3");
        assert_eq!(v[1].source, "/dev/root");
        assert_eq!(v[1].super_options, "rw,errors=continue");
        assert_eq!(
            v[2].mount_point,
            Path::new("/var/lib/kubelet/pods/x/vol\\dev")
        );
        assert_eq!(v[2].root, Path::new("/loop0"));
        assert_eq!(v[3].mount_point, Path::new("/tmp/a\tb"));
        assert!(v[3].is_read_only());
        assert!(!v[0].is_read_only());
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse(b"22 1 8:1 / / rw\n").is_err());
        assert!(parse(b"x 1 8:1 / / rw - ext4 /dev/sda rw\n").is_err());
        assert!(parse(b"22 1 81 / / rw - ext4 /dev/sda rw\n").is_err());
    }

    #[test]
    fn unescape_keeps_stray_backslashes() {
        assert_eq!(unescape(b"a\\b"), Path::new("a\\b"));
        assert_eq!(unescape(b"a\\04"), Path::new("a\\04"));
        assert_eq!(unescape(b"a\\777"), Path::new("a\\777"));
        assert_eq!(unescape(b"\\040\\012"), Path::new(" \n"));
    }

    proptest::proptest! {
        #[test]
        fn unescape_inverts_kernel_escaping(bytes in proptest::collection::vec(1u8..=255, 0..64)) {
            // What the kernel does (fs/proc_namespace.c: mangle with " \t\n\\"); other
            // bytes, non-UTF-8 ones included, are written raw.
            let mut escaped = Vec::new();
            for &b in &bytes {
                if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
                    escaped.extend_from_slice(format!("\\{b:03o}").as_bytes());
                } else {
                    escaped.push(b);
                }
            }
            let back = unescape(&escaped);
            proptest::prop_assert_eq!(back.as_os_str().as_encoded_bytes(), &bytes[..]);
        }
    }
}
