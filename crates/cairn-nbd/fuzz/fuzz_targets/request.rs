//! Fuzz target `request`: bytes through the transmission request decoder and validator
//! (`cairn_nbd::fuzzing::request`), or, with the first byte's top bit set, through the
//! conversion of device extents into BLOCK_STATUS descriptors
//! (`cairn_nbd::fuzzing::block_status`).
//!
//! Properties checked (the same as the crate's proptests): no panic; a decoded header
//! re-encodes to the same bytes; a request that validates is non-empty, inside the export,
//! aligned, within the maximum block size and negotiated; every refusal maps to EINVAL or
//! ENOSPC; descriptors are nonzero, alternate in status and never exceed the query.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    if mode & 0x80 == 0 {
        cairn_nbd::fuzzing::request(data);
    } else {
        cairn_nbd::fuzzing::block_status(input);
    }
});
