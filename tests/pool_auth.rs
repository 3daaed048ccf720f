//! Transaction pooling's authentication against a real PostgreSQL (issue 14): pgprism
//! checks a client with the secret PostgreSQL itself stores, then logs in to that server
//! with what the client's exchange left (SCRAM keys, an MD5 hash) without ever knowing the
//! password; and `pool.auth-query` finds those secrets on the server.

mod support;

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use pgprism::backend::{self, BackendError, Opened};
use pgprism::config::Endpoint;
use pgprism::embed::Instance;
use pgprism::proxy::credentials::{self, AuthQuery};
use pgprism::tls::Upstream;
use pgprism::wire::{
    self, AuthMethod, AuthRequest, ClientAuth, ScramSecret, Secret, ServerAuth, ServerLogin,
    ServerProgress,
};
use support::{MD5_USER, PASSWORD, SCRAM_USER, start_primary};

const LIMIT: Duration = Duration::from_secs(10);
const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Runs `task` on a shard of its own and returns its output.
fn on_shard<T: 'static>(task: impl Future<Output = T> + 'static) -> T {
    let slot = Rc::new(RefCell::new(None));
    let out = slot.clone();
    pgprism::exec::run(64, async move {
        *out.borrow_mut() = Some(task.await);
    })
    .expect("run the shard");
    slot.borrow_mut().take().expect("the task finished")
}

fn endpoint(pg: &Instance) -> Endpoint {
    let addr: SocketAddr = format!("{}:{}", pg.host(), pg.port()).parse().unwrap();
    Endpoint::Tcp(addr)
}

/// The secret PostgreSQL stores for `user`, read as pgprism reads an auth file line.
fn rolpassword(pg: &Instance, user: &str) -> Secret {
    let text = pg
        .psql(&format!(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'"
        ))
        .unwrap();
    Secret::parse(text.trim()).unwrap()
}

/// A client logging in to pgprism with `password`, in process: pgprism's ServerAuth holds
/// `secret`, the client is ClientAuth. Returns how pgprism may now log in as the user.
fn client_exchange(
    user: &str,
    password: &str,
    secret: &Secret,
    method: AuthMethod,
) -> Option<ServerLogin> {
    let mut client = ClientAuth::new(user, password);
    let mut to_client = BytesMut::new();
    let (mut server, mut progress) =
        ServerAuth::start(user, Some(secret), method, &mut to_client).unwrap();
    loop {
        let mut to_server = BytesMut::new();
        while let Some(frame) = wire::split_message(&mut to_client, MESSAGE_BYTES_MAX).unwrap() {
            let request = AuthRequest::parse(frame.body()).unwrap();
            client.step(&request, &mut to_server).unwrap();
        }
        if let ServerProgress::Done(login) = progress {
            return Some(login);
        }
        let frame = wire::split_message(&mut to_server, MESSAGE_BYTES_MAX)
            .unwrap()
            .unwrap();
        match server.step(frame.tag(), frame.body(), &mut to_client) {
            Ok(next) => progress = next,
            Err(err) => {
                assert_eq!(err.sqlstate(), "28P01", "{err}");
                return None;
            }
        }
    }
}

/// Logs in to `pg` as `user` with `login` and asks who it is.
fn open_and_ask(pg: &Instance, user: &str, login: ServerLogin) -> Result<String, BackendError> {
    let addr = endpoint(pg);
    let user = user.to_owned();
    on_shard(async move {
        let params = [("user", user.as_str()), ("database", "postgres")];
        let opened = backend::open_as(
            &addr,
            LIMIT,
            &params,
            &login,
            &user,
            MESSAGE_BYTES_MAX,
            &Upstream::plain(),
        )
        .await?;
        Ok(current_user(opened).await)
    })
}

/// `SELECT current_user` on an opened session.
async fn current_user(opened: Opened) -> String {
    assert!(opened.key.is_some(), "no BackendKeyData");
    assert!(
        opened
            .params
            .iter()
            .any(|(name, _)| name == "server_version"),
        "{:?}",
        opened.params
    );
    assert!(opened.leftover.is_empty());
    let mut out = BytesMut::new();
    wire::encode::query(&mut out, "SELECT current_user").unwrap();
    opened.stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut who = None;
    loop {
        match wire::split_message(&mut buf, MESSAGE_BYTES_MAX).unwrap() {
            Some(frame) if frame.tag() == b'D' => {
                let row = wire::DataRow::new(frame.body());
                let value = row.columns().unwrap().iter().next().flatten().unwrap();
                who = Some(String::from_utf8(value.to_vec()).unwrap());
            }
            Some(frame) if frame.tag() == b'Z' => return who.expect("a row"),
            Some(frame) => assert_ne!(frame.tag(), b'E', "the query failed"),
            None => assert!(opened.stream.read_buf(&mut buf, 8192).await.unwrap() > 0),
        }
    }
}

fn refused_code(result: Result<String, BackendError>) -> String {
    match result {
        Err(BackendError::Refused { code, .. }) => code,
        other => panic!("expected the server to refuse, got {other:?}"),
    }
}

#[test]
fn scram_keys_from_a_client_exchange_log_in_to_postgresql() {
    let pg = start_primary("pool-auth-scram");
    let secret = rolpassword(&pg, SCRAM_USER);
    let Secret::Scram(verifier) = &secret else {
        panic!("{SCRAM_USER} has no SCRAM secret: {secret:?}");
    };

    // A client with the right password gets in, and leaves pgprism its ClientKey.
    let login = client_exchange(SCRAM_USER, PASSWORD, &secret, AuthMethod::ScramSha256)
        .expect("the right password is accepted");
    assert!(matches!(login, ServerLogin::ScramKeys { .. }), "{login:?}");
    // With it pgprism logs in to PostgreSQL, which holds the same secret.
    assert_eq!(open_and_ask(&pg, SCRAM_USER, login).unwrap(), SCRAM_USER);

    // A wrong password never gets that far.
    assert!(client_exchange(SCRAM_USER, "wrong", &secret, AuthMethod::ScramSha256).is_none());

    // Keys from a verifier of the same password with another salt: PostgreSQL refuses them
    // (SCRAM keys only work where the secret is the same one).
    let other = Secret::Scram(ScramSecret::from_password(
        PASSWORD,
        b"another salt",
        verifier.iterations(),
    ));
    let foreign = client_exchange(SCRAM_USER, PASSWORD, &other, AuthMethod::ScramSha256).unwrap();
    assert_eq!(
        refused_code(open_and_ask(&pg, SCRAM_USER, foreign)),
        "28P01"
    );
}

#[test]
fn an_md5_hash_from_a_client_exchange_logs_in_to_postgresql() {
    let pg = start_primary("pool-auth-md5");
    let secret = rolpassword(&pg, MD5_USER);
    assert_eq!(secret, Secret::md5_of(MD5_USER, PASSWORD));

    // auth-type scram-sha-256, but an MD5 secret can only check MD5: the client is asked
    // for MD5, and pgprism keeps the hash.
    let login = client_exchange(MD5_USER, PASSWORD, &secret, AuthMethod::ScramSha256)
        .expect("the right password is accepted");
    assert!(matches!(login, ServerLogin::Md5Hash(_)), "{login:?}");
    assert_eq!(open_and_ask(&pg, MD5_USER, login).unwrap(), MD5_USER);

    assert!(client_exchange(MD5_USER, "wrong", &secret, AuthMethod::Md5).is_none());
    let wrong_hash = ServerLogin::Md5Hash(format!("md5{}", "0".repeat(32)));
    assert_eq!(
        refused_code(open_and_ask(&pg, MD5_USER, wrong_hash)),
        "28P01"
    );
}

#[test]
fn auth_query_finds_the_secrets_postgresql_stores() {
    let pg = start_primary("pool-auth-query");
    let scram = rolpassword(&pg, SCRAM_USER);
    let md5 = rolpassword(&pg, MD5_USER);
    let addr = endpoint(&pg);
    let found = on_shard(async move {
        // The auth user (a superuser, so it may read pg_shadow) logs in with its password.
        let login = ServerLogin::Password(PASSWORD.to_owned());
        let tls = Upstream::plain();
        let query = pgprism::config::PoolConfig::default().auth_query;
        let target = AuthQuery {
            addr: &addr,
            limit: LIMIT,
            query: &query,
            database: "postgres",
            auth_user: SCRAM_USER,
            login: &login,
            message_bytes_max: MESSAGE_BYTES_MAX,
            tls: &tls,
        };
        let mut found = Vec::new();
        for user in [SCRAM_USER, MD5_USER, "nobody", "x' OR true --", "postgres"] {
            found.push(credentials::lookup(&target, user).await.unwrap());
        }
        // A query that fails on the server is an error, not "no such user".
        let broken = AuthQuery {
            query: "SELECT passwd FROM no_such_table WHERE usename = $1",
            ..target
        };
        let err = credentials::lookup(&broken, SCRAM_USER).await.unwrap_err();
        (found, err.to_string())
    });
    let (found, err) = found;
    assert_eq!(found[0].as_ref(), Some(&scram));
    assert_eq!(found[1].as_ref(), Some(&md5));
    assert_eq!(found[2], None);
    // The name is a parameter: an injection attempt is just a user nobody has.
    assert_eq!(found[3], None);
    // The trusted superuser has a role but no password: NULL, no secret.
    assert_eq!(found[4], None);
    assert!(err.contains("42P01"), "{err}");
}
