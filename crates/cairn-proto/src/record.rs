//! Kind-generic access to a [`Record`]: its kind, key, version, and the checks
//! meta applies before storing it.

use crate::v1::{record::Record as R, Key, Kind, Record};
use crate::validate::{
    validate_name, validate_node_name, validate_stale_replica_timeout, validate_volume_size,
    ValidationError,
};

/// The kind of `record`, or `None` when its `oneof` is empty.
#[must_use]
pub fn kind_of(record: &Record) -> Option<Kind> {
    Some(match record.record.as_ref()? {
        R::Node(_) => Kind::Node,
        R::Volume(_) => Kind::Volume,
        R::Replica(_) => Kind::Replica,
        R::Snapshot(_) => Kind::Snapshot,
        R::BackupTarget(_) => Kind::BackupTarget,
        R::Backup(_) => Kind::Backup,
    })
}

/// The name of `record`, or `None` when its `oneof` is empty.
#[must_use]
pub fn name_of(record: &Record) -> Option<&str> {
    Some(match record.record.as_ref()? {
        R::Node(r) => &r.name,
        R::Volume(r) => &r.name,
        R::Replica(r) => &r.name,
        R::Snapshot(r) => &r.name,
        R::BackupTarget(r) => &r.name,
        R::Backup(r) => &r.name,
    })
}

/// The version of `record` (0 = not stored yet), or `None` when its `oneof` is
/// empty.
#[must_use]
pub fn version_of(record: &Record) -> Option<u64> {
    Some(match record.record.as_ref()? {
        R::Node(r) => r.version,
        R::Volume(r) => r.version,
        R::Replica(r) => r.version,
        R::Snapshot(r) => r.version,
        R::BackupTarget(r) => r.version,
        R::Backup(r) => r.version,
    })
}

/// `record` with its version set to `version` (meta sets it when storing). An
/// empty record stays empty.
#[must_use]
pub fn with_version(mut record: Record, version: u64) -> Record {
    match record.record.as_mut() {
        None => {}
        Some(R::Node(r)) => r.version = version,
        Some(R::Volume(r)) => r.version = version,
        Some(R::Replica(r)) => r.version = version,
        Some(R::Snapshot(r)) => r.version = version,
        Some(R::BackupTarget(r)) => r.version = version,
        Some(R::Backup(r)) => r.version = version,
    }
    record
}

/// The key (kind and name) of `record`, or `None` when its `oneof` is empty.
#[must_use]
pub fn key_of(record: &Record) -> Option<Key> {
    Some(Key {
        kind: kind_of(record)? as i32,
        name: name_of(record)?.to_owned(),
    })
}

/// Checks what meta checks before storing `record`: a kind is set, its name and
/// the names it refers to are valid (references may be empty only where the
/// proto says "empty = none": `Volume.attached_node`), a volume's size is valid
/// and it asks for at least one replica. Versions are not checked here: what
/// they must be depends on the RPC.
///
/// # Errors
/// The first rule `record` breaks.
pub fn validate_record(record: &Record) -> Result<(), ValidationError> {
    let Some(inner) = record.record.as_ref() else {
        return Err(ValidationError::MissingKind("record"));
    };
    match inner {
        R::Node(n) => validate_node_name("node.name", &n.name),
        R::Volume(v) => {
            validate_name("volume.name", &v.name)?;
            validate_volume_size(v.size_bytes)?;
            if v.replica_count == 0 {
                return Err(ValidationError::ZeroReplicas);
            }
            validate_stale_replica_timeout(v.stale_replica_timeout_seconds)?;
            if !v.attached_node.is_empty() {
                validate_node_name("volume.attached_node", &v.attached_node)?;
            }
            Ok(())
        }
        R::Replica(r) => {
            validate_name("replica.name", &r.name)?;
            validate_name("replica.volume", &r.volume)?;
            validate_node_name("replica.node", &r.node)
        }
        R::Snapshot(s) => {
            validate_name("snapshot.name", &s.name)?;
            validate_name("snapshot.volume", &s.volume)
        }
        R::BackupTarget(t) => validate_name("backup_target.name", &t.name),
        R::Backup(b) => {
            validate_name("backup.name", &b.name)?;
            validate_name("backup.volume", &b.volume)?;
            validate_name("backup.snapshot", &b.snapshot)?;
            // A BackupTarget's name, or the target URL itself.
            if b.target.starts_with("s3://") || b.target.starts_with("file://") {
                if b.target.len() > 1024 {
                    return Err(ValidationError::NameTooLong {
                        field: "backup.target",
                        name: b.target.clone(),
                        len: b.target.len(),
                        max: 1024,
                    });
                }
                Ok(())
            } else {
                validate_name("backup.target", &b.target)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{
        Backup, BackupState, BackupTarget, DataLocality, Disk, Node, NodeState, Replica,
        ReplicaHealth, ReplicaMode, SecretRef, Snapshot, Volume, VolumeState,
    };
    use prost::Message;

    /// One fully populated record of every kind.
    fn samples() -> Vec<Record> {
        let node = Node {
            name: "ip-10-0-0-1.ec2.internal".into(),
            version: 7,
            address: "127.0.0.2:7000".into(),
            zone: "zone-a".into(),
            nbd_address: "127.0.0.2:10809".into(),
            control_address: "127.0.0.2:10810".into(),
            disks: vec![
                Disk {
                    path: "/var/lib/cairn/d0".into(),
                    capacity_bytes: 1 << 40,
                    free_bytes: 1 << 39,
                },
                Disk {
                    path: "/var/lib/cairn/d1".into(),
                    capacity_bytes: 1 << 41,
                    free_bytes: 0,
                },
            ],
            heartbeat_unix_ms: 1_795_000_000_000,
            state: NodeState::Down.into(),
            state_reason: "no heartbeat for 30s".into(),
        };
        let volume = Volume {
            name: "vol0".into(),
            version: 3,
            size_bytes: 1 << 30,
            replica_count: 3,
            state: VolumeState::Degraded.into(),
            state_reason: "2 of 3 replicas: too few nodes".into(),
            epoch: 12,
            attached_node: "node1".into(),
            data_locality: DataLocality::BestEffort.into(),
            stale_replica_timeout_seconds: 3600,
            filling_from: "snapshot vol9/s1".into(),
        };
        let replica = Replica {
            name: "vol0-r1".into(),
            version: 9,
            volume: "vol0".into(),
            node: "node1".into(),
            disk: "/var/lib/cairn/d0".into(),
            mode: ReplicaMode::Wo.into(),
            health: ReplicaHealth::Rebuilding.into(),
            health_reason: "rebuild 42%".into(),
            deleted: true,
        };
        let snapshot = Snapshot {
            name: "snap1".into(),
            version: 1,
            volume: "vol0".into(),
            created_unix_ms: 1_795_000_000_001,
            labels: [
                ("app".to_owned(), "db".to_owned()),
                ("k".to_owned(), String::new()),
            ]
            .into_iter()
            .collect(),
            size_bytes: 4096,
        };
        let target = BackupTarget {
            name: "s3-main".into(),
            version: 2,
            url: "s3://bucket/prefix".into(),
            credentials_secret: Some(SecretRef {
                namespace: "cairn-system".into(),
                name: "s3-creds".into(),
            }),
        };
        let backup = Backup {
            name: "backup-1".into(),
            version: u64::MAX,
            volume: "vol0".into(),
            snapshot: "snap1".into(),
            target: "s3-main".into(),
            state: BackupState::InProgress.into(),
            state_reason: "12 of 512 blocks".into(),
            size_bytes: 2 << 20,
            created_unix_ms: 1_795_000_000_002,
            snapshot_created_unix_ms: 1_795_000_000_001,
        };
        vec![
            Record {
                record: Some(R::Node(node)),
            },
            Record {
                record: Some(R::Volume(volume)),
            },
            Record {
                record: Some(R::Replica(replica)),
            },
            Record {
                record: Some(R::Snapshot(snapshot)),
            },
            Record {
                record: Some(R::BackupTarget(target)),
            },
            Record {
                record: Some(R::Backup(backup)),
            },
        ]
    }

    #[test]
    fn every_record_round_trips_through_prost() {
        for record in samples() {
            let bytes = record.encode_to_vec();
            let back = Record::decode(bytes.as_slice()).unwrap();
            assert_eq!(back, record);
            // Also inside a message that carries it, as Watch does.
            let event = crate::v1::WatchEvent {
                r#type: crate::v1::EventType::Put.into(),
                record: Some(record.clone()),
                revision: 42,
            };
            let back = crate::v1::WatchEvent::decode(event.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn kind_matches_oneof_field_number() {
        // The proto promises: a Record's field number is its Kind.
        let kinds: Vec<_> = samples().iter().map(|r| kind_of(r).unwrap()).collect();
        assert_eq!(
            kinds,
            [
                Kind::Node,
                Kind::Volume,
                Kind::Replica,
                Kind::Snapshot,
                Kind::BackupTarget,
                Kind::Backup
            ]
        );
        for (record, kind) in samples().iter().zip(kinds) {
            let bytes = record.encode_to_vec();
            // First byte is the tag: field number << 3 | wire type 2.
            assert_eq!(i32::from(bytes[0] >> 3), kind as i32);
        }
        assert_eq!(kind_of(&Record::default()), None);
    }

    #[test]
    fn name_version_key() {
        let names: Vec<_> = samples()
            .iter()
            .map(|r| name_of(r).unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ip-10-0-0-1.ec2.internal",
                "vol0",
                "vol0-r1",
                "snap1",
                "s3-main",
                "backup-1"
            ]
        );
        for record in samples() {
            let key = key_of(&record).unwrap();
            assert_eq!(key.kind, kind_of(&record).unwrap() as i32);
            let bumped = with_version(record, 100);
            assert_eq!(version_of(&bumped), Some(100));
        }
        let empty = Record::default();
        assert_eq!(
            (name_of(&empty), version_of(&empty), key_of(&empty)),
            (None, None, None)
        );
        assert_eq!(with_version(Record::default(), 5), Record::default());
    }

    #[test]
    fn validation_of_records() {
        for record in samples() {
            validate_record(&record).unwrap();
        }
        assert_eq!(
            validate_record(&Record::default()),
            Err(ValidationError::MissingKind("record"))
        );
        let volume = |f: &dyn Fn(&mut Volume)| {
            let mut r = samples().swap_remove(1);
            let Some(R::Volume(v)) = r.record.as_mut() else {
                unreachable!()
            };
            f(v);
            validate_record(&r)
        };
        assert_eq!(
            volume(&|v| v.replica_count = 0),
            Err(ValidationError::ZeroReplicas)
        );
        assert_eq!(
            volume(&|v| v.size_bytes = 1000),
            Err(ValidationError::UnalignedSize { size: 1000 })
        );
        assert_eq!(volume(&|v| v.attached_node = String::new()), Ok(()));
        assert!(volume(&|v| v.attached_node = "Node1".into()).is_err());
        assert!(volume(&|v| v.name = "vol_0".into()).is_err());
        assert_eq!(volume(&|v| v.stale_replica_timeout_seconds = 0), Ok(()));
        assert_eq!(
            volume(&|v| v.stale_replica_timeout_seconds = crate::MAX_STALE_REPLICA_TIMEOUT_SECS + 1),
            Err(ValidationError::StaleReplicaTimeoutTooLong {
                seconds: crate::MAX_STALE_REPLICA_TIMEOUT_SECS + 1
            })
        );

        let mut backup = samples().swap_remove(5);
        let Some(R::Backup(b)) = backup.record.as_mut() else {
            unreachable!()
        };
        b.snapshot = String::new();
        assert_eq!(
            validate_record(&backup),
            Err(ValidationError::EmptyName {
                field: "backup.snapshot"
            })
        );
        let with_target = |t: String| {
            let mut rec = samples().swap_remove(5);
            if let Some(R::Backup(b)) = rec.record.as_mut() {
                b.target = t;
            }
            validate_record(&rec)
        };
        assert_eq!(with_target("s3://bucket/prefix".into()), Ok(()), "a URL");
        assert_eq!(with_target("file:///srv/backups".into()), Ok(()), "a URL");
        assert!(
            with_target("http://elsewhere".into()).is_err(),
            "s3 and file only"
        );
        let long = format!("file:///{}", "d".repeat(1100));
        assert!(with_target(long).is_err(), "a URL over 1024 bytes");
        let mut replica = samples().swap_remove(2);
        let Some(R::Replica(r)) = replica.record.as_mut() else {
            unreachable!()
        };
        r.node = "a..b".into();
        assert!(validate_record(&replica)
            .unwrap_err()
            .to_string()
            .starts_with("replica.node:"));
    }
}
