//! Property tests for the wire module: decoders never panic on arbitrary bytes, and every
//! builder's output decodes back to what was built.

use bytes::BytesMut;
use pgprism::wire::fuzzing::{fuzz_backend, fuzz_frontend, fuzz_startup};
use pgprism::wire::{
    self, AuthRequest, BackendMessage, ErrorSpec, FieldDescription, Format, FrontendMessage,
    ObjectKind, StartupPacket, TransactionStatus, encode,
};
use proptest::prelude::*;

const MAX: usize = 1 << 20;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// Strings that can travel as C strings.
fn cstring() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,24}"
}

fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..24))
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Text), Just(Format::Binary)]
}

/// A well-framed message with an arbitrary tag and body: reaches the body decoders far more
/// often than raw bytes do.
fn framed_message() -> impl Strategy<Value = Vec<u8>> {
    let tags = b"QPBDESCHXdcfpFRKZTDCIENAGHWtn123sv".to_vec();
    (
        proptest::sample::select(tags),
        proptest::collection::vec(any::<u8>(), 0..48),
    )
        .prop_map(|(tag, body)| {
            let mut m = vec![tag];
            m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            m.extend_from_slice(&body);
            m
        })
}

/// Splits exactly one message off `buf` and checks nothing is left.
fn only_frame(buf: &mut BytesMut) -> wire::Frame {
    let frame = wire::split_message(buf, MAX).unwrap().unwrap();
    assert!(buf.is_empty(), "builder wrote trailing bytes");
    assert_eq!(frame.bytes().len(), frame.body().len() + wire::HEADER_BYTES);
    frame
}

fn frontend(frame: &wire::Frame) -> FrontendMessage<'_> {
    FrontendMessage::decode(frame.tag(), frame.body()).unwrap()
}

fn backend(frame: &wire::Frame) -> BackendMessage<'_> {
    BackendMessage::decode(frame.tag(), frame.body()).unwrap()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzz_frontend(&data);
        fuzz_backend(&data);
        fuzz_startup(&data);
    }

    #[test]
    fn framed_garbage_never_panics(messages in proptest::collection::vec(framed_message(), 0..6)) {
        let data = messages.concat();
        fuzz_frontend(&data);
        fuzz_backend(&data);
        let mut startup = vec![0, 0, 0, 0];
        startup.extend_from_slice(&data);
        let len = startup.len() as i32;
        startup[..4].copy_from_slice(&len.to_be_bytes());
        fuzz_startup(&startup);
    }

    #[test]
    fn framing_ignores_read_boundaries(
        messages in proptest::collection::vec(framed_message(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let data = messages.concat();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        cuts.push(data.len());
        cuts.sort_unstable();
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        let mut at = 0;
        for cut in cuts {
            buf.extend_from_slice(&data[at..cut]);
            at = cut;
            while let Some(frame) = wire::split_message(&mut buf, MAX).unwrap() {
                seen.push(frame.bytes().to_vec());
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&seen, &messages);
        let mut visited = 0;
        let prefix = wire::complete_prefix(&data, MAX, |_, _| visited += 1).unwrap();
        prop_assert_eq!((prefix, visited), (data.len(), messages.len()));
    }

    #[test]
    fn query_round_trips(sql in cstring()) {
        let mut buf = BytesMut::new();
        encode::query(&mut buf, &sql).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Query(q) = frontend(&frame) else { panic!("not Query") };
        prop_assert_eq!(q.query().unwrap(), sql.as_str());
    }

    #[test]
    fn parse_round_trips(name in cstring(), sql in cstring(), types in proptest::collection::vec(any::<u32>(), 0..8)) {
        let mut buf = BytesMut::new();
        encode::parse(&mut buf, &name, &sql, &types).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Parse(p) = frontend(&frame) else { panic!("not Parse") };
        let (n, s, t) = p.parts().unwrap();
        prop_assert_eq!((n, s), (name.as_str(), sql.as_str()));
        prop_assert_eq!(t.iter().collect::<Vec<_>>(), types);
    }

    #[test]
    fn bind_round_trips(
        portal in cstring(),
        statement in cstring(),
        params in proptest::collection::vec(value(), 0..8),
        per_param in proptest::collection::vec(format(), 8),
        format_mode in 0usize..3,
        results in proptest::collection::vec(format(), 0..4),
    ) {
        let formats: Vec<Format> = match format_mode {
            0 => vec![],
            1 => per_param[..1].to_vec(),
            _ => per_param[..params.len()].to_vec(),
        };
        let refs: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
        let mut buf = BytesMut::new();
        encode::bind(&mut buf, &portal, &statement, &formats, &refs, &results).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Bind(b) = frontend(&frame) else { panic!("not Bind") };
        let parts = b.parts().unwrap();
        prop_assert_eq!((parts.portal, parts.statement), (portal.as_str(), statement.as_str()));
        prop_assert_eq!(b.portal().unwrap(), portal.as_str());
        prop_assert_eq!(b.statement().unwrap(), statement.as_str());
        prop_assert_eq!(parts.params.iter().collect::<Vec<_>>(), refs);
        prop_assert_eq!(parts.param_formats.iter().collect::<Vec<_>>(), formats.clone());
        prop_assert_eq!(parts.result_formats.iter().collect::<Vec<_>>(), results);
        for i in 0..params.len() {
            let expected = match formats.len() { 0 => Format::Text, 1 => formats[0], _ => formats[i] };
            prop_assert_eq!(parts.param_format(i), expected);
        }
    }

    #[test]
    fn describe_close_execute_round_trip(name in cstring(), portal_target in any::<bool>(), max_rows in any::<i32>()) {
        let target = if portal_target { ObjectKind::Portal } else { ObjectKind::Statement };
        let mut buf = BytesMut::new();
        encode::describe(&mut buf, target, &name).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Describe(d) = frontend(&frame) else { panic!("not Describe") };
        prop_assert_eq!(d.target().unwrap(), (target, name.as_str()));

        encode::close(&mut buf, target, &name).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Close(c) = frontend(&frame) else { panic!("not Close") };
        prop_assert_eq!(c.target().unwrap(), (target, name.as_str()));

        encode::execute(&mut buf, &name, max_rows).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Execute(e) = frontend(&frame) else { panic!("not Execute") };
        prop_assert_eq!(e.parts().unwrap(), (name.as_str(), max_rows));
    }

    #[test]
    fn password_and_sasl_round_trip(
        password in cstring(),
        mechanism in cstring(),
        data in value(),
        response in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut buf = BytesMut::new();
        encode::password(&mut buf, password.as_bytes()).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Password(p) = frontend(&frame) else { panic!("not p") };
        prop_assert_eq!(p.password().unwrap(), password.as_bytes());

        encode::sasl_initial_response(&mut buf, &mechanism, data.as_deref()).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Password(p) = frontend(&frame) else { panic!("not p") };
        let initial = p.sasl_initial().unwrap();
        prop_assert_eq!(initial.mechanism, mechanism.as_str());
        prop_assert_eq!(initial.data, data.as_deref());

        encode::sasl_response(&mut buf, &response).unwrap();
        let frame = only_frame(&mut buf);
        let FrontendMessage::Password(p) = frontend(&frame) else { panic!("not p") };
        prop_assert_eq!(p.sasl_response(), &response[..]);
    }

    #[test]
    fn copy_round_trips(data in proptest::collection::vec(any::<u8>(), 0..64), reason in cstring()) {
        let mut buf = BytesMut::new();
        encode::copy_data(&mut buf, &data).unwrap();
        encode::copy_done(&mut buf);
        encode::copy_fail(&mut buf, &reason).unwrap();
        let f1 = wire::split_message(&mut buf, MAX).unwrap().unwrap();
        let f2 = wire::split_message(&mut buf, MAX).unwrap().unwrap();
        let f3 = only_frame(&mut buf);
        prop_assert_eq!(frontend(&f1), FrontendMessage::CopyData(&data));
        prop_assert_eq!(backend(&f1), BackendMessage::CopyData(&data));
        prop_assert_eq!(frontend(&f2), FrontendMessage::CopyDone);
        prop_assert_eq!(backend(&f2), BackendMessage::CopyDone);
        let FrontendMessage::CopyFail(c) = frontend(&f3) else { panic!("not CopyFail") };
        prop_assert_eq!(c.message().unwrap(), reason.as_str());
    }

    #[test]
    fn empty_frontend_messages_round_trip(which in 0usize..3) {
        let mut buf = BytesMut::new();
        let expected = match which {
            0 => { encode::sync(&mut buf); FrontendMessage::Sync }
            1 => { encode::flush(&mut buf); FrontendMessage::Flush }
            _ => { encode::terminate(&mut buf); FrontendMessage::Terminate }
        };
        let frame = only_frame(&mut buf);
        prop_assert_eq!(frontend(&frame), expected);
    }

    #[test]
    fn startup_round_trips(
        user in cstring(),
        params in proptest::collection::vec(("[^\u{0}]{1,12}", cstring()), 0..5),
    ) {
        let mut all: Vec<(&str, &str)> = vec![("user", user.as_str())];
        all.extend(params.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let mut buf = BytesMut::new();
        encode::startup_message(&mut buf, &all).unwrap();
        let packet = wire::split_startup(&mut buf, MAX).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        let StartupPacket::Startup { protocol, params: parsed } = StartupPacket::parse(&packet).unwrap() else {
            panic!("not a StartupMessage")
        };
        prop_assert_eq!(protocol, wire::PROTOCOL_3_0);
        let parsed: Vec<(&str, &str)> = parsed.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        prop_assert_eq!(parsed, all);
    }

    #[test]
    fn cancel_round_trips(pid in any::<i32>(), secret in any::<i32>()) {
        let mut buf = BytesMut::new();
        encode::cancel_request(&mut buf, pid, secret);
        let packet = wire::split_startup(&mut buf, MAX).unwrap().unwrap();
        prop_assert_eq!(StartupPacket::parse(&packet).unwrap(), StartupPacket::Cancel { pid, secret });
    }

    #[test]
    fn error_and_notice_round_trip(
        severity in cstring(),
        code in "[0-9A-Z]{5}",
        message in cstring(),
        detail in proptest::option::of(cstring()),
        hint in proptest::option::of(cstring()),
        notice in any::<bool>(),
    ) {
        let spec = ErrorSpec {
            severity: &severity,
            code: &code,
            message: &message,
            detail: detail.as_deref(),
            hint: hint.as_deref(),
        };
        let mut buf = BytesMut::new();
        if notice {
            encode::notice_response(&mut buf, &spec).unwrap();
        } else {
            encode::error_response(&mut buf, &spec).unwrap();
        }
        let frame = only_frame(&mut buf);
        let view = match backend(&frame) {
            BackendMessage::ErrorResponse(e) if !notice => e,
            BackendMessage::NoticeResponse(e) if notice => e,
            other => panic!("unexpected {other:?}"),
        };
        let f = view.parse().unwrap();
        prop_assert_eq!(f.severity, Some(severity.as_str()));
        prop_assert_eq!(f.severity_nonlocalized, Some(severity.as_str()));
        prop_assert_eq!(f.code, Some(code.as_str()));
        prop_assert_eq!(f.message, Some(message.as_str()));
        prop_assert_eq!(f.detail, detail.as_deref());
        prop_assert_eq!(f.hint, hint.as_deref());
    }

    #[test]
    fn session_messages_round_trip(
        status in prop_oneof![
            Just(TransactionStatus::Idle),
            Just(TransactionStatus::InTransaction),
            Just(TransactionStatus::Failed),
        ],
        name in cstring(),
        value in cstring(),
        pid in any::<i32>(),
        secret in any::<i32>(),
    ) {
        let mut buf = BytesMut::new();
        encode::ready_for_query(&mut buf, status);
        let frame = only_frame(&mut buf);
        let BackendMessage::ReadyForQuery(r) = backend(&frame) else { panic!("not Z") };
        prop_assert_eq!(r.status().unwrap(), status);

        encode::parameter_status(&mut buf, &name, &value).unwrap();
        let frame = only_frame(&mut buf);
        let BackendMessage::ParameterStatus(p) = backend(&frame) else { panic!("not S") };
        prop_assert_eq!(p.parts().unwrap(), (name.as_str(), value.as_str()));

        encode::backend_key_data(&mut buf, pid, secret);
        let frame = only_frame(&mut buf);
        let BackendMessage::BackendKeyData(k) = backend(&frame) else { panic!("not K") };
        prop_assert_eq!((k.pid().unwrap(), k.secret().unwrap()), (pid, secret));

        encode::authentication_ok(&mut buf);
        let frame = only_frame(&mut buf);
        prop_assert_eq!(backend(&frame), BackendMessage::Authentication(AuthRequest::Ok));

        encode::empty_query_response(&mut buf);
        let frame = only_frame(&mut buf);
        prop_assert_eq!(backend(&frame), BackendMessage::EmptyQueryResponse);

        let mut refused = BytesMut::new();
        encode::encryption_refused(&mut refused);
        prop_assert_eq!(&refused[..], b"N");
    }

    #[test]
    fn result_messages_round_trip(
        fields in proptest::collection::vec(
            (cstring(), any::<u32>(), any::<i16>(), any::<u32>(), any::<i16>(), any::<i32>(), format()),
            0..6,
        ),
        columns in proptest::collection::vec(value(), 0..8),
        rows in any::<u64>(),
    ) {
        let fields: Vec<FieldDescription<'_>> = fields
            .iter()
            .map(|(name, table_oid, column_attr, type_oid, type_size, type_modifier, format)| FieldDescription {
                name,
                table_oid: *table_oid,
                column_attr: *column_attr,
                type_oid: *type_oid,
                type_size: *type_size,
                type_modifier: *type_modifier,
                format: *format,
            })
            .collect();
        let mut buf = BytesMut::new();
        encode::row_description(&mut buf, &fields).unwrap();
        let frame = only_frame(&mut buf);
        let BackendMessage::RowDescription(r) = backend(&frame) else { panic!("not T") };
        prop_assert_eq!(r.fields().unwrap().collect::<Vec<_>>(), fields);

        let refs: Vec<Option<&[u8]>> = columns.iter().map(|c| c.as_deref()).collect();
        encode::data_row(&mut buf, &refs).unwrap();
        let frame = only_frame(&mut buf);
        let BackendMessage::DataRow(d) = backend(&frame) else { panic!("not D") };
        prop_assert_eq!(d.columns().unwrap().iter().collect::<Vec<_>>(), refs);

        for (tag, expected) in [
            (format!("INSERT 0 {rows}"), Some(rows)),
            (format!("SELECT {rows}"), Some(rows)),
            ("CREATE TABLE".to_owned(), None),
        ] {
            encode::command_complete(&mut buf, &tag).unwrap();
            let frame = only_frame(&mut buf);
            let BackendMessage::CommandComplete(c) = backend(&frame) else { panic!("not C") };
            prop_assert_eq!(c.tag().unwrap(), tag.as_str());
            prop_assert_eq!(c.rows().unwrap(), expected);
        }
    }
}
