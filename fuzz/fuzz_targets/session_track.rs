#![no_main]
//! Fuzzes the session tracker with both directions of a session interleaved; the body lives
//! in `pgprism::session::fuzzing` so the corpus smoke test on stable runs the same code.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgprism::session::fuzzing::fuzz_session(data);
});
