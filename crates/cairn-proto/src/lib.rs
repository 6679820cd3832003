//! The control API of Cairn (`cairn.v1`, see `proto/cairn/v1/meta.proto`): the
//! prost messages and tonic clients and servers generated from it, plus the
//! checks and conversions every user of the protos needs.
//!
//! Guarantees: [`validate_record`] accepts exactly the records meta may store
//! (names, references, sizes); the lowercase names of [`cli`] round-trip
//! through `FromStr`. Assumes nothing about transport or storage: no I/O here.

// The generated code trips no lint the workspace turns on today; these are the
// groups it trips when turned on (measured with `-W clippy::pedantic -W
// missing_docs`: `default_trait_access`, `must_use_candidate`,
// `too_many_lines`, `missing_errors_doc`, `doc_markdown` and missing docs).
/// Code generated from `proto/cairn/v1/*.proto` by `tonic-build`.
#[allow(clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cairn.v1");
}

pub mod cli;
mod record;
mod validate;

pub use record::{key_of, kind_of, name_of, validate_record, version_of, with_version};
pub use validate::{
    validate_name, validate_node_name, validate_volume_size, ValidationError, MAX_NAME_LEN,
    MAX_NODE_NAME_LEN, MAX_VOLUME_SIZE, VOLUME_SIZE_ALIGN,
};
