//! The state file of an attachment: `STATE_DIR/<volume>/attachment`, lines `key=value`
//! (`mode`, `uri`, `read_only` as `0`/`1`, and in mode `kernel` the device's `index` once
//! `CONNECT` has answered).
//!
//! Guarantees: a write is durable and atomic (temp file, `sync_all`, rename, fsync of the
//! directory): a reader sees the old file or the new one, never a mix. State files of
//! earlier versions (no `index`) still read. Assumes the volume's directory exists and the
//! caller holds the volume's lock.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use super::AttachMode;
use crate::host::error::{HostError, Result};

const STATE_FILE: &str = "attachment";

/// What an attachment was asked to be (and, in mode `kernel`, which device it got).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct State {
    pub(super) mode: AttachMode,
    pub(super) uri: String,
    pub(super) read_only: bool,
    /// Mode `kernel`: the device's index (`/dev/nbdN`), once `CONNECT` has answered. A state
    /// file without it is an attach that stopped before (its device, if any, is found by its
    /// backend identifier).
    pub(super) index: Option<u32>,
}

impl State {
    /// Same mode, export and read-only flag: the same attachment asked for again.
    pub(super) fn same_target(&self, other: &State) -> bool {
        (self.mode, &self.uri, self.read_only) == (other.mode, &other.uri, other.read_only)
    }
}

pub(super) fn write_state(dir: &Path, st: &State) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut text = format!(
        "mode={}\nuri={}\nread_only={}\n",
        st.mode,
        st.uri,
        u8::from(st.read_only)
    );
    if let Some(index) = st.index {
        text.push_str(&format!("index={index}\n"));
    }
    let mut f = File::create(&tmp).map_err(|e| HostError::io("create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| HostError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| HostError::io("rename", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| HostError::io("fsync", dir, e))
}

pub(super) fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| HostError::io("read", &path, e))?;
    parse_state(&text).map_err(|why| HostError::BadState { path, why })
}

fn parse_state(text: &str) -> std::result::Result<State, String> {
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .ok_or_else(|| format!("no {k}="))
    };
    Ok(State {
        mode: {
            let m = get("mode")?;
            AttachMode::from_name(m).ok_or_else(|| format!("unknown mode {m:?}"))?
        },
        uri: get("uri")?.to_string(),
        read_only: match get("read_only")? {
            "0" => false,
            "1" => true,
            v => return Err(format!("bad read_only {v:?}")),
        },
        // Absent in state files of the FUSE modes and of earlier versions.
        index: match get("index") {
            Err(_) => None,
            Ok(v) => Some(v.parse().map_err(|_| format!("bad index {v:?}"))?),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let st = State {
            mode: AttachMode::Fuse,
            uri: "nbd://h:1/v".into(),
            read_only: true,
            index: None,
        };
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        let st = State {
            mode: AttachMode::CairnFuse,
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        // Kernel mode, before and after CONNECT answered.
        let st = State {
            mode: AttachMode::Kernel,
            read_only: false,
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), st);
        let st = State {
            index: Some(7),
            ..st
        };
        write_state(dir.path(), &st).unwrap();
        let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert_eq!(text, "mode=kernel\nuri=nbd://h:1/v\nread_only=0\nindex=7\n");
        assert_eq!(read_state(dir.path()).unwrap(), st);
        // A state file of an earlier version (no index) still reads.
        assert_eq!(
            parse_state("mode=fuse\nuri=x\nread_only=0\n")
                .unwrap()
                .index,
            None
        );
        assert!(parse_state("mode=kernel\nuri=x\nread_only=0\nindex=-1\n").is_err());
        assert!(parse_state("mode=fuse\nuri=x\n").is_err());
        assert!(parse_state("mode=tape\nuri=x\nread_only=0\n").is_err());
        // Same target whatever the index.
        let other = State {
            index: None,
            ..st.clone()
        };
        assert!(st.same_target(&other));
        assert!(!st.same_target(&State {
            read_only: true,
            ..other
        }));
    }
}
