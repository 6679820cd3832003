//! Names the CO gives (CSI `name` fields) to Cairn names, and Cairn objects to CSI ids.
//!
//! A CSI name is any string of up to 128 characters ("pvc-0c5b...", "sanity-Create-6E1A");
//! Cairn volume and snapshot names are DNS-1123 labels of at most 63 characters. A name
//! that is already a valid label is used as it is (Kubernetes' "pvc-UUID" and
//! "snapshot-UUID" are), anything else is mapped to a label plus 8 hex digits of a hash of
//! the original, so two different CSI names never share a Cairn name and the same name
//! always maps to the same one (CreateVolume is idempotent by name).
//!
//! Ids handed to the CO:
//! - a volume id is the Cairn volume name;
//! - a snapshot id is `VOLUME/SNAPSHOT` for a snapshot kept on the replicas, and
//!   `backup:BACKUP` for a backup on a backup target (the Backup record holds its target).

const MAX_LABEL: usize = 63;

/// The Cairn name for the CSI name `csi_name`.
pub fn cairn_name(csi_name: &str) -> String {
    if cairn_proto::validate_name("name", csi_name).is_ok() {
        return csi_name.to_owned();
    }
    let mut label = String::with_capacity(MAX_LABEL);
    for c in csi_name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (label.is_empty() || label.ends_with('-')) {
            continue;
        }
        label.push(c);
        if label.len() >= MAX_LABEL - 9 {
            break;
        }
    }
    let label = label.trim_end_matches('-');
    let hash = crc32fast::hash(csi_name.as_bytes());
    if label.is_empty() {
        format!("v-{hash:08x}")
    } else {
        format!("{label}-{hash:08x}")
    }
}

/// A snapshot id, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotId {
    /// A snapshot on the replicas of `volume`.
    Local { volume: String, name: String },
    /// A backup, by the name of its Backup record.
    Backup { name: String },
}

impl SnapshotId {
    /// Parses an id made by [`SnapshotId::to_id`]; `None` for anything else.
    pub fn parse(id: &str) -> Option<SnapshotId> {
        let valid = |s: &str| cairn_proto::validate_name("name", s).is_ok();
        if let Some(name) = id.strip_prefix("backup:") {
            return valid(name).then(|| SnapshotId::Backup {
                name: name.to_owned(),
            });
        }
        let (volume, name) = id.split_once('/')?;
        (valid(volume) && valid(name)).then(|| SnapshotId::Local {
            volume: volume.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn to_id(&self) -> String {
        match self {
            SnapshotId::Local { volume, name } => format!("{volume}/{name}"),
            SnapshotId::Backup { name } => format!("backup:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kubernetes_names_are_kept() {
        let pvc = "pvc-0c5b1f0e-5d6a-4c1b-9c7e-2f1d3a4b5c6d";
        assert_eq!(cairn_name(pvc), pvc);
        assert_eq!(cairn_name("snapshot-1"), "snapshot-1");
    }

    #[test]
    fn other_names_become_labels_with_a_hash() {
        let n = cairn_name("sanity-Controller Create-6E1A1BB5");
        assert!(n.starts_with("sanity-controller-create-6e1a1bb5-"), "{n}");
        assert_ne!(n, cairn_name("sanity-controller-create-6e1a1bb5"));
        assert_eq!(
            cairn_name("---"),
            format!("v-{:08x}", crc32fast::hash(b"---"))
        );
    }

    #[test]
    fn snapshot_ids_round_trip_and_refuse_garbage() {
        for id in [
            SnapshotId::Local {
                volume: "vol0".into(),
                name: "s1".into(),
            },
            SnapshotId::Backup { name: "b1".into() },
        ] {
            assert_eq!(SnapshotId::parse(&id.to_id()), Some(id));
        }
        for bad in [
            "", "vol0", "vol0/", "/s", "backup:", "a/b/c", "Vol/s", "backup:B",
        ] {
            assert_eq!(SnapshotId::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_name_maps_to_a_valid_stable_label(name in "\\PC{0,128}") {
            let n = cairn_name(&name);
            prop_assert!(cairn_proto::validate_name("name", &n).is_ok(), "{name:?} -> {n:?}");
            prop_assert_eq!(cairn_name(&name), n);
        }
    }
}
