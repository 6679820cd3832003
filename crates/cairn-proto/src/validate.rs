//! Validation of names and sizes, shared by meta (which refuses bad records with
//! INVALID_ARGUMENT) and the CLI (which refuses them before any RPC).
//!
//! Names of volumes, replicas, snapshots, backup targets and backups are
//! DNS-1123 labels, as Kubernetes PV names and CSI volume names like
//! `pvc-<uuid>` are: 1 to 63 characters of `[a-z0-9-]`, starting and ending with
//! a letter or digit. Node names are DNS-1123 subdomains (labels joined by
//! dots, at most 253 characters) because agents take Kubernetes node names such
//! as `ip-10-0-0-1.ec2.internal`.

use thiserror::Error;

/// Longest name of every kind but Node (a DNS-1123 label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest Node name (a DNS-1123 subdomain).
pub const MAX_NODE_NAME_LEN: usize = 253;
/// Volume sizes are multiples of this block size.
pub const VOLUME_SIZE_ALIGN: u64 = 4096;
/// Largest volume: `4096 * u32::MAX` bytes, so block numbers fit in a `u32`.
pub const MAX_VOLUME_SIZE: u64 = VOLUME_SIZE_ALIGN * u32::MAX as u64;
/// Longest per-volume stale replica timeout (`Volume.stale_replica_timeout_seconds`): one
/// year. A longer wait is no wait at all for a replica on a dead node, and the bound keeps
/// the controller's arithmetic in milliseconds far from overflow.
pub const MAX_STALE_REPLICA_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// Why a request or record is invalid. Meta maps every variant to
/// `INVALID_ARGUMENT` (see the `From` impl for [`tonic::Status`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// A name field is empty.
    #[error("{field}: name is empty")]
    EmptyName {
        /// The field holding the name, e.g. `volume.name`.
        field: &'static str,
    },
    /// A name is longer than allowed.
    #[error("{field}: name {name:?} is {len} characters long, at most {max} are allowed")]
    NameTooLong {
        /// The field holding the name.
        field: &'static str,
        /// The name as given.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A name holds a character outside its alphabet.
    #[error(
        "{field}: name {name:?} has {ch:?} at position {index}; \
         use lowercase letters, digits and '-'{dots}"
    )]
    NameBadChar {
        /// The field holding the name.
        field: &'static str,
        /// The name as given.
        name: String,
        /// The offending character.
        ch: char,
        /// Its byte offset in `name`.
        index: usize,
        /// `" and '.'"` for node names, empty otherwise.
        dots: &'static str,
    },
    /// A name (or one dot-separated part of a node name) starts or ends with
    /// `-`, or a node name has an empty part.
    #[error("{field}: name {name:?} must start and end with a lowercase letter or digit{parts}")]
    NameBadEdge {
        /// The field holding the name.
        field: &'static str,
        /// The name as given.
        name: String,
        /// `" (each '.'-separated part too)"` for node names, empty otherwise.
        parts: &'static str,
    },
    /// A volume size of 0.
    #[error("volume size is 0; give a size of at least 4096 bytes")]
    ZeroSize,
    /// A volume size that is not a multiple of 4096.
    #[error("volume size {size} is not a multiple of 4096 bytes")]
    UnalignedSize {
        /// The size as given.
        size: u64,
    },
    /// A volume size above [`MAX_VOLUME_SIZE`].
    #[error(
        "volume size {size} exceeds the largest volume, {MAX_VOLUME_SIZE} bytes (16 TiB - 4 KiB)"
    )]
    SizeTooLarge {
        /// The size as given.
        size: u64,
    },
    /// A volume asking for no replicas.
    #[error("volume replica count is 0; a volume needs at least 1 replica")]
    ZeroReplicas,
    /// A stale replica timeout above [`MAX_STALE_REPLICA_TIMEOUT_SECS`].
    #[error(
        "stale replica timeout {seconds}s exceeds the longest, \
         {MAX_STALE_REPLICA_TIMEOUT_SECS}s (365 days); 0 means the cluster default"
    )]
    StaleReplicaTimeoutTooLong {
        /// The timeout as given, in seconds.
        seconds: u64,
    },
    /// A `Record` with no kind set, or `KIND_UNSPECIFIED` where a kind is needed.
    #[error("{0}: no record kind given")]
    MissingKind(&'static str),
    /// A string that names no value of a CLI enum.
    #[error("unknown {what} {given:?}; expected one of: {expected}")]
    UnknownValue {
        /// What was being parsed, e.g. `volume state`.
        what: &'static str,
        /// The string as given.
        given: String,
        /// The accepted values, comma-separated.
        expected: String,
    },
}

impl From<ValidationError> for tonic::Status {
    fn from(e: ValidationError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Checks a DNS-1123 label (every kind's name but Node's): 1 to 63 characters
/// of `[a-z0-9-]`, first and last a letter or digit. `field` names the field in
/// the error, e.g. `"volume.name"`.
///
/// # Errors
/// The first rule `name` breaks.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    check_len(field, name, MAX_NAME_LEN)?;
    check_label(field, name, name, 0, "", "")
}

/// Checks a DNS-1123 subdomain (a Node name): at most 253 characters, one or
/// more labels of `[a-z0-9-]` joined by `.`, each starting and ending with a
/// letter or digit.
///
/// # Errors
/// The first rule `name` breaks.
pub fn validate_node_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    const DOTS: &str = " and '.'";
    const PARTS: &str = " (each '.'-separated part too)";
    check_len(field, name, MAX_NODE_NAME_LEN)?;
    let mut offset = 0;
    for part in name.split('.') {
        check_label(field, name, part, offset, DOTS, PARTS)?;
        offset += part.len() + 1;
    }
    Ok(())
}

/// Checks a volume size: non-zero, a multiple of 4096, at most
/// [`MAX_VOLUME_SIZE`].
///
/// # Errors
/// [`ValidationError::ZeroSize`], [`ValidationError::UnalignedSize`] or
/// [`ValidationError::SizeTooLarge`].
pub fn validate_volume_size(size: u64) -> Result<(), ValidationError> {
    if size == 0 {
        Err(ValidationError::ZeroSize)
    } else if size % VOLUME_SIZE_ALIGN != 0 {
        Err(ValidationError::UnalignedSize { size })
    } else if size > MAX_VOLUME_SIZE {
        Err(ValidationError::SizeTooLarge { size })
    } else {
        Ok(())
    }
}

/// Checks a volume's stale replica timeout in seconds: 0 (the cluster default) or at most
/// [`MAX_STALE_REPLICA_TIMEOUT_SECS`].
///
/// # Errors
/// [`ValidationError::StaleReplicaTimeoutTooLong`].
pub fn validate_stale_replica_timeout(seconds: u64) -> Result<(), ValidationError> {
    if seconds > MAX_STALE_REPLICA_TIMEOUT_SECS {
        Err(ValidationError::StaleReplicaTimeoutTooLong { seconds })
    } else {
        Ok(())
    }
}

fn check_len(field: &'static str, name: &str, max: usize) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::EmptyName { field });
    }
    if name.len() > max {
        return Err(ValidationError::NameTooLong {
            field,
            name: name.to_owned(),
            len: name.len(),
            max,
        });
    }
    Ok(())
}

/// Checks one label `part` of `name`, found at byte `offset` of `name`.
fn check_label(
    field: &'static str,
    name: &str,
    part: &str,
    offset: usize,
    dots: &'static str,
    parts: &'static str,
) -> Result<(), ValidationError> {
    if let Some((index, ch)) = part
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Err(ValidationError::NameBadChar {
            field,
            name: name.to_owned(),
            ch,
            index: offset + index,
            dots,
        });
    }
    if part.is_empty() || part.starts_with('-') || part.ends_with('-') {
        return Err(ValidationError::NameBadEdge {
            field,
            name: name.to_owned(),
            parts,
        });
    }
    // A node label is at most 63 characters too.
    if part.len() > MAX_NAME_LEN {
        return Err(ValidationError::NameTooLong {
            field,
            name: name.to_owned(),
            len: part.len(),
            max: MAX_NAME_LEN,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn name_table() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        let table: &[(&str, bool)] = &[
            ("a", true),
            ("0", true),
            ("vol0", true),
            ("pvc-0b5e4c1a-2f0d-4f8e-9a57-3c1b2d4e5f60", true),
            ("a-b", true),
            ("a--b", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("-a", false),
            ("a-", false),
            ("-", false),
            ("Vol0", false),
            ("vol_0", false),
            ("vol.0", false),
            ("vol 0", false),
            ("vól", false),
            ("a/b", false),
        ];
        for (name, ok) in table {
            assert_eq!(validate_name("t", name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn node_name_table() {
        let label = "a".repeat(63);
        let long_label = "a".repeat(64);
        let max = format!("{label}.{label}.{label}.{}", "a".repeat(61));
        assert_eq!(max.len(), 253);
        let too_long = format!("{max}a");
        let table: &[(&str, bool)] = &[
            ("node1", true),
            ("ip-10-0-0-1.ec2.internal", true),
            ("a.b", true),
            (&max, true),
            ("", false),
            (&too_long, false),
            (&long_label, false),
            (".a", false),
            ("a.", false),
            ("a..b", false),
            ("a.-b", false),
            ("a-.b", false),
            ("Node1", false),
            ("node_1", false),
        ];
        for (name, ok) in table {
            assert_eq!(validate_node_name("t", name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn errors_read_clearly() {
        let e = validate_name("volume.name", "Vol0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "volume.name: name \"Vol0\" has 'V' at position 0; \
             use lowercase letters, digits and '-'"
        );
        let e = validate_name("volume.name", "").unwrap_err();
        assert_eq!(e.to_string(), "volume.name: name is empty");
        let e = validate_node_name("node.name", "a.B").unwrap_err();
        assert!(e.to_string().contains("'B' at position 2"), "{e}");
        let e = validate_name("volume.name", "a-").unwrap_err();
        assert!(e.to_string().contains("must start and end"), "{e}");
        let status = tonic::Status::from(ValidationError::ZeroSize);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn sizes() {
        assert_eq!(validate_volume_size(0), Err(ValidationError::ZeroSize));
        assert_eq!(
            validate_volume_size(4095),
            Err(ValidationError::UnalignedSize { size: 4095 })
        );
        assert_eq!(
            validate_volume_size(4097),
            Err(ValidationError::UnalignedSize { size: 4097 })
        );
        assert_eq!(validate_volume_size(4096), Ok(()));
        assert_eq!(validate_volume_size(1 << 30), Ok(()));
        assert_eq!(validate_volume_size(MAX_VOLUME_SIZE), Ok(()));
        assert_eq!(
            validate_volume_size(MAX_VOLUME_SIZE + 4096),
            Err(ValidationError::SizeTooLarge {
                size: MAX_VOLUME_SIZE + 4096
            })
        );
        assert!(validate_volume_size(u64::MAX).is_err());
    }

    #[test]
    fn stale_replica_timeouts() {
        assert_eq!(validate_stale_replica_timeout(0), Ok(()));
        assert_eq!(validate_stale_replica_timeout(1), Ok(()));
        assert_eq!(
            validate_stale_replica_timeout(MAX_STALE_REPLICA_TIMEOUT_SECS),
            Ok(())
        );
        let e = validate_stale_replica_timeout(MAX_STALE_REPLICA_TIMEOUT_SECS + 1).unwrap_err();
        assert!(e.to_string().contains("365 days"), "{e}");
        assert!(validate_stale_replica_timeout(u64::MAX).is_err());
    }

    /// The reference definition: a DNS-1123 label, written as plainly as possible.
    fn is_label(s: &str) -> bool {
        let b = s.as_bytes();
        let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
        let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && b.len() <= 63
            && b.iter().all(inner)
            && edge(&b[0])
            && edge(&b[b.len() - 1])
    }

    proptest! {
        #[test]
        fn name_matches_reference(s in "[a-z0-9A-Z_.\\- é]{0,70}") {
            prop_assert_eq!(validate_name("t", &s).is_ok(), is_label(&s));
        }

        #[test]
        fn node_name_matches_reference(s in "[a-z0-9.\\-_A]{0,80}") {
            let expected = s.len() <= 253 && s.split('.').all(is_label);
            prop_assert_eq!(validate_node_name("t", &s).is_ok(), expected);
        }

        #[test]
        fn size_matches_reference(size in prop_oneof![any::<u64>(), (0..=u64::from(u32::MAX) + 2).prop_map(|b| b * 4096)]) {
            let expected = size != 0 && size % 4096 == 0 && size / 4096 <= u64::from(u32::MAX);
            prop_assert_eq!(validate_volume_size(size).is_ok(), expected);
        }
    }
}
