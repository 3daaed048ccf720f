//! Property tests for the pgoutput decoder and the pipeline: bytes from the server are outside
//! input, so no byte string may panic them, and well-formed input must round-trip.

use bytes::Bytes;
use pgprism::cdc::lsn::Lsn;
use pgprism::cdc::pgoutput::{Datum, Message, build};
use pgprism::cdc::pipeline::{Pipeline, PipelineConfig, Work};
use pgprism::config::{CdcDeleteMode, CdcSchemaChanges, CdcToastMode};
use proptest::prelude::*;

fn pipeline() -> Pipeline {
    let cfg = PipelineConfig {
        label_prefix: "p".into(),
        flush_rows: 7,
        flush_bytes: 1 << 16,
        flush_interval: std::time::Duration::from_secs(60),
        delete_mode: CdcDeleteMode::Hard,
        toast_mode: CdcToastMode::FullRow,
        audit_prefix: Some("a_".into()),
        stream_buffer_bytes_max: 1 << 20,
        schema_changes: CdcSchemaChanges::Ignore,
        fill_rows: false,
        fill_bytes_max: 64 << 20,
        non_utf8_replace: false,
    };
    Pipeline::new(
        cfg,
        [("public.t".to_string(), vec!["id".to_string()])].into(),
    )
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), stream in any::<bool>()) {
        // Iterating a decoded message must not panic either.
        if let Ok(Message::Insert { new, .. }) = Message::decode(&bytes, stream) {
            let _ = new.iter().count();
        }
        let mut p = pipeline();
        let mut out = Vec::new();
        let _ = p.handle(&Bytes::from(bytes), &mut out);
    }

    #[test]
    fn mutated_valid_messages_never_panic(pos in 0usize..64, byte in any::<u8>(), values in proptest::collection::vec(proptest::option::of("[a-z\"\\\\é]{0,12}"), 1..4)) {
        let mut p = pipeline();
        let mut out = Vec::new();
        let mut rel = Vec::new();
        build::relation(&mut rel, 1, "public", "t", &[(true, "id", 23), (false, "a", 25), (false, "b", 25), (false, "c", 25)]);
        let mut begin = Vec::new();
        build::begin(&mut begin, Lsn(9), 1);
        p.handle(&Bytes::from(begin), &mut out).unwrap();
        p.handle(&Bytes::from(rel), &mut out).unwrap();
        let mut tuple: Vec<Option<Option<&str>>> = vec![Some(Some("1"))];
        tuple.extend(values.iter().map(|v| v.as_deref().map(Some)));
        let mut ins = Vec::new();
        build::insert(&mut ins, 1, &tuple);
        // The unmutated message decodes to exactly what was built.
        let Ok(Message::Insert { new, .. }) = Message::decode(&ins, false) else { panic!("valid insert rejected") };
        let got: Vec<Datum<'_>> = new.iter().collect();
        prop_assert_eq!(got.len(), tuple.len());
        if pos < ins.len() {
            ins[pos] = byte;
        }
        let _ = p.handle(&Bytes::from(ins), &mut out);
        let mut commit = Vec::new();
        build::commit(&mut commit, Lsn(9), Lsn(10));
        let _ = p.handle(&Bytes::from(commit), &mut out);
        p.flush_all(&mut out);
        for w in out {
            if let Work::Load(b) = w {
                // Whatever was accepted is valid JSON.
                prop_assert!(sonic_rs::from_slice::<sonic_rs::Value>(&b.body).is_ok(), "{}", String::from_utf8_lossy(&b.body));
            }
        }
    }
}
