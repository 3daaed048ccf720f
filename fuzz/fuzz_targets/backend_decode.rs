#![no_main]
//! Fuzzes the backend decoders; the body lives in `pgprism::wire::fuzzing` so the corpus
//! smoke test on stable runs the same code.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgprism::wire::fuzzing::fuzz_backend(data);
});
