use super::*;
use crate::wire::encode;
use bytes::{Bytes, BytesMut};

fn frames(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut buf = BytesMut::new();
    build(&mut buf);
    buf
}

fn message(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.extend_from_slice(&[tag]);
    buf.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    buf.extend_from_slice(body);
}

fn ready(buf: &mut BytesMut, status: u8) {
    message(buf, tag::READY_FOR_QUERY, &[status]);
}

fn started() -> Tracker {
    let mut t = Tracker::new(Limits::default());
    let z = frames(|b| ready(b, b'I'));
    t.server_bytes(&z, 1 << 20).unwrap();
    assert!(t.ready());
    t
}

fn feed_client(t: &mut Tracker, buf: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    crate::wire::complete_prefix(buf, 1 << 20, |tag, body| steps.push(t.client(tag, body)))
        .unwrap();
    steps
}

#[test]
fn simple_queries_open_and_close_sync_points_and_track_the_status() {
    let mut t = started();
    let q = frames(|b| {
        encode::query(b, "BEGIN; INSERT INTO t VALUES (1)").unwrap();
    });
    assert_eq!(feed_client(&mut t, &q), vec![Step::SyncPoint]);
    assert_eq!(t.in_flight(), 1);
    assert!(!t.is_idle());
    let texts: Vec<&str> = t.batch().iter().map(|s| &*s.text).collect();
    assert_eq!(texts, ["BEGIN", "INSERT INTO t VALUES (1)"]);
    assert_eq!(t.batch()[1].class, sql::Class::Dml);
    let z = frames(|b| ready(b, b'T'));
    t.server_bytes(&z, 1 << 20).unwrap();
    assert_eq!((t.in_flight(), t.status()), (0, b'T'));
    assert!(!t.is_idle(), "inside a transaction block");
    let q = frames(|b| encode::query(b, "COMMIT").unwrap());
    feed_client(&mut t, &q);
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    assert!(t.is_idle());
    assert_eq!(t.sync_points(), (2, 2));
}

#[test]
fn extended_batches_name_their_statements_and_portals() {
    let mut t = started();
    let batch = frames(|b| {
        encode::parse(b, "s1", "SELECT $1::int", &[]).unwrap();
        encode::bind(b, "p1", "s1", &[], &[Some(b"1".as_slice())], &[]).unwrap();
        encode::execute(b, "p1", 0).unwrap();
    });
    assert_eq!(
        feed_client(&mut t, &batch),
        vec![Step::Other, Step::Other, Step::Other]
    );
    assert!(
        t.extended_open(),
        "no Sync yet: an implicit transaction may be open"
    );
    assert_eq!(t.in_flight(), 0);
    assert_eq!(&*t.statement("s1").unwrap().text, "SELECT $1::int");
    assert!(t.statement("s1").unwrap().params);
    assert_eq!(&*t.portal("p1").unwrap().statement.text, "SELECT $1::int");
    assert_eq!(t.batch().len(), 1);
    let sync = frames(encode::sync);
    assert_eq!(feed_client(&mut t, &sync), vec![Step::SyncPoint]);
    assert!(!t.extended_open());
    assert_eq!(
        t.batch().len(),
        1,
        "the batch is kept until the next one starts"
    );
    let close = frames(|b| {
        encode::close(b, wire::ObjectKind::Statement, "s1").unwrap();
        encode::sync(b);
    });
    feed_client(&mut t, &close);
    assert!(t.statement("s1").is_none());
    assert!(t.batch().is_empty(), "a new batch started");
}

#[test]
fn sql_prepare_shares_the_protocol_namespace() {
    let mut t = started();
    let q = frames(|b| encode::query(b, "PREPARE q AS UPDATE t SET v = v + 1").unwrap());
    feed_client(&mut t, &q);
    assert_eq!(t.statement("q").unwrap().class, sql::Class::Dml);
    let q = frames(|b| encode::query(b, "EXECUTE q").unwrap());
    feed_client(&mut t, &q);
    assert_eq!(
        t.batch()[0].class,
        sql::Class::Dml,
        "EXECUTE runs the prepared one"
    );
    let q = frames(|b| encode::query(b, "DEALLOCATE q").unwrap());
    feed_client(&mut t, &q);
    assert!(t.statement("q").is_none());
}

#[test]
fn prepared_statement_commands_through_the_extended_protocol_change_the_namespace() {
    let mut t = started();
    let run = |t: &mut Tracker, sql: &str| {
        let batch = frames(|b| {
            encode::parse(b, "", sql, &[]).unwrap();
            encode::bind(b, "", "", &[], &[], &[]).unwrap();
            encode::execute(b, "", 0).unwrap();
            encode::sync(b);
        });
        feed_client(t, &batch);
    };
    run(&mut t, "PREPARE ins (int) AS INSERT INTO t VALUES ($1)");
    assert_eq!(t.statement("ins").unwrap().class, sql::Class::Dml);
    let q = frames(|b| encode::query(b, "EXECUTE ins(1)").unwrap());
    feed_client(&mut t, &q);
    assert_eq!(
        t.batch()[0].class,
        sql::Class::Dml,
        "EXECUTE runs the prepared one"
    );
    run(&mut t, "DEALLOCATE ins");
    assert!(t.statement("ins").is_none());
    let named = frames(|b| {
        encode::parse(b, "s", "SELECT 1", &[]).unwrap();
        encode::bind(b, "p", "s", &[], &[], &[]).unwrap();
        encode::sync(b);
    });
    feed_client(&mut t, &named);
    run(&mut t, "DISCARD ALL");
    assert!(t.statement("s").is_none() && t.portal("p").is_none());
}

/// Feeds `buf` and returns each frame's tag with what the tracker resolved it to.
fn feed_resolved(t: &mut Tracker, buf: &[u8]) -> Vec<(u8, Refers, Applied)> {
    let mut out = Vec::new();
    crate::wire::complete_prefix(buf, 1 << 20, |tag, body| {
        t.client(tag, body);
        out.push((tag, t.take_refers(), t.take_applied()));
    })
    .unwrap();
    out
}

fn query_parts(refers: &Refers) -> Rc<[QueryPart]> {
    match refers {
        Refers::Query(parts) => parts.clone(),
        other => panic!("not a Query: {other:?}"),
    }
}

#[test]
fn query_parts_tell_their_range_and_the_statements_their_commands_prepare_or_name() {
    let mut t = started();
    let text = "PREPARE q AS SELECT 1; EXPLAIN EXECUTE q; CREATE TABLE c AS EXECUTE q; EXECUTE q";
    let q = frames(|b| encode::query(b, text).unwrap());
    let resolved = feed_resolved(&mut t, &q);
    let parts = query_parts(&resolved[0].1);
    assert_eq!(parts.len(), 4);
    for part in parts.iter() {
        assert_eq!(text[part.range.clone()].trim(), &*part.own.text);
    }
    let prepared = parts[0]
        .applied
        .prepares
        .clone()
        .expect("PREPARE creates q");
    assert_eq!(prepared.name.as_deref(), Some("q"));
    assert!(Rc::ptr_eq(&prepared, t.statement("q").unwrap()));
    for part in &parts[1..] {
        let named = part.applied.names.as_ref().expect("names q");
        assert!(Rc::ptr_eq(named, &prepared), "{}", part.own.text);
    }
    assert!(parts[1].runs.is_none(), "a plain EXPLAIN only plans it");
    assert!(parts[2].runs.is_none());
    assert!(Rc::ptr_eq(parts[3].runs.as_ref().unwrap(), &prepared));
    assert!(
        parts[0].own.name.is_none(),
        "a Query's own statements are unnamed"
    );
    assert!(matches!(
        parts[0].own.command(),
        Some(sql::Prepared::Prepare { .. })
    ));
}

#[test]
fn an_execute_of_a_prepare_tells_the_statement_it_created() {
    let mut t = started();
    let batch = frames(|b| {
        encode::parse(b, "", "PREPARE ins AS INSERT INTO t VALUES (1)", &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::execute(b, "", 0).unwrap();
        encode::parse(b, "", "EXECUTE ins", &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::execute(b, "", 0).unwrap();
        encode::sync(b);
    });
    let resolved = feed_resolved(&mut t, &batch);
    let ins = t.statement("ins").unwrap().clone();
    let (tag, _, applied) = &resolved[2];
    assert_eq!(*tag, tag::EXECUTE);
    assert!(Rc::ptr_eq(applied.prepares.as_ref().unwrap(), &ins));
    let (_, _, applied) = &resolved[5];
    assert!(Rc::ptr_eq(applied.names.as_ref().unwrap(), &ins));
    assert!(resolved[6].2.prepares.is_none() && resolved[6].2.names.is_none());
}

#[test]
fn statements_carry_their_name_and_portals_whether_bound_with_parameters() {
    let mut t = started();
    let batch = frames(|b| {
        encode::parse(b, "", "", &[]).unwrap();
        encode::parse(b, "s", "SELECT $1", &[]).unwrap();
        encode::bind(b, "p", "s", &[], &[Some(b"1")], &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::sync(b);
    });
    let resolved = feed_resolved(&mut t, &batch);
    let Refers::Statement(empty) = &resolved[0].1 else {
        panic!("a Parse refers to its statement");
    };
    assert_eq!(
        empty.name.as_deref(),
        Some(""),
        "an empty-text Parse is named"
    );
    assert!(!empty.is_known(), "its text is empty");
    let Refers::Portal(p) = &resolved[2].1 else {
        panic!("a Bind refers to its portal");
    };
    assert!(p.params && p.statement.name.as_deref() == Some("s"));
    let Refers::Portal(unnamed) = &resolved[3].1 else {
        panic!("a Bind refers to its portal");
    };
    assert!(!unnamed.params);
    assert!(Statement::unknown().name.is_none());
}

#[test]
fn a_statement_beyond_the_bound_has_no_name() {
    let mut t = Tracker::new(Limits {
        names_max: 1,
        ..Limits::default()
    });
    let batch = frames(|b| {
        encode::parse(b, "a", "SELECT 1", &[]).unwrap();
        encode::parse(b, "b", "SELECT 2", &[]).unwrap();
        encode::parse(b, "a", "SELECT 3", &[]).unwrap();
        encode::sync(b);
    });
    let resolved = feed_resolved(&mut t, &batch);
    let names: Vec<Option<String>> = resolved[..3]
        .iter()
        .map(|(_, refers, _)| match refers {
            Refers::Statement(s) => s.name.as_deref().map(str::to_string),
            _ => panic!("a Parse refers to its statement"),
        })
        .collect();
    assert_eq!(names, [Some("a".into()), None, Some("a".into())]);
    let q = frames(|b| encode::query(b, "PREPARE c AS SELECT 1").unwrap());
    let resolved = feed_resolved(&mut t, &q);
    assert!(query_parts(&resolved[0].1)[0].applied.prepares.is_none());
}

#[test]
fn syncs_ignored_during_a_copy_from_execute_open_no_extra_sync_point() {
    let mut t = started();
    // libpq's shape: Parse/Bind/Execute/Sync, the data, then CopyDone + Sync.
    let batch = frames(|b| {
        encode::parse(b, "", "COPY t FROM STDIN", &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::execute(b, "", 0).unwrap();
        encode::sync(b);
    });
    let steps = feed_client(&mut t, &batch);
    assert_eq!(steps.last(), Some(&Step::SyncPoint));
    assert_eq!(t.batch()[0].copy, Some(sql::Copy::FromStdin));
    t.server_bytes(
        &frames(|b| message(b, tag::COPY_IN_RESPONSE, &[0, 0, 0])),
        1 << 20,
    )
    .unwrap();
    let data = frames(|b| {
        message(b, tag::COPY_DATA, b"1\n");
        message(b, tag::COPY_DONE, b"");
        encode::sync(b);
    });
    assert_eq!(
        feed_client(&mut t, &data),
        vec![Step::Other, Step::Other, Step::QuietSync]
    );
    assert_eq!(t.in_flight(), 1, "one ReadyForQuery answers both Syncs");
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    assert!(t.is_idle());
}

#[test]
fn a_second_copy_pipelined_before_a_sync_swallows_the_quiet_sync_too() {
    let mut t = started();
    let copy = |b: &mut BytesMut, table: &str| {
        encode::parse(b, "", &format!("COPY {table} FROM STDIN"), &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::execute(b, "", 0).unwrap();
        encode::sync(b);
    };
    let copy_in = frames(|b| message(b, tag::COPY_IN_RESPONSE, &[0, 0, 0]));
    feed_client(&mut t, &frames(|b| copy(b, "a")));
    t.server_bytes(&copy_in, 1 << 20).unwrap();
    // The first COPY's data and end, then the second COPY with its Sync, no Sync between.
    let rest = frames(|b| {
        message(b, tag::COPY_DATA, b"1\n");
        message(b, tag::COPY_DONE, b"");
        copy(b, "b");
    });
    feed_client(&mut t, &rest);
    t.server_bytes(&copy_in, 1 << 20).unwrap();
    let end = frames(|b| {
        message(b, tag::COPY_DATA, b"2\n");
        message(b, tag::COPY_DONE, b"");
        encode::sync(b);
    });
    feed_client(&mut t, &end);
    // The server ignored the first two Syncs (each came during a COPY) and answers the
    // third once.
    assert_eq!(t.in_flight(), 1);
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    assert!(t.is_idle(), "{:?}", t.sync_points());
}

#[test]
fn a_copy_that_fails_at_execute_answers_its_syncs() {
    let mut t = started();
    let batch = frames(|b| {
        encode::parse(b, "", "COPY missing FROM STDIN", &[]).unwrap();
        encode::bind(b, "", "", &[], &[], &[]).unwrap();
        encode::execute(b, "", 0).unwrap();
        encode::sync(b);
    });
    feed_client(&mut t, &batch);
    // No CopyInResponse: an error, then ReadyForQuery for that Sync.
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    let after = frames(|b| {
        message(b, tag::COPY_FAIL, b"no\0");
        encode::sync(b);
    });
    assert_eq!(
        feed_client(&mut t, &after),
        vec![Step::Other, Step::SyncPoint]
    );
    assert_eq!(t.in_flight(), 1);
}

#[test]
fn farewells_and_terminate_are_seen() {
    let mut t = started();
    let fatal = frames(|b| message(b, tag::ERROR_RESPONSE, b"SFATAL\0C57P01\0Mbye\0\0"));
    t.server_bytes(&fatal, 1 << 20).unwrap();
    assert!(t.farewell());
    let error = frames(|b| message(b, tag::ERROR_RESPONSE, b"SERROR\0C42P01\0Mno\0\0"));
    let mut u = started();
    u.server_bytes(&error, 1 << 20).unwrap();
    assert!(!u.farewell());
    let x = frames(|b| message(b, tag::TERMINATE, b""));
    assert_eq!(feed_client(&mut u, &x), vec![Step::Terminate]);
    assert!(u.terminated());
}

#[test]
fn settings_outlive_only_committed_blocks() {
    let mut t = started();
    for (sql, status) in [
        ("SET search_path = a", b'I'),
        ("BEGIN", b'T'),
        ("SET statement_timeout = 5", b'T'),
        ("ROLLBACK", b'I'),
    ] {
        feed_client(&mut t, &frames(|b| encode::query(b, sql).unwrap()));
        t.server_bytes(&frames(|b| ready(b, status)), 1 << 20)
            .unwrap();
    }
    let kept: Vec<_> = t.settings().frames().cloned().collect();
    assert_eq!(kept.len(), 1, "the rolled-back SET is not kept");
    assert!(kept[0].windows(11).any(|w| w == b"search_path"));
}

#[test]
fn a_set_behind_a_unicode_space_is_not_tracked() {
    // PostgreSQL reads U+00A0 as part of an identifier: "\u{a0}SET ..." is a syntax error
    // there, and the tracker must not keep a setting the server refused. Tab and newline
    // are PostgreSQL's whitespace.
    let mut t = started();
    for sql in [
        "\u{a0}SET search_path = a",
        "\t\n SET statement_timeout = 5",
    ] {
        feed_client(&mut t, &frames(|b| encode::query(b, sql).unwrap()));
        t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
            .unwrap();
    }
    let kept: Vec<_> = t.settings().frames().cloned().collect();
    assert_eq!(
        kept.len(),
        1,
        "only the SET behind PostgreSQL's whitespace: {kept:?}"
    );
    assert!(kept[0].windows(17).any(|w| w == b"statement_timeout"));
}

#[test]
fn names_beyond_the_bound_are_unknown_not_kept() {
    let mut t = Tracker::new(Limits {
        names_max: 2,
        ..Limits::default()
    });
    let batch = frames(|b| {
        for name in ["a", "b", "c"] {
            encode::parse(b, name, "SELECT 1", &[]).unwrap();
        }
        encode::sync(b);
    });
    feed_client(&mut t, &batch);
    assert_eq!(t.names().0, 2);
    assert!(t.statement("c").is_none());
}

#[test]
fn names_already_known_are_replaced_at_the_bound() {
    let mut t = Tracker::new(Limits {
        names_max: 2,
        ..Limits::default()
    });
    let batch = frames(|b| {
        encode::parse(b, "a", "SELECT 1", &[]).unwrap();
        encode::parse(b, "b", "SELECT 2", &[]).unwrap();
        encode::bind(b, "p", "a", &[], &[], &[]).unwrap();
        encode::bind(b, "q", "a", &[], &[], &[]).unwrap();
        encode::sync(b);
    });
    feed_client(&mut t, &batch);
    let again = frames(|b| {
        encode::parse(b, "a", "SELECT 3", &[]).unwrap();
        encode::bind(b, "p", "b", &[], &[], &[]).unwrap();
        encode::sync(b);
    });
    feed_client(&mut t, &again);
    assert_eq!(&*t.statement("a").unwrap().text, "SELECT 3");
    assert_eq!(&*t.portal("p").unwrap().statement.text, "SELECT 2");
}

#[test]
fn a_plain_relay_tracker_decodes_no_statements() {
    let mut t = Tracker::new(Limits {
        statements: false,
        ..Limits::default()
    });
    let batch = frames(|b| {
        encode::parse(b, "s", "SELECT 1", &[]).unwrap();
        encode::query(b, "SELECT 2").unwrap();
    });
    assert_eq!(
        feed_client(&mut t, &batch),
        vec![Step::Other, Step::SyncPoint]
    );
    assert!(t.statement("s").is_none());
    assert!(t.batch().is_empty());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Any byte sequence, in either direction, in any split: `Ok` or `Err`, never a panic;
    /// the counts stay consistent.
    fn run(chunks: &[(bool, Vec<u8>)]) {
        let mut t = Tracker::new(Limits {
            names_max: 8,
            settings_max: 4,
            statements: true,
            settings: true,
        });
        for (from_client, bytes) in chunks {
            let fed = if *from_client {
                t.client_bytes(bytes, 1 << 16)
            } else {
                t.server_bytes(bytes, 1 << 16)
            };
            if let Ok(n) = fed {
                assert!(n <= bytes.len());
            }
            let (opened, answered) = t.sync_points();
            assert!(answered <= opened);
            assert!(t.names().0 <= 8 && t.names().1 <= 9);
        }
    }

    fn tagged() -> impl Strategy<Value = Vec<u8>> {
        let tags = prop::sample::select(b"QPBDESCHXFfdcZGWEpR".to_vec());
        prop::collection::vec((tags, prop::collection::vec(any::<u8>(), 0..40)), 0..12).prop_map(
            |messages| {
                let mut out = Vec::new();
                for (tag, body) in messages {
                    out.push(tag);
                    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    out.extend_from_slice(&body);
                }
                out
            },
        )
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..64)), 0..16)) {
            run(&chunks);
        }

        #[test]
        fn well_framed_messages_with_any_bodies_never_panic(chunks in prop::collection::vec((any::<bool>(), tagged()), 0..8)) {
            run(&chunks);
        }
    }
}

#[test]
fn a_failed_multi_statement_query_keeps_none_of_its_settings() {
    let mut t = started();
    let kept = |t: &Tracker| t.settings().frames().count();
    // Several statements run in one implicit block: the error undoes the SET.
    feed_client(
        &mut t,
        &frames(|b| encode::query(b, "SET search_path = nosuch; SELECT 1/0").unwrap()),
    );
    let answer = frames(|b| {
        message(
            b,
            tag::ERROR_RESPONSE,
            b"SERROR\0C22012\0Mdivision by zero\0\0",
        );
        ready(b, b'I');
    });
    t.server_bytes(&answer, 1 << 20).unwrap();
    assert_eq!(kept(&t), 0, "the rolled-back SET is not kept");
    // The same without an error is kept, and so is a lone SET.
    feed_client(
        &mut t,
        &frames(|b| encode::query(b, "SET search_path = app; SELECT 1").unwrap()),
    );
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    assert_eq!(kept(&t), 1);
    feed_client(
        &mut t,
        &frames(|b| encode::query(b, "SET TimeZone = 'UTC'").unwrap()),
    );
    t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
        .unwrap();
    assert_eq!(kept(&t), 2);
}

#[test]
fn every_cancelled_sync_point_of_one_read_is_remembered() {
    let mut t = started();
    for sql in ["SELECT 1", "SELECT 2", "SELECT 3"] {
        let q = frames(|b| encode::query(b, sql).unwrap());
        feed_client(&mut t, &q);
    }
    // One read answers all three: the first and the last were cancelled.
    let answers = frames(|b| {
        message(b, tag::ERROR_RESPONSE, b"SERROR\0C57014\0Mcanceled\0\0");
        ready(b, b'I');
        ready(b, b'I');
        message(b, tag::ERROR_RESPONSE, b"SERROR\0C57014\0Mcanceled\0\0");
        ready(b, b'I');
    });
    t.server_bytes(&answers, 1 << 20).unwrap();
    assert_eq!(t.sync_points(), (3, 3));
    assert!(t.cancelled(0), "the earlier 57014 is not overwritten");
    assert!(!t.cancelled(1));
    assert!(t.cancelled(2));
}

/// A session carried on in another tracker (a pooled client moving between shards) keeps
/// its settings and its prepared statements, protocol-level and SQL-level, and starts idle.
#[test]
fn a_session_carried_to_another_tracker_keeps_its_settings_and_statements() {
    let mut t = started();
    let idle = |t: &mut Tracker, q: &BytesMut| {
        feed_client(t, q);
        t.server_bytes(&frames(|b| ready(b, b'I')), 1 << 20)
            .unwrap();
    };
    idle(
        &mut t,
        &frames(|b| {
            encode::query(b, "SET search_path TO a, public; PREPARE q AS SELECT 1").unwrap()
        }),
    );
    let batch = frames(|b| {
        encode::parse(b, "s1", "SELECT $1::int", &[]).unwrap();
        encode::sync(b);
    });
    idle(&mut t, &batch);
    assert!(t.is_idle());
    let frames_before: Vec<Bytes> = t.settings().frames().cloned().collect();
    assert_eq!(frames_before.len(), 1);
    let carried: Vec<(String, String, bool)> = t
        .prepared()
        .map(|s| {
            (
                s.name.as_deref().unwrap().to_string(),
                s.text.to_string(),
                s.params,
            )
        })
        .collect();
    let settings = t.take_settings();

    let mut there = Tracker::new(Limits::default());
    there.adopt_session(settings);
    for (name, text, params) in &carried {
        assert!(there.adopt_statement(name, text, *params).is_some());
    }
    assert!(there.is_idle() && there.ready());
    let frames_after: Vec<Bytes> = there.settings().frames().cloned().collect();
    assert_eq!(frames_after, frames_before);
    assert_eq!(
        there.statement("s1").unwrap().text.as_ref(),
        "SELECT $1::int"
    );
    assert!(there.statement("s1").unwrap().params);
    assert_eq!(there.statement("q").unwrap().text.as_ref(), "SELECT 1");
    // It goes on as any session: EXECUTE runs the carried statement.
    feed_client(
        &mut there,
        &frames(|b| encode::query(b, "EXECUTE q").unwrap()),
    );
    assert_eq!(there.batch()[0].text.as_ref(), "SELECT 1");
}
