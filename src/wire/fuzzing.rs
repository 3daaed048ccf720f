//! Fuzz bodies shared by the `cargo fuzz` targets in `fuzz/` and by the corpus smoke test,
//! so CI exercises the same code on stable without libFuzzer. Each function feeds arbitrary
//! bytes through a family of decoders and calls every accessor; the only property checked
//! is "returns, never panics" (plus cheap consistency checks that would catch a decoder
//! reading out of its frame). Not part of the supported API.

use bytes::BytesMut;

use super::auth::{AuthRequest, ClientAuth};
use super::backend::BackendMessage;
use super::frame::{complete_prefix, split_message, split_startup};
use super::frontend::FrontendMessage;
use super::startup::StartupPacket;

/// Small enough that the fuzzer explores the too-large path too.
const FUZZ_MESSAGE_BYTES_MAX: usize = 1 << 16;
const FUZZ_STARTUP_BYTES_MAX: usize = 10_000;

/// Splits `data` into frames and checks that `complete_prefix` agrees with `split_message`.
fn frames(data: &[u8], mut each: impl FnMut(u8, &[u8])) {
    let prefix = complete_prefix(data, FUZZ_MESSAGE_BYTES_MAX, |_, _| ());
    let mut buf = BytesMut::from(data);
    let mut split_bytes = 0usize;
    let mut failed = false;
    loop {
        match split_message(&mut buf, FUZZ_MESSAGE_BYTES_MAX) {
            Ok(Some(frame)) => {
                split_bytes += frame.bytes().len();
                each(frame.tag(), frame.body());
            }
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    match prefix {
        Ok(len) => assert!(
            !failed && len == split_bytes,
            "complete_prefix disagrees with split_message"
        ),
        Err(_) => assert!(failed, "complete_prefix failed where split_message did not"),
    }
}

/// Frontend stream: every frame through `FrontendMessage` and all accessors.
pub fn fuzz_frontend(data: &[u8]) {
    frames(data, |tag, body| {
        let Ok(message) = FrontendMessage::decode(tag, body) else {
            return;
        };
        match message {
            FrontendMessage::Query(q) => drop(q.query()),
            FrontendMessage::Parse(p) => {
                let _ = (p.statement(), p.query());
                if let Ok(types) = p.param_types() {
                    assert_eq!(types.iter().count(), types.len());
                }
            }
            FrontendMessage::Bind(b) => {
                let _ = (
                    b.portal(),
                    b.statement(),
                    b.param_formats(),
                    b.result_formats(),
                );
                if let Ok(parts) = b.parts() {
                    assert_eq!(parts.params.iter().count(), parts.params.len());
                    let _ =
                        parts.param_formats.iter().count() + parts.result_formats.iter().count();
                    for i in 0..parts.params.len() {
                        parts.param_format(i);
                    }
                }
            }
            FrontendMessage::Describe(d) => drop(d.target()),
            FrontendMessage::Close(c) => drop(c.target()),
            FrontendMessage::Execute(e) => {
                let _ = (e.portal(), e.max_rows());
            }
            FrontendMessage::CopyFail(c) => drop(c.message()),
            FrontendMessage::Password(p) => {
                let _ = (p.password(), p.sasl_initial(), p.sasl_response());
            }
            FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::Terminate
            | FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::Other { .. } => {}
        }
    });
}

/// Backend stream: every frame through `BackendMessage` and all accessors; authentication
/// requests also drive a client auth state machine.
pub fn fuzz_backend(data: &[u8]) {
    let mut auth = ClientAuth::new("fuzz", "fuzz");
    let mut out = BytesMut::new();
    frames(data, |tag, body| {
        match BackendMessage::decode(tag, body) {
            Ok(BackendMessage::Authentication(request)) => {
                // Once the state machine errors it is abandoned, as the connection would be.
                if auth.step(&request, &mut out).is_err() {
                    auth = ClientAuth::new("fuzz", "fuzz");
                }
                out.clear();
            }
            Ok(message) => backend_accessors(message),
            Err(_) => return,
        }
        // Auth requests are also parsed standalone, outside any exchange.
        let _ = AuthRequest::parse(body);
    });
}

/// Calls every accessor of a decoded backend message, checking that counts agree.
fn backend_accessors(message: BackendMessage<'_>) {
    match message {
        BackendMessage::BackendKeyData(k) => {
            let _ = (k.pid(), k.secret(), k.parts());
        }
        BackendMessage::ParameterStatus(p) => drop(p.parts()),
        BackendMessage::ReadyForQuery(r) => drop(r.status()),
        BackendMessage::RowDescription(r) => {
            if let Ok(fields) = r.fields() {
                let len = fields.len();
                assert_eq!(fields.count(), len);
            }
        }
        BackendMessage::DataRow(d) => {
            if let Ok(columns) = d.columns() {
                assert_eq!(columns.iter().count(), columns.len());
            }
        }
        BackendMessage::CommandComplete(c) => {
            let _ = (c.tag(), c.rows());
        }
        BackendMessage::ErrorResponse(e) | BackendMessage::NoticeResponse(e) => {
            let _ = (e.parse(), e.code());
            if let Ok(fields) = e.fields() {
                let _ = fields.count();
            }
        }
        BackendMessage::NotificationResponse(n) => drop(n.parts()),
        BackendMessage::CopyInResponse(c)
        | BackendMessage::CopyOutResponse(c)
        | BackendMessage::CopyBothResponse(c) => {
            if let Ok((_, formats)) = c.parts() {
                let _ = formats.iter().count();
            }
        }
        BackendMessage::ParameterDescription(p) => {
            if let Ok(types) = p.types() {
                let _ = types.iter().count();
            }
        }
        BackendMessage::NegotiateProtocolVersion(n) => {
            let _ = n.newest_minor();
            if let Ok(options) = n.options() {
                let _ = options.count();
            }
        }
        BackendMessage::EmptyQueryResponse
        | BackendMessage::CopyData(_)
        | BackendMessage::CopyDone
        | BackendMessage::NoData
        | BackendMessage::ParseComplete
        | BackendMessage::BindComplete
        | BackendMessage::CloseComplete
        | BackendMessage::PortalSuspended
        | BackendMessage::Other { .. } => {}
        // Driven through the client auth state machine by `fuzz_backend`.
        BackendMessage::Authentication(_) => {}
    }
}

/// Startup phase: split the first packet and parse it; then treat the rest as a frontend
/// stream, as the proxy does after a successful startup.
pub fn fuzz_startup(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(packet)) = split_startup(&mut buf, FUZZ_STARTUP_BYTES_MAX) {
        if let Ok(parsed) = StartupPacket::parse(&packet) {
            let _ = (parsed.param("user"), parsed.param("database"));
        }
        fuzz_frontend(&buf);
    }
    // The whole input as one packet, bypassing the splitter's length checks.
    let _ = StartupPacket::parse(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode::{self, ErrorSpec};
    use crate::wire::{FieldDescription, Format, ObjectKind, TransactionStatus};
    use std::path::Path;

    /// The CI smoke run of the fuzzers: every committed corpus file through its target.
    #[test]
    fn corpus_smoke() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type FuzzTarget = (&'static str, fn(&[u8]));
        let targets: [FuzzTarget; 3] = [
            ("frontend_decode", fuzz_frontend),
            ("backend_decode", fuzz_backend),
            ("startup_decode", fuzz_startup),
        ];
        for (name, target) in targets {
            let dir = root.join(name);
            let mut files = 0;
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.expect("corpus entry").path();
                let data = std::fs::read(&path).expect("corpus file");
                target(&data);
                files += 1;
            }
            assert!(files >= 10, "{name}: only {files} corpus files");
        }
    }

    type Build = Box<dyn Fn(&mut BytesMut)>;
    /// Named seed builders for one fuzz target.
    type Seeds = Vec<(&'static str, Build)>;

    /// Regenerates the seed corpus from the builders:
    /// `cargo test --lib write_seed_corpus -- --ignored`.
    #[test]
    #[ignore = "writes files under fuzz/corpus; run by hand when the seeds change"]
    fn write_seed_corpus() {
        let frontend = [frontend_statement_seeds(), frontend_other_seeds()]
            .into_iter()
            .flatten()
            .collect::<Seeds>();
        let backend = [
            backend_startup_seeds(),
            backend_query_seeds(),
            backend_other_seeds(),
        ]
        .into_iter()
        .flatten()
        .collect::<Seeds>();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, seeds) in [
            ("frontend_decode", frontend),
            ("backend_decode", backend),
            ("startup_decode", startup_seeds()),
        ] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            for (name, build) in seeds {
                let mut buf = BytesMut::new();
                build(&mut buf);
                std::fs::write(dir.join(name), &buf).expect("corpus file");
            }
        }
    }

    /// Simple and extended query messages.
    fn frontend_statement_seeds() -> Seeds {
        vec![
            (
                "query",
                Box::new(|b| encode::query(b, "select 1; select 2").unwrap()),
            ),
            (
                "parse",
                Box::new(|b| encode::parse(b, "s1", "select $1::int", &[23]).unwrap()),
            ),
            (
                "bind",
                Box::new(|b| {
                    encode::bind(
                        b,
                        "p",
                        "s1",
                        &[Format::Binary],
                        &[Some(&[0, 0, 0, 1]), None],
                        &[Format::Text],
                    )
                    .unwrap()
                }),
            ),
            (
                "describe",
                Box::new(|b| encode::describe(b, ObjectKind::Statement, "s1").unwrap()),
            ),
            (
                "execute",
                Box::new(|b| encode::execute(b, "p", 10).unwrap()),
            ),
            (
                "extended",
                Box::new(|b| {
                    encode::parse(b, "", "select $1", &[]).unwrap();
                    encode::bind(b, "", "", &[], &[Some(b"x")], &[]).unwrap();
                    encode::describe(b, ObjectKind::Portal, "").unwrap();
                    encode::execute(b, "", 0).unwrap();
                    encode::sync(b);
                }),
            ),
            (
                "close",
                Box::new(|b| encode::close(b, ObjectKind::Portal, "p").unwrap()),
            ),
        ]
    }

    /// Flush, Terminate, COPY, authentication replies and malformed frames.
    fn frontend_other_seeds() -> Seeds {
        vec![
            (
                "flush_terminate",
                Box::new(|b| {
                    encode::flush(b);
                    encode::terminate(b);
                }),
            ),
            (
                "copy",
                Box::new(|b| {
                    encode::copy_data(b, b"1\tfoo\n").unwrap();
                    encode::copy_done(b);
                    encode::copy_fail(b, "client gave up").unwrap();
                }),
            ),
            (
                "password",
                Box::new(|b| encode::password(b, b"md5abcdef").unwrap()),
            ),
            (
                "sasl",
                Box::new(|b| {
                    encode::sasl_initial_response(b, "SCRAM-SHA-256", Some(b"n,,n=,r=abc"))
                        .unwrap();
                    encode::sasl_response(b, b"c=biws,r=abcdef,p=xyz").unwrap();
                }),
            ),
            (
                "truncated",
                Box::new(|b| b.extend_from_slice(b"Q\0\0\0\x10sel")),
            ),
            (
                "bad_length",
                Box::new(|b| b.extend_from_slice(b"S\0\0\0\x02")),
            ),
        ]
    }

    /// Authentication requests and the reply to a startup.
    fn backend_startup_seeds() -> Seeds {
        vec![
            ("auth_ok", Box::new(encode::authentication_ok)),
            (
                "auth_md5",
                Box::new(|b| b.extend_from_slice(b"R\0\0\0\x0c\0\0\0\x05abcd")),
            ),
            (
                "auth_sasl",
                Box::new(|b| b.extend_from_slice(b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0")),
            ),
            (
                "auth_sasl_continue",
                Box::new(|b| b.extend_from_slice(b"R\0\0\0\x1f\0\0\0\x0br=abcdef,s=c2FsdA==,i=1")),
            ),
            (
                "startup_reply",
                Box::new(|b| {
                    encode::authentication_ok(b);
                    encode::parameter_status(b, "server_version", "17.2").unwrap();
                    encode::backend_key_data(b, 4242, -7);
                    encode::ready_for_query(b, TransactionStatus::Idle);
                }),
            ),
        ]
    }

    /// Answers to a query: rows, an error, a notice.
    fn backend_query_seeds() -> Seeds {
        let field = FieldDescription {
            name: "id",
            table_oid: 16384,
            column_attr: 1,
            type_oid: 23,
            type_size: 4,
            type_modifier: -1,
            format: Format::Text,
        };
        vec![
            (
                "select",
                Box::new(move |b| {
                    encode::row_description(b, &[field]).unwrap();
                    encode::data_row(b, &[Some(b"1")]).unwrap();
                    encode::data_row(b, &[None]).unwrap();
                    encode::command_complete(b, "SELECT 2").unwrap();
                    encode::ready_for_query(b, TransactionStatus::InTransaction);
                }),
            ),
            (
                "error",
                Box::new(|b| {
                    let spec = ErrorSpec {
                        severity: "ERROR",
                        code: "42P01",
                        message: "relation \"t\" does not exist",
                        detail: Some("detail"),
                        hint: Some("hint"),
                    };
                    encode::error_response(b, &spec).unwrap();
                    encode::ready_for_query(b, TransactionStatus::Failed);
                }),
            ),
            (
                "notice",
                Box::new(|b| {
                    let spec = ErrorSpec {
                        severity: "NOTICE",
                        code: "00000",
                        message: "hi",
                        detail: None,
                        hint: None,
                    };
                    encode::notice_response(b, &spec).unwrap();
                }),
            ),
        ]
    }

    /// Extended-protocol replies, COPY, notifications and protocol negotiation.
    fn backend_other_seeds() -> Seeds {
        vec![
            ("empty_query", Box::new(encode::empty_query_response)),
            (
                "extended_replies",
                Box::new(|b| {
                    b.extend_from_slice(b"1\0\0\0\x042\0\0\0\x04n\0\0\0\x04s\0\0\0\x043\0\0\0\x04")
                }),
            ),
            (
                "param_description",
                Box::new(|b| b.extend_from_slice(b"t\0\0\0\x0a\0\x01\0\0\0\x17")),
            ),
            (
                "copy_out",
                Box::new(|b| {
                    b.extend_from_slice(b"H\0\0\0\x09\0\0\x01\0\0");
                    encode::copy_data(b, b"1\n").unwrap();
                    encode::copy_done(b);
                }),
            ),
            (
                "notification",
                Box::new(|b| b.extend_from_slice(b"A\0\0\0\x11\0\0\0\x01chan\0hey\0")),
            ),
            (
                "negotiate",
                Box::new(|b| b.extend_from_slice(b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0")),
            ),
        ]
    }

    /// Startup packets, SSL/GSS/cancel requests and malformed ones.
    fn startup_seeds() -> Seeds {
        vec![
            (
                "startup",
                Box::new(|b| {
                    encode::startup_message(b, &[("user", "alice"), ("database", "db")]).unwrap()
                }),
            ),
            (
                "startup_options",
                Box::new(|b| {
                    encode::startup_message(
                        b,
                        &[
                            ("user", "bob"),
                            ("application_name", "psql"),
                            ("options", "-c x=1"),
                        ],
                    )
                    .unwrap()
                }),
            ),
            (
                "startup_then_query",
                Box::new(|b| {
                    encode::startup_message(b, &[("user", "alice")]).unwrap();
                    encode::query(b, "select 1").unwrap();
                }),
            ),
            (
                "startup_no_user",
                Box::new(|b| encode::startup_message(b, &[("database", "db")]).unwrap()),
            ),
            (
                "ssl",
                Box::new(|b| b.extend_from_slice(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])),
            ),
            (
                "gssenc",
                Box::new(|b| b.extend_from_slice(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])),
            ),
            (
                "cancel",
                Box::new(|b| encode::cancel_request(b, 1234, 5678)),
            ),
            (
                "protocol_2",
                Box::new(|b| b.extend_from_slice(&[0, 0, 0, 8, 0, 2, 0, 0])),
            ),
            (
                "protocol_3_2",
                Box::new(|b| b.extend_from_slice(b"\0\0\0\x10\0\x03\0\x02user\0u\0\0")),
            ),
            ("short", Box::new(|b| b.extend_from_slice(&[0, 0, 0, 4]))),
            (
                "unterminated",
                Box::new(|b| b.extend_from_slice(b"\0\0\0\x0e\0\x03\0\0user\0u")),
            ),
        ]
    }
}
