//! Transaction pooling's bounds and console against a real PostgreSQL server: the `[pool]`
//! keys that had no test of their own (`min-size`, `reserve-size`, `server-lifetime-ms`,
//! `server-reset-query`, `server-check-query`), every kind of pin counted and cleaned before
//! the next client, and the console's actions (`PAUSE`, `RESUME`, `RECONNECT`, `KILL`,
//! `RELOAD`, `SHUTDOWN`, `SET`) acting on real connections, Frenzy's names for the pool
//! flags, and the pairs' own bounds (`pairs-max`, `pair-idle-timeout-ms`, names that do not
//! exist leaving nothing behind). One shard unless a test needs two, so that which connection a client gets does not
//! depend on which shard it landed on.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::{
    MD5_USER, PASSWORD, Proxy, SCRAM_USER, TempDir, eventually, raw, sqlstate, start_primary,
};

/// A proxy in transaction mode, one shard, `pool_size` connections per (user, database),
/// clients on trust, the console open to `postgres`, and `pool_keys` (more `[pool]` lines) in
/// its configuration file, kept in the returned directory while the proxy runs.
fn pooled(primary: &str, pool_size: usize, pool_keys: &str) -> (Proxy, TempDir) {
    pooled_with(primary, pool_size, pool_keys, &["--auth-type", "trust"])
}

/// [`pooled`] with `extra` flags instead of trust for clients.
fn pooled_with(
    primary: &str,
    pool_size: usize,
    pool_keys: &str,
    extra: &[&str],
) -> (Proxy, TempDir) {
    let size = pool_size.to_string();
    let mut args = vec!["--pool-size", &size];
    args.extend_from_slice(extra);
    pooled_by(primary, pool_keys, &args)
}

/// A proxy in transaction mode, one shard, the console open to `postgres`, `pool_keys` in its
/// configuration file, and `args` (the pool's size among them, or pgprism's default).
fn pooled_by(primary: &str, pool_keys: &str, args: &[&str]) -> (Proxy, TempDir) {
    pooled_on(primary, 1, pool_keys, args)
}

/// [`pooled_by`] on `shards` shards.
fn pooled_on(primary: &str, shards: usize, pool_keys: &str, args: &[&str]) -> (Proxy, TempDir) {
    let shards = shards.to_string();
    let dir = TempDir::new("pool-console");
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        format!("[pool]\n{pool_keys}admin-users = [\"postgres\"]\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut all = vec![
        "--pool-mode",
        "transaction",
        "--shards",
        &shards,
        "--config",
        &config,
    ];
    all.extend_from_slice(args);
    let proxy = Proxy::start(primary, &all);
    (proxy, dir)
}

fn console(proxy: &Proxy) -> postgres::Client {
    postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=pgbouncer connect_timeout=10",
            proxy.port()
        ),
        postgres::NoTls,
    )
    .expect("console")
}

/// The server process of the connection this client's next transaction is lent.
fn backend_pid(client: &mut postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pg_backend_pid")
        .get(0)
}

/// Client backends of database `db` on the server (pgprism's pooled connections).
fn backends(pg: &pgprism::embed::Instance, db: &str) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND backend_type = 'client backend'"
    ))
    .expect("count backends")
    .trim()
    .parse()
    .unwrap_or(usize::MAX)
}

/// Whether server process `pid` is still there.
fn alive(pg: &pgprism::embed::Instance, pid: i32) -> bool {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
    ))
    .map(|n| n.trim() == "1")
    .unwrap_or(true)
}

/// `column` of the pool of database `db` in SHOW POOLS.
fn pool_column(console: &mut postgres::Client, db: &str, column: &str) -> Option<u64> {
    console
        .simple_query("SHOW POOLS")
        .ok()?
        .into_iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(db) => {
                r.get(column)?.parse().ok()
            }
            _ => None,
        })
}

const WAIT: Duration = Duration::from_secs(15);

#[test]
fn min_size_keeps_connections_open_for_a_pair_once_it_logged_in() {
    let pg = start_primary("pool-min-size");
    pg.psql("CREATE DATABASE app").unwrap();
    let (proxy, _dir) = pooled(&pg.url(), 5, "min-size = 3\n");
    let mut app = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=10",
            proxy.port()
        ),
        postgres::NoTls,
    )
    .unwrap();
    app.batch_execute("SELECT 1").unwrap();
    // The client is idle between transactions: what stays open is the pool's floor.
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 3),
        "min-size 3 connections to app, saw {}",
        backends(&pg, "app")
    );
    drop(app);
}

#[test]
fn reserve_connections_serve_a_client_that_waited_past_the_reserve_timeout() {
    let pg = start_primary("pool-reserve");
    let (proxy, _dir) = pooled(
        &pg.url(),
        1,
        "reserve-size = 1\nreserve-timeout-ms = 50\nquery-wait-timeout-ms = 60000\n",
    );
    let mut a = proxy.client();
    let mut tx = a.transaction().unwrap();
    let held = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get::<_, i32>(0);
    // The pool's one connection stays lent to `a`: `b` is served only by the reserve.
    let mut b = proxy.client();
    let other = backend_pid(&mut b);
    assert_ne!(other, held, "b got a connection of its own");
    tx.commit().unwrap();
}

#[test]
fn a_connection_past_its_lifetime_is_closed_when_it_comes_back() {
    let pg = start_primary("pool-lifetime");
    let (proxy, _dir) = pooled(&pg.url(), 1, "server-lifetime-ms = 1\n");
    let mut c = proxy.client();
    // Each transaction lasts longer than the lifetime, so its connection is past it when it
    // comes back.
    let first: i32 = c
        .query_one("SELECT pg_backend_pid() FROM pg_sleep(0.01)", &[])
        .unwrap()
        .get(0);
    let second: i32 = c
        .query_one("SELECT pg_backend_pid() FROM pg_sleep(0.01)", &[])
        .unwrap()
        .get(0);
    assert_ne!(first, second, "a new connection after the first expired");
    assert!(
        eventually(WAIT, || !alive(&pg, first)),
        "the old one closed"
    );
}

#[test]
fn the_check_query_runs_on_an_idle_connection_before_it_is_lent() {
    let pg = start_primary("pool-check");
    pg.psql("CREATE TABLE checks (at timestamptz DEFAULT now())")
        .unwrap();
    let (proxy, _dir) = pooled(
        &pg.url(),
        1,
        "server-check-delay-ms = 0\nserver-check-query = \"INSERT INTO checks DEFAULT VALUES\"\n",
    );
    let mut c = proxy.client();
    for _ in 0..3 {
        c.batch_execute("SELECT 1").unwrap();
    }
    let checks: i64 = c
        .query_one("SELECT count(*) FROM checks", &[])
        .unwrap()
        .get(0);
    // The first lend may take a fresh connection (nothing to check); every later one found it
    // idle past a delay of 0.
    assert!(checks >= 3, "checked before each later lend, saw {checks}");
    let later: i64 = c
        .query_one("SELECT count(*) FROM checks", &[])
        .unwrap()
        .get(0);
    assert!(later > checks, "checked again: {later} after {checks}");
}

#[test]
fn a_pinned_connection_is_reset_with_the_reset_query_or_closed_without_one() {
    let pg = start_primary("pool-reset");
    for (keys, kept) in [("", true), ("server-reset-query = \"\"\n", false)] {
        let (proxy, _dir) = pooled(&pg.url(), 1, keys);
        let pinned = {
            let mut a = proxy.client();
            a.batch_execute("CREATE TEMP TABLE mine (v int)").unwrap();
            backend_pid(&mut a)
        };
        let mut b = proxy.client();
        let (pid, mine): (i32, Option<String>) = {
            let row = b
                .query_one("SELECT pg_backend_pid(), to_regclass('mine')::text", &[])
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(mine, None, "no trace of the pinned client's table");
        if kept {
            assert_eq!(
                pid, pinned,
                "DISCARD ALL made the connection fit to lend again"
            );
        } else {
            assert_ne!(pid, pinned, "no reset query: the connection was closed");
            assert!(eventually(WAIT, || !alive(&pg, pinned)));
        }
    }
}

/// Every statement that pins, the pin counted, the client kept on its connection while
/// another client uses the rest of the pool, and nothing of it left once it leaves.
#[test]
fn every_kind_of_pin_is_counted_and_cleaned_before_the_next_client() {
    let pg = start_primary("pool-pin-kinds");
    let (proxy, _dir) = pooled(&pg.url(), 2, "");
    let kinds = [
        ("listen", "LISTEN jobs"),
        ("advisory-lock", "SELECT pg_advisory_lock(7)"),
        (
            "with-hold-cursor",
            "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        ),
        ("temporary-object", "CREATE TEMP TABLE mine (v int)"),
    ];
    let mut other = proxy.client();
    let mut admin = console(&proxy);
    for (n, (kind, sql)) in kinds.iter().enumerate() {
        let mut a = proxy.client();
        a.batch_execute(sql).unwrap();
        let pid = backend_pid(&mut a);
        for _ in 0..3 {
            other.batch_execute("SELECT 1").unwrap();
            assert_eq!(
                backend_pid(&mut a),
                pid,
                "{kind}: the client stays on its connection"
            );
        }
        // Visible: the pinned client, idle between its transactions, is the one client of the
        // pool linked to a server connection in SHOW CLIENTS.
        let mut linked = || {
            admin
                .simple_query("SHOW CLIENTS")
                .unwrap()
                .into_iter()
                .filter(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => {
                        r.get("database") == Some("postgres")
                            && r.get("link").is_some_and(|l| !l.is_empty())
                    }
                    _ => false,
                })
                .count()
        };
        assert!(
            eventually(WAIT, || linked() == 1),
            "{kind}: SHOW CLIENTS links it"
        );
        let counted = n as u64 + 1;
        assert!(
            eventually(WAIT, || proxy.metric("pgprism_pool_pins_total") == counted),
            "{kind}: pins counted {} of {counted}",
            proxy.metric("pgprism_pool_pins_total")
        );
        drop(a);
        // The connection is reset before it is lent again (DISCARD ALL): whichever of the two
        // the next clients get, nothing of the pin is there.
        let clean = eventually(WAIT, || {
            pg.psql(&format!(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = {pid}"
            ))
            .is_ok_and(|n| n.trim() == "0")
        });
        assert!(clean, "{kind}: the advisory lock went with the reset");
        for _ in 0..4 {
            let row = other
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_listening_channels()), \
                     (SELECT count(*) FROM pg_cursors WHERE is_holdable), to_regclass('mine')::text",
                    &[],
                )
                .unwrap();
            assert_eq!(row.get::<_, i64>(0), 0, "{kind}: no channel listened to");
            assert_eq!(row.get::<_, i64>(1), 0, "{kind}: no cursor held");
            assert_eq!(row.get::<_, Option<String>>(2), None, "{kind}: no table");
        }
    }
}

#[test]
fn pause_holds_clients_until_resume_and_reconnect_replaces_connections() {
    let pg = start_primary("pool-pause");
    let (proxy, _dir) = pooled(&pg.url(), 2, "");
    let mut admin = console(&proxy);
    let mut a = proxy.client();
    let before = backend_pid(&mut a);

    admin.simple_query("PAUSE").expect("PAUSE");
    let port = proxy.port();
    let waiter = std::thread::spawn(move || {
        let mut b = postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10"),
            postgres::NoTls,
        )
        .unwrap();
        b.query_one("SELECT 41 + 1", &[])
            .map(|r| r.get::<_, i32>(0))
    });
    assert!(
        eventually(WAIT, || pool_column(&mut admin, "postgres", "cl_waiting")
            == Some(1)),
        "the client waits while paused"
    );
    assert!(!waiter.is_finished(), "nothing was lent while paused");
    admin.simple_query("RESUME").expect("RESUME");
    assert_eq!(waiter.join().unwrap().expect("served after RESUME"), 42);
    let Err(again) = admin.simple_query("RESUME") else {
        panic!("RESUME when not paused succeeded");
    };
    let said = again.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        said.as_deref(),
        Some("pooler is not paused/suspended"),
        "PgBouncer's error"
    );

    admin.simple_query("RECONNECT").expect("RECONNECT");
    assert!(
        eventually(WAIT, || backend_pid(&mut a) != before),
        "a new connection after RECONNECT"
    );
    assert!(
        eventually(WAIT, || !alive(&pg, before)),
        "the old one closed"
    );
}

#[test]
fn kill_drops_the_databases_clients_and_connections() {
    let pg = start_primary("pool-kill");
    pg.psql("CREATE DATABASE app").unwrap();
    let (proxy, _dir) = pooled(&pg.url(), 2, "");
    let mut admin = console(&proxy);
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=10",
        proxy.port()
    );
    let mut a = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    a.batch_execute("SELECT 1").unwrap();
    let mut other = proxy.client();
    assert_eq!(
        admin
            .simple_query("KILL nosuchdb")
            .err()
            .and_then(|e| e.as_db_error().map(|d| d.message().to_string()))
            .as_deref(),
        Some("no such database: nosuchdb")
    );
    // The console knows a database by its pool in the shards' snapshots (once a second).
    assert!(
        eventually(WAIT, || pool_column(&mut admin, "app", "cl_active")
            .is_some()),
        "app's pool in SHOW POOLS"
    );
    admin.simple_query("KILL app").expect("KILL app");
    assert!(
        eventually(WAIT, || a.batch_execute("SELECT 1").is_err()),
        "app's client was dropped"
    );
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 0),
        "and its connections"
    );
    // Another database's client is untouched.
    assert!(backend_pid(&mut other) > 0);
}

/// Two KILLs of different databases one right after the other (most often between two of a
/// shard's looks at the console, 50 ms apart): both take effect on every shard. (Before each
/// database had its own kill count, a shard that saw both at one look killed only the last.)
#[test]
fn two_kills_at_once_both_take_effect() {
    let pg = start_primary("pool-kill2");
    pg.psql("CREATE DATABASE app").unwrap();
    pg.psql("CREATE DATABASE app2").unwrap();
    let (proxy, _dir) = pooled(&pg.url(), 2, "");
    let mut admin = console(&proxy);
    let connect = |db: &str| {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
            proxy.port()
        );
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.batch_execute("SELECT 1").unwrap();
        c
    };
    let (mut a, mut b) = (connect("app"), connect("app2"));
    for db in ["app", "app2"] {
        assert!(
            eventually(WAIT, || pool_column(&mut admin, db, "cl_active").is_some()),
            "{db}'s pool in SHOW POOLS"
        );
    }
    admin.simple_query("KILL app").expect("KILL app");
    admin.simple_query("KILL app2").expect("KILL app2");
    assert!(
        eventually(WAIT, || a.batch_execute("SELECT 1").is_err()),
        "app's client was dropped"
    );
    assert!(
        eventually(WAIT, || b.batch_execute("SELECT 1").is_err()),
        "app2's client was dropped"
    );
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 0
            && backends(&pg, "app2") == 0),
        "and their connections"
    );
}

#[test]
fn reload_rereads_the_file_and_shutdown_exits() {
    let pg = start_primary("pool-reload");
    let (mut proxy, dir) = pooled(&pg.url(), 2, "");
    let mut admin = console(&proxy);
    std::fs::write(
        dir.join("pgprism.toml"),
        "[pool]\nserver-check-delay-ms = 1000\nadmin-users = [\"postgres\"]\n",
    )
    .unwrap();
    admin.simple_query("RELOAD").expect("RELOAD");
    assert!(
        eventually(WAIT, || proxy.log().contains("pool.server-check-delay-ms")),
        "the reload read the changed key:\n{}",
        proxy.log()
    );
    let mut c = proxy.client();
    c.batch_execute("SELECT 1").unwrap();
    // SHUTDOWN answers nothing and closes, as PgBouncer's; the process drains and exits.
    let _ = admin.simple_query("SHUTDOWN");
    assert_eq!(proxy.wait_exit(Duration::from_secs(30)), Some(0));
}

/// No `auth-file`: pgprism finds each user's secret with `auth-query` on the primary (as
/// `auth-user`) and authenticates the client itself, SCRAM for a SCRAM secret and MD5 for an
/// MD5 hash, as PostgreSQL would; a wrong password is refused with 28P01.
#[test]
fn users_log_in_with_the_secrets_auth_query_finds() {
    let pg = start_primary("pool-auth-query-login");
    let (proxy, _dir) = pooled_with(&pg.url(), 2, "auth-user = \"postgres\"\n", &[]);
    for user in [SCRAM_USER, MD5_USER] {
        let mut c =
            postgres::Client::connect(&proxy.conninfo(user, Some(PASSWORD)), postgres::NoTls)
                .unwrap_or_else(|e| panic!("{user} through auth-query: {e}\n{}", proxy.log()));
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let wrong = postgres::Client::connect(&proxy.conninfo(user, Some("nope")), postgres::NoTls)
            .err()
            .expect("a wrong password is refused");
        assert_eq!(
            sqlstate(&wrong).as_deref(),
            Some("28P01"),
            "{user}: {wrong}"
        );
    }
}

/// `set_config(..., false)`, `RESET` and `RESET ALL` are tracked per client like `SET`: two
/// clients on one server connection each keep their own `statement_timeout`.
#[test]
fn set_config_and_reset_follow_each_client_on_one_connection() {
    let pg = start_primary("pool-set-config");
    let (proxy, _dir) = pooled(&pg.url(), 1, "");
    let mut a = proxy.client();
    let mut b = proxy.client();
    let shown = |c: &mut postgres::Client| -> String {
        c.query_one("SHOW statement_timeout", &[]).unwrap().get(0)
    };
    a.batch_execute("SELECT set_config('statement_timeout', '1234', false)")
        .unwrap();
    b.batch_execute("SET statement_timeout = 5678").unwrap();
    assert_eq!(backend_pid(&mut a), backend_pid(&mut b), "one connection");
    for _ in 0..2 {
        assert_eq!(shown(&mut a), "1234ms");
        assert_eq!(shown(&mut b), "5678ms");
    }
    a.batch_execute("RESET statement_timeout").unwrap();
    assert_eq!(shown(&mut b), "5678ms");
    assert_eq!(shown(&mut a), "0");
    b.batch_execute("RESET ALL").unwrap();
    assert_eq!(shown(&mut b), "0");
    // A transaction-local set_config ends with its transaction.
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("SELECT set_config('statement_timeout', '42', true)")
        .unwrap();
    let inside: String = tx.query_one("SHOW statement_timeout", &[]).unwrap().get(0);
    assert_eq!(inside, "42ms");
    tx.commit().unwrap();
    assert_eq!(shown(&mut a), "0");
    assert_eq!(shown(&mut b), "0");
}

/// A `stats-users` user reads every SHOW of the console over the wire (PgBouncer's and our
/// own) and is refused whatever changes something; an application user gets no console.
#[test]
fn stats_users_read_every_show_and_change_nothing() {
    let pg = start_primary("pool-stats-users");
    let (proxy, _dir) = pooled(&pg.url(), 2, "stats-users = [\"watcher\"]\n");
    let mut app = proxy.client();
    app.batch_execute("SELECT 1").unwrap();
    let as_user = |user: &str| {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=pgbouncer connect_timeout=10",
                proxy.port()
            ),
            postgres::NoTls,
        )
    };
    let mut watcher = as_user("watcher").expect("a stats user logs in to the console");
    for show in [
        "POOLS",
        "CLIENTS",
        "SERVERS",
        "STATS",
        "STATS_TOTALS",
        "DATABASES",
        "CONFIG",
        "LISTS",
        "VERSION",
        "MIRRORS",
        "COMPARE",
    ] {
        let rows = watcher
            .simple_query(&format!("SHOW {show}"))
            .unwrap_or_else(|e| panic!("SHOW {show}: {e:?}"));
        assert!(
            rows.iter()
                .any(|m| matches!(m, postgres::SimpleQueryMessage::CommandComplete(_))),
            "SHOW {show} completes"
        );
    }
    for change in ["PAUSE", "RECONNECT", "KILL postgres", "RELOAD", "SHUTDOWN"] {
        let Err(refused) = watcher.simple_query(change) else {
            panic!("{change} by a stats user succeeded");
        };
        let said = refused.as_db_error().map(|e| e.message().to_string());
        assert_eq!(said.as_deref(), Some("admin access needed"), "{change}");
    }
    // Nothing changed: the application goes on, the proxy still serves.
    app.batch_execute("SELECT 1").unwrap();
    assert!(
        as_user("app")
            .and_then(|mut c| c.simple_query("SHOW POOLS"))
            .is_err(),
        "no console for a user in neither list"
    );
}

/// SHOW CONFIG as key → value, through the console connection `admin`.
fn show_config(admin: &mut postgres::Client) -> BTreeMap<String, String> {
    admin
        .simple_query("SHOW CONFIG")
        .expect("SHOW CONFIG")
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some((
                r.get("key")?.to_string(),
                r.get("value").unwrap_or_default().to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// Frenzy's pool flags are aliases of pgprism's (`--max-conns` of `--pool-size`,
/// `--min-conns`, `--max-conn-lifetime`, `--max-conn-idle-time`) and take Go's durations
/// (`30m`, `1h30m`): the console shows what they set, and the bound holds for 6 clients in
/// transactions at once, each of which counts the pool's server connections from inside its
/// own (with the flag ignored, pgprism's default of 20 would let all 6 in at once).
#[test]
fn frenzys_pool_flags_set_the_pool_and_its_bound_holds() {
    let pg = start_primary("pool-frenzy-flags");
    pg.psql("CREATE DATABASE app").unwrap();
    let (proxy, _dir) = pooled_by(
        &pg.url(),
        "query-wait-timeout-ms = 60000\n",
        &[
            "--max-conns",
            "2",
            "--min-conns",
            "1",
            "--max-conn-lifetime",
            "30m",
            "--max-conn-idle-time",
            "1h30m",
            "--auth-type",
            "trust",
        ],
    );
    let config = show_config(&mut console(&proxy));
    for (key, value) in [
        ("default_pool_size", "2"),
        ("min_pool_size", "1"),
        ("server_lifetime", "1800"),
        ("server_idle_timeout", "5400"),
    ] {
        assert_eq!(config.get(key).map(String::as_str), Some(value), "{key}");
    }
    const CLIENTS: usize = 6;
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=10",
        proxy.port()
    );
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                start.wait();
                let mut most = 0;
                for _ in 0..3 {
                    let mut tx = c.transaction().unwrap();
                    // Held a while, so that the clients' transactions overlap.
                    tx.batch_execute("SELECT pg_sleep(0.1)").unwrap();
                    let open: i64 = tx
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity \
                             WHERE datname = 'app' AND backend_type = 'client backend'",
                            &[],
                        )
                        .unwrap()
                        .get(0);
                    tx.commit().unwrap();
                    most = most.max(open);
                }
                most
            })
        })
        .collect();
    let most = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .max()
        .unwrap_or(0);
    assert!(
        (1..=2).contains(&most),
        "--max-conns 2: at most 2 server connections, saw {most}"
    );
    assert!(backends(&pg, "app") <= 2, "still within the bound");
}

/// `psql` on the console as `user`, verbose errors (with their SQLSTATE), stopping at the
/// first error: `commands` one `-c` each.
fn psql_console(
    pg: &pgprism::embed::Instance,
    proxy: &Proxy,
    user: &str,
    commands: &[&str],
) -> Output {
    let mut psql = Command::new(pg.psql_path());
    psql.args([
        "-X",
        "-At",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
    ])
    .args([
        "-p",
        &proxy.port().to_string(),
        "-U",
        user,
        "-d",
        "pgbouncer",
    ])
    .args(["-c", "\\set VERBOSITY verbose"])
    .env("PGCONNECT_TIMEOUT", "10")
    .env_remove("PGOPTIONS");
    for command in commands {
        psql.args(["-c", command]);
    }
    psql.output().expect("run psql")
}

/// What psql printed on stderr when `command` failed (panics when it succeeded).
fn psql_refused(pg: &pgprism::embed::Instance, proxy: &Proxy, user: &str, command: &str) -> String {
    let out = psql_console(pg, proxy, user, &[command]);
    assert!(!out.status.success(), "{command} as {user} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// PgBouncer's console `SET` through psql: an admin's SET of `query_wait_timeout` bounds the
/// next wait by the new value (53300 after 1 s, not the 60 s it started with), its SET of
/// `default_pool_size` lets a second client in beside a held transaction, SHOW CONFIG shows
/// both; a stats user is refused with PgBouncer's error, and an unknown key, a value that is
/// not a number, one the pool's checks refuse and a key that needs a restart get
/// `08P01 SET failed` with a DETAIL saying why, changing nothing.
#[test]
fn console_set_changes_the_pools_through_psql() {
    let pg = start_primary("pool-console-set");
    let (proxy, _dir) = pooled(
        &pg.url(),
        1,
        "query-wait-timeout-ms = 60000\nstats-users = [\"watcher\"]\n",
    );
    let mut admin = console(&proxy);
    assert_eq!(show_config(&mut admin)["query_wait_timeout"], "60");
    let mut a = proxy.client();
    let mut b = raw::connect_ready(proxy.listen);
    let mut held = a.transaction().unwrap();
    held.batch_execute("SELECT 1").unwrap();

    let out = psql_console(&pg, &proxy, "postgres", &["SET query_wait_timeout = 1"]);
    assert!(
        out.status.success(),
        "SET: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = psql_console(&pg, &proxy, "postgres", &["SHOW CONFIG"]);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("query_wait_timeout|1|")),
        "SHOW CONFIG in psql:\n{shown}"
    );
    // The pool's one connection stays with `a`: `b` waits, and gives up at the new bound
    // (read raw: the postgres crate reports a FATAL followed by the close as a bare close).
    let started = Instant::now();
    b.write_all(&raw::message(b'Q', b"SELECT 1\0")).unwrap();
    let (tag, body) = raw::read_message(&mut b).expect("an answer within 20 s");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("53300"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "53300 after {:?}: the old 60 s bound",
        started.elapsed()
    );

    let out = psql_console(&pg, &proxy, "postgres", &["SET default_pool_size = 2"]);
    assert!(
        out.status.success(),
        "SET: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = proxy.client();
    c.batch_execute("SELECT 1")
        .expect("a second connection beside the held one");
    assert_eq!(show_config(&mut admin)["default_pool_size"], "2");

    let said = psql_refused(&pg, &proxy, "watcher", "SET default_pool_size = 5");
    assert!(said.contains("08P01: admin access needed"), "{said}");
    for (command, detail) in [
        ("SET no_such_knob = 1", "no setting named no_such_knob"),
        ("SET default_pool_size = 'many'", "expects a whole number"),
        ("SET default_pool_size = 0", "pool.size"),
        ("SET min_pool_size = 3", "pool.min-size"),
        ("SET listen_port = 7000", "changes only with a restart"),
    ] {
        let said = psql_refused(&pg, &proxy, "postgres", command);
        assert!(said.contains("08P01: SET failed"), "{command}: {said}");
        assert!(said.contains(detail), "{command}: {said}");
    }
    let config = show_config(&mut admin);
    assert_eq!(config["default_pool_size"], "2", "nothing changed");
    assert_eq!(config["min_pool_size"], "0", "nothing changed");
    // `admin`'s session began under the 60 s bound; its PAUSE waits for `held`'s busy
    // connection as long as the bound in force now, 1 s (it read the bound once per
    // session before, and waited 60 s).
    let started = Instant::now();
    let said = admin
        .simple_query("PAUSE")
        .err()
        .and_then(|e| e.as_db_error().map(|d| d.message().to_string()))
        .expect("PAUSE with a busy connection answers an error at its bound");
    assert!(said.contains("within 1000 ms"), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "PAUSE answered after {:?}",
        started.elapsed()
    );
    admin.simple_query("RESUME").expect("RESUME");
    held.commit().unwrap();
}

/// KILL of a database at once after its first client connected: pgprism knows the database
/// from the moment the client's pool was made, on any shard, not from the console's
/// snapshots (published every 250 ms; before, the KILL was "no such database" unless one
/// happened to fall in between, some one time in ten; three databases make a pass by luck
/// about one in a thousand). PAUSE likewise; a name never seen is still an error.
#[test]
fn kill_right_after_a_databases_first_client_closes_it() {
    let pg = start_primary("pool-kill-first");
    for db in ["k1", "k2", "k3", "p1"] {
        pg.psql(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let (proxy, _dir) = pooled(&pg.url(), 2, "");
    let mut admin = console(&proxy);
    let connect = |db: &str| {
        postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=10",
                proxy.port()
            ),
            postgres::NoTls,
        )
        .unwrap()
    };
    for db in ["k1", "k2", "k3"] {
        let mut c = connect(db);
        admin
            .simple_query(&format!("KILL {db}"))
            .unwrap_or_else(|e| panic!("KILL {db} right after its first client: {e:?}"));
        assert!(
            eventually(WAIT, || c.batch_execute("SELECT 1").is_err()),
            "{db}'s client was closed"
        );
    }
    let mut p = connect("p1");
    admin
        .simple_query("PAUSE p1")
        .unwrap_or_else(|e| panic!("PAUSE p1 right after its first client: {e:?}"));
    admin.simple_query("RESUME p1").expect("RESUME p1");
    p.batch_execute("SELECT 1").expect("p1 served after RESUME");
    for command in ["KILL nosuchdb", "PAUSE nosuchdb", "RECONNECT nosuchdb"] {
        let said = admin
            .simple_query(command)
            .err()
            .and_then(|e| e.as_db_error().map(|d| d.message().to_string()));
        assert_eq!(
            said.as_deref(),
            Some("no such database: nosuchdb"),
            "{command}"
        );
    }
}

/// Logs in to `db` as `user`; when refused, the SQLSTATE and message the client got.
fn login(proxy: &Proxy, user: &str, db: &str) -> Result<postgres::Client, (String, String)> {
    postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
            proxy.port()
        ),
        postgres::NoTls,
    )
    .map_err(|e| {
        let message = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        (sqlstate(&e).unwrap_or_default(), message)
    })
}

/// The (database, user) of every row of SHOW POOLS but the console's own.
fn pool_pairs(console: &mut postgres::Client) -> Vec<(String, String)> {
    console
        .simple_query("SHOW POOLS")
        .expect("SHOW POOLS")
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get("database")?.to_string(), r.get("user")?.to_string()))
            }
            _ => None,
        })
        .filter(|(db, _)| db != "pgbouncer" && db != "pgprism")
        .collect()
}

/// What the console answers `command` with when it refuses it.
fn console_refusal(console: &mut postgres::Client, command: &str) -> Option<String> {
    console
        .simple_query(command)
        .err()
        .and_then(|e| e.as_db_error().map(|d| d.message().to_string()))
}

/// Issue 14: a client naming a database (or user) that does not exist left a pool for that
/// pair on its shard and its budget in the map the shards share, for good, so that clients
/// could grow pgprism without limit. Now each such login gets the server's error and leaves
/// nothing behind: under `pool.pairs-max = 5`, fifty such names in a row are each answered
/// with the server's 3D000 (five kept pairs would have made the sixth 53300), the console
/// knows none of them (`KILL` reads the shared map), SHOW POOLS lists none, and a real
/// database still logs in. Two shards: the map is the process's.
#[test]
fn logins_to_databases_that_do_not_exist_leave_no_pool_behind() {
    let pg = start_primary("pool-no-such-db");
    pg.psql("CREATE DATABASE app").unwrap();
    let dir = TempDir::new("pool-pairs");
    let config = dir.join("pgprism.toml");
    std::fs::write(
        &config,
        "[pool]\npairs-max = 5\nadmin-users = [\"postgres\"]\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let proxy = Proxy::start(
        &pg.url(),
        &[
            "--pool-mode",
            "transaction",
            "--auth-type",
            "trust",
            "--config",
            &config,
        ],
    );
    for i in 0..50 {
        let db = format!("nosuch_{i}");
        let Err((code, message)) = login(&proxy, "postgres", &db) else {
            panic!("{db} logged in");
        };
        assert_eq!(code, "3D000", "{db}: {message}");
    }
    for i in 0..5 {
        let user = format!("nobody_{i}");
        let Err((code, message)) = login(&proxy, &user, "app") else {
            panic!("{user} logged in");
        };
        assert_eq!(code, "28000", "{user}: {message}");
    }
    let mut admin = console(&proxy);
    for db in ["nosuch_0", "nosuch_49"] {
        assert_eq!(
            console_refusal(&mut admin, &format!("KILL {db}")).as_deref(),
            Some(format!("no such database: {db}").as_str()),
            "KILL {db}"
        );
    }
    let mut app = login(&proxy, "postgres", "app").expect("app logs in");
    app.batch_execute("SELECT 1").expect("app serves");
    // The shards publish what SHOW POOLS shows every 250 ms.
    let mut pairs = Vec::new();
    assert!(
        eventually(WAIT, || {
            pairs = pool_pairs(&mut admin);
            pairs == [("app".to_string(), "postgres".to_string())]
        }),
        "SHOW POOLS lists app's pool alone, saw {pairs:?}"
    );
    // Shards report to /metrics every second.
    assert!(
        eventually(WAIT, || proxy.metric("pgprism_pool_pairs_removed_total")
            >= 55),
        "55 pools let go, counted {}",
        proxy.metric("pgprism_pool_pairs_removed_total")
    );
}

/// `pool.pairs-max` bounds the (user, database) pairs: with 3, three databases log in and a
/// fourth, or a new user on one of them, is refused with 53300 naming the key and counted,
/// while the three go on working and more clients of them still log in.
#[test]
fn a_pair_beyond_pairs_max_is_refused_with_53300() {
    let pg = start_primary("pool-pairs-max");
    for db in ["p1", "p2", "p3", "p4"] {
        pg.psql(&format!("CREATE DATABASE {db}")).unwrap();
    }
    pg.psql("CREATE ROLE other LOGIN").unwrap();
    let (proxy, _dir) = pooled(&pg.url(), 2, "pairs-max = 3\n");
    let mut clients: Vec<postgres::Client> = ["p1", "p2", "p3"]
        .iter()
        .map(|db| {
            let mut c = login(&proxy, "postgres", db).unwrap_or_else(|e| panic!("{db}: {e:?}"));
            c.batch_execute("SELECT 1").expect("served");
            c
        })
        .collect();
    for (user, db) in [("postgres", "p4"), ("other", "p1")] {
        let Err((code, message)) = login(&proxy, user, db) else {
            panic!("{user}@{db} logged in beyond pool.pairs-max");
        };
        assert_eq!(code, "53300", "{user}@{db}: {message}");
        assert!(
            message.contains("pool.pairs-max"),
            "{user}@{db}: the message names the key: {message}"
        );
    }
    for c in &mut clients {
        let one: i32 = c.query_one("SELECT 1", &[]).expect("still served").get(0);
        assert_eq!(one, 1);
    }
    let mut again = login(&proxy, "postgres", "p2").expect("a known pair's new client");
    again.batch_execute("SELECT 1").expect("served");
    assert!(
        eventually(WAIT, || proxy.metric("pgprism_pool_pairs_refused_total")
            == 2),
        "two refusals counted, saw {}",
        proxy.metric("pgprism_pool_pairs_refused_total")
    );
}

/// A pair nothing uses goes after `pool.pair-idle-timeout-ms`, from SHOW POOLS and from the
/// shared map, and comes back with its next client. app2's client leaves at once, app's
/// stays: once app2's pool has gone (its connection closed by `server-idle-timeout-ms`,
/// then 300 ms unused), app's connection has closed too, yet its client keeps the pair
/// there. Under `pairs-max = 2` a third database then fits and app2, beyond the bound now,
/// is refused; once the others leave, app2 logs in again.
#[test]
fn a_pair_unused_past_its_idle_timeout_goes_and_comes_back() {
    let pg = start_primary("pool-pair-idle");
    for db in ["app", "app2", "app3"] {
        pg.psql(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let (proxy, _dir) = pooled(
        &pg.url(),
        2,
        "pairs-max = 2\nserver-idle-timeout-ms = 200\npair-idle-timeout-ms = 300\n",
    );
    let mut admin = console(&proxy);
    let served = |c: &mut postgres::Client| {
        let one: i32 = c.query_one("SELECT 1", &[]).expect("served").get(0);
        assert_eq!(one, 1);
    };
    let mut a = login(&proxy, "postgres", "app").expect("app logs in");
    served(&mut a);
    let mut b = login(&proxy, "postgres", "app2").expect("app2 logs in");
    served(&mut b);
    drop(b);
    let listed = |admin: &mut postgres::Client, db: &str| {
        pool_pairs(admin).iter().any(|(name, _)| name == db)
    };
    assert!(
        eventually(WAIT, || !listed(&mut admin, "app2")),
        "app2's pool left SHOW POOLS"
    );
    // app's connection, last used before app2's, closed no later.
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 0),
        "app's connection closed"
    );
    assert_eq!(
        pool_column(&mut admin, "app", "cl_active"),
        Some(1),
        "app's client keeps its pair"
    );
    let mut c = login(&proxy, "postgres", "app3").expect("app3 fits once app2's pair went");
    served(&mut c);
    let refused = login(&proxy, "postgres", "app2").err().map(|e| e.0);
    assert_eq!(refused.as_deref(), Some("53300"), "app2 beyond pairs-max");
    served(&mut a);
    drop(a);
    drop(c);
    let mut again = None;
    assert!(
        eventually(WAIT, || {
            again = login(&proxy, "postgres", "app2").ok();
            again.is_some()
        }),
        "app2 logs in again once another pair went"
    );
    served(again.as_mut().expect("checked above"));
    assert!(
        eventually(WAIT, || pool_column(&mut admin, "app2", "cl_active")
            == Some(1)),
        "app2's pool back in SHOW POOLS"
    );
}

/// A console SET reaches every shard, not only the console's own (the others take it at their
/// next care tick). Two shards, each with a client in a transaction and an idle connection
/// beside it; one transaction ends. A lowered `default_pool_size` (3 -> 1) is seen when the
/// pair's connections fall to the one still lent: each shard closes only its own idle
/// connections, so both took the SET. Then a lowered `query_wait_timeout` gives a waiting
/// client of each shard 53300 after 1 s, not the 60 s its shard started with.
#[test]
fn console_set_takes_effect_on_every_shard() {
    let pg = start_primary("pool-set-shards");
    pg.psql("CREATE DATABASE app").unwrap();
    let (proxy, _dir) = pooled_on(
        &pg.url(),
        2,
        "query-wait-timeout-ms = 60000\n",
        &["--pool-size", "4", "--auth-type", "trust"],
    );
    let mut admin = console(&proxy);
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=10",
        proxy.port()
    );
    let clients = support::clients_by_shard::<2, _>(&mut admin, "app", 1, || {
        postgres::Client::connect(&conninfo, postgres::NoTls).unwrap()
    });
    // And one raw client on each shard (read raw: 53300 is a FATAL, and the postgres crate
    // reports a FATAL followed by the close as a bare close).
    let waiters = support::clients_by_shard::<2, _>(&mut admin, "app", 1, || {
        let mut s = std::net::TcpStream::connect(proxy.listen).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&raw::startup("postgres", "app")).unwrap();
        let msgs = raw::read_until_ready(&mut s);
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "startup: {msgs:?}");
        s
    });
    let [mut first, mut second] = clients.map(|mut c| c.swap_remove(0));
    let [mut one, mut two] = waiters.map(|mut w| w.swap_remove(0));
    let mut held = first.transaction().unwrap();
    held.batch_execute("SELECT 1").unwrap();
    let mut ended = second.transaction().unwrap();
    ended.batch_execute("SELECT 1").unwrap();
    // Each shard's transaction holds a connection there: the raw clients' statements open
    // one more on each shard, idle once answered.
    for waiter in [&mut one, &mut two] {
        waiter
            .write_all(&raw::message(b'Q', b"SELECT 1\0"))
            .unwrap();
        let msgs = raw::read_until_ready(waiter);
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "SELECT 1: {msgs:?}");
    }
    ended.commit().unwrap();
    assert_eq!(backends(&pg, "app"), 4, "two connections on each shard");

    for set in ["SET query_wait_timeout = 1", "SET default_pool_size = 1"] {
        admin
            .simple_query(set)
            .unwrap_or_else(|e| panic!("{set}: {e:?}"));
    }
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 1),
        "both shards closed their idle connections beyond the new bound: {} left",
        backends(&pg, "app")
    );
    for (shard, waiter) in [&mut one, &mut two].into_iter().enumerate() {
        let started = Instant::now();
        waiter
            .write_all(&raw::message(b'Q', b"SELECT 1\0"))
            .unwrap();
        let (tag, body) = raw::read_message(waiter)
            .unwrap_or_else(|| panic!("shard {shard}: no answer within 20 s"));
        assert_eq!(tag, b'E', "shard {shard}");
        assert_eq!(raw::error_field(&body, b'C').as_deref(), Some("53300"));
        let message = raw::error_field(&body, b'M').unwrap_or_default();
        assert!(message.contains("(1000 ms)"), "shard {shard}: {message}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "shard {shard}: 53300 after {:?}",
            started.elapsed()
        );
    }
    held.commit().unwrap();
    // The last client's connection may have to be opened anew on its shard: no 1 s bound.
    admin.simple_query("SET query_wait_timeout = 60").unwrap();
    second.batch_execute("SELECT 1").expect("served again");
}

/// Console SET of a smaller `default_pool_size` while clients wait for the pool: the
/// connections that come back beyond the new bound are closed rather than handed to the next
/// waiting client, so the server's count falls to the new size, and stays there, while every
/// client keeps being served. (Before, they went from client to client and the pair stayed
/// at 4 until their lifetime ran out, an hour by default.)
#[test]
fn a_lowered_pool_size_is_reached_under_load() {
    let pg = start_primary("pool-set-shrink");
    pg.psql("CREATE DATABASE app").unwrap();
    let (proxy, _dir) = pooled(&pg.url(), 4, "query-wait-timeout-ms = 60000\n");
    let mut admin = console(&proxy);
    const CLIENTS: usize = 8;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app connect_timeout=10",
        proxy.port()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (conninfo, stop, served) = (conninfo.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || -> Result<(), postgres::Error> {
                let mut c = postgres::Client::connect(&conninfo, postgres::NoTls)?;
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = c.transaction()?;
                    // Held a while, so that clients wait for the pool.
                    tx.batch_execute("SELECT pg_sleep(0.02)")?;
                    tx.commit()?;
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    assert!(
        eventually(WAIT, || backends(&pg, "app") == 4
            && pool_column(&mut admin, "app", "cl_waiting")
                .is_some_and(|n| n > 0)),
        "the pool at its bound of 4 with clients waiting: {} connections",
        backends(&pg, "app")
    );
    admin
        .simple_query("SET default_pool_size = 2")
        .expect("SET default_pool_size");
    assert!(
        eventually(WAIT, || backends(&pg, "app") <= 2),
        "the pair down to the new bound of 2, saw {}",
        backends(&pg, "app")
    );
    // And it stays within it while the clients go on being served.
    let before = served.load(Ordering::Relaxed);
    let (mut most, mut samples) = (0, 0);
    assert!(
        eventually(WAIT, || {
            most = most.max(backends(&pg, "app"));
            samples += 1;
            samples >= 5 && served.load(Ordering::Relaxed) >= before + 50
        }),
        "clients served after the SET: {}",
        served.load(Ordering::Relaxed) - before
    );
    assert!(most <= 2, "the pair went back to {most} connections");
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client
            .join()
            .expect("client")
            .expect("every transaction served");
    }
}

/// A user a console SET adds to `stats_users` logs in to the console at once, whichever shard
/// takes the connection: the login check reads the console's configuration, not the shard's
/// copy (which follows at its next care tick; a login there before it was "not allowed").
/// Ten rounds, each with a new user, one login each, on two shards: a login on the other
/// shard within its tick's 50 ms is all but certain.
#[test]
fn a_user_set_adds_logs_in_to_the_console_at_once_on_every_shard() {
    let pg = start_primary("pool-set-login");
    let (proxy, _dir) = pooled_on(
        &pg.url(),
        2,
        "",
        &["--pool-size", "2", "--auth-type", "trust"],
    );
    let mut admin = console(&proxy);
    for round in 0..10 {
        let user = format!("watcher{round}");
        admin
            .simple_query(&format!("SET stats_users = '{user}'"))
            .expect("SET stats_users");
        let mut watcher = postgres::Client::connect(
            &format!(
                "host=127.0.0.1 port={} user={user} dbname=pgbouncer connect_timeout=10",
                proxy.port()
            ),
            postgres::NoTls,
        )
        .unwrap_or_else(|e| panic!("{user} right after the SET: {e:?}"));
        watcher.simple_query("SHOW POOLS").expect("SHOW POOLS");
    }
}

/// Console SET of a smaller `max_prepared_statements`: a connection holding more statements
/// than the new bound closes its least recently used ones down to it the next time it
/// prepares one (before, one per prepare: it stayed above the bound), and a client whose
/// statement was closed still runs it (prepared again).
#[test]
fn a_lowered_prepared_statements_bound_shrinks_a_connections_statements() {
    let pg = start_primary("pool-set-prepared");
    let (proxy, _dir) = pooled(&pg.url(), 1, "");
    let mut admin = console(&proxy);
    let mut c = proxy.client();
    // Counted through the simple protocol: no statement of its own.
    let on_server = |c: &mut postgres::Client| -> usize {
        c.simple_query("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgprism%'")
            .unwrap()
            .into_iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                _ => None,
            })
            .unwrap_or(usize::MAX)
    };
    let statements: Vec<_> = (0..6)
        .map(|i| c.prepare(&format!("SELECT {i} + $1::int")).unwrap())
        .collect();
    assert_eq!(on_server(&mut c), 6, "one connection holds all six");
    admin
        .simple_query("SET max_prepared_statements = 2")
        .expect("SET max_prepared_statements");
    let seventh = c.prepare("SELECT 7 + $1::int").unwrap();
    assert_eq!(on_server(&mut c), 2, "down to the new bound at once");
    for (i, st) in statements.iter().enumerate() {
        let v: i32 = c.query_one(st, &[&1i32]).unwrap().get(0);
        assert_eq!(v, i as i32 + 1);
        assert!(
            on_server(&mut c) <= 2,
            "within the bound after statement {i}"
        );
    }
    let v: i32 = c.query_one(&seventh, &[&1i32]).unwrap().get(0);
    assert_eq!(v, 8);
}
