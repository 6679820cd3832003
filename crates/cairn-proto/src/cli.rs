//! Lowercase names of the proto enums, as the CLI prints and parses them
//! (`healthy`, `best-effort`, `rw`, `backup-target`...).
//!
//! Every enum gets `Display` (`UNSPECIFIED` shows as `unspecified`), `FromStr`
//! (case-insensitive; `unspecified` is refused: it is never a valid choice), an
//! `ALL` list of its specified values and `cli_name()`. For each value `v` of
//! `ALL`, `v.to_string().parse() == Ok(v)`.

use std::fmt;
use std::str::FromStr;

use crate::v1::{
    BackupState, DataLocality, EventType, Kind, NodeState, ReplicaHealth, ReplicaMode, VolumeState,
};
use crate::ValidationError;

macro_rules! cli_names {
    ($ty:ident, $what:literal, $unspecified:ident, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value but `UNSPECIFIED`, in proto order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The lowercase name the CLI prints.
            #[must_use]
            pub fn cli_name(self) -> &'static str {
                match self {
                    $ty::$unspecified => "unspecified",
                    $($ty::$variant => $name,)+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.cli_name())
            }
        }

        impl FromStr for $ty {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, ValidationError> {
                $ty::ALL
                    .iter()
                    .copied()
                    .find(|v| v.cli_name().eq_ignore_ascii_case(s))
                    .ok_or_else(|| ValidationError::UnknownValue {
                        what: $what,
                        given: s.to_owned(),
                        expected: [$($name),+].join(", "),
                    })
            }
        }
    };
}

cli_names!(NodeState, "node state", Unspecified, [Up => "up", Down => "down"]);
cli_names!(VolumeState, "volume state", Unspecified, [
    Creating => "creating",
    Healthy => "healthy",
    Degraded => "degraded",
    Faulted => "faulted",
    Deleting => "deleting",
]);
cli_names!(DataLocality, "data locality", Unspecified, [
    Disabled => "disabled",
    BestEffort => "best-effort",
]);
cli_names!(ReplicaMode, "replica mode", Unspecified, [Rw => "rw", Wo => "wo", Err => "err"]);
cli_names!(ReplicaHealth, "replica health", Unspecified, [
    Healthy => "healthy",
    Rebuilding => "rebuilding",
    Failed => "failed",
    Stale => "stale",
]);
cli_names!(BackupState, "backup state", Unspecified, [
    Pending => "pending",
    InProgress => "in-progress",
    Completed => "completed",
    Failed => "failed",
    Deleting => "deleting",
]);
cli_names!(Kind, "record kind", Unspecified, [
    Node => "node",
    Volume => "volume",
    Replica => "replica",
    Snapshot => "snapshot",
    BackupTarget => "backup-target",
    Backup => "backup",
]);
cli_names!(EventType, "event type", Unspecified, [Put => "put", Delete => "delete"]);

#[cfg(test)]
mod tests {
    use super::*;

    /// For each enum: `ALL` covers every proto value but 0, names are unique,
    /// lowercase, and round-trip.
    fn check<T>(all: &[T], max_proto_value: i32)
    where
        T: Copy
            + fmt::Display
            + FromStr<Err = ValidationError>
            + PartialEq
            + fmt::Debug
            + Into<i32>,
    {
        let values: Vec<i32> = all.iter().map(|v| (*v).into()).collect();
        assert_eq!(values, (1..=max_proto_value).collect::<Vec<_>>());
        let mut names = std::collections::HashSet::new();
        for v in all {
            let name = v.to_string();
            assert_eq!(name, name.to_lowercase());
            assert!(names.insert(name.clone()), "duplicate {name}");
            assert_eq!(name.parse::<T>(), Ok(*v));
            assert_eq!(name.to_uppercase().parse::<T>(), Ok(*v));
        }
        assert!("unspecified".parse::<T>().is_err());
        assert!("".parse::<T>().is_err());
    }

    #[test]
    fn all_enums_round_trip() {
        check(NodeState::ALL, 2);
        check(VolumeState::ALL, 5);
        check(DataLocality::ALL, 2);
        check(ReplicaMode::ALL, 3);
        check(ReplicaHealth::ALL, 4);
        check(BackupState::ALL, 5);
        check(Kind::ALL, 6);
        check(EventType::ALL, 2);
    }

    #[test]
    fn all_covers_every_generated_value() {
        // prost's from_i32 replacement: TryFrom<i32>. One past the last is unknown.
        assert!(VolumeState::try_from(6).is_err());
        assert!(NodeState::try_from(3).is_err());
        assert!(DataLocality::try_from(3).is_err());
        assert!(ReplicaMode::try_from(4).is_err());
        assert!(ReplicaHealth::try_from(5).is_err());
        assert!(BackupState::try_from(6).is_err());
        assert!(Kind::try_from(7).is_err());
        assert!(EventType::try_from(3).is_err());
    }

    #[test]
    fn display_and_errors() {
        assert_eq!(VolumeState::Unspecified.to_string(), "unspecified");
        assert_eq!(DataLocality::BestEffort.to_string(), "best-effort");
        assert_eq!(format!("{:>8}|", ReplicaMode::Rw), "      rw|");
        let e = "sick".parse::<VolumeState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown volume state \"sick\"; expected one of: \
             creating, healthy, degraded, faulted, deleting"
        );
    }
}
