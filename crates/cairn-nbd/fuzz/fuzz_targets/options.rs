//! Fuzz target `options`: client flags and a sequence of handshake options through the
//! pure negotiation state machine (`cairn_nbd::fuzzing::options`), which also runs the
//! INFO/GO and meta-context payload parsers on every option's data.
//!
//! Properties checked: no panic; every option's reply bytes are well-formed option replies
//! for that option, the last one final (ACK or an error).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cairn_nbd::fuzzing::options(data);
});
