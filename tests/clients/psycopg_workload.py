"""A psycopg2 application's habits, run by tests/clients.rs through pgprism: password
authentication, client-side parameters, executemany, named (server-side) cursors, COPY both
ways, SQLSTATEs, notices, LISTEN/NOTIFY and non-ASCII text.

    /usr/bin/python3 psycopg_workload.py DSN TABLE

Prints `key=value` lines; the test asserts them."""

import io
import select
import sys

import psycopg2
import psycopg2.errors

dsn, table = sys.argv[1], sys.argv[2]
conn = psycopg2.connect(dsn)
cur = conn.cursor()
cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score float8)")
cur.executemany(
    f"INSERT INTO {table} VALUES (%s, %s, %s)",
    [(i, f"n{i} \u00fc\u65e5", i / 4) for i in range(1, 101)],
)
conn.commit()

with conn.cursor(name="big") as named:
    named.itersize = 9
    named.execute(f"SELECT id, name FROM {table} ORDER BY id")
    rows = list(named)
conn.commit()
print(f"named_rows={len(rows)} first_name={rows[0][1].encode().hex()}")

data = io.StringIO("".join(f"{i}\tc{i}\t{i}.5\n" for i in range(1000, 2000)))
cur.copy_expert(f"COPY {table} FROM STDIN", data)
conn.commit()
out = io.StringIO()
cur.copy_expert(f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT", out)
print(f"copy_out_lines={len(out.getvalue().splitlines())}")

try:
    cur.execute(f"INSERT INTO {table} VALUES (1, 'dup', 0)")
except psycopg2.Error as e:
    print(f"duplicate_state={e.pgcode}")
conn.rollback()

cur.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
conn.commit()
print(f"notice={'hello from plpgsql' in ''.join(conn.notices)}")

listener = psycopg2.connect(dsn)
listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
listener.cursor().execute("LISTEN pgprism_test")
cur.execute("NOTIFY pgprism_test, 'payload 42'")
conn.commit()
payload = None
for _ in range(100):
    if select.select([listener], [], [], 0.1) != ([], [], []):
        listener.poll()
        if listener.notifies:
            payload = listener.notifies.pop(0).payload
            break
print(f"notify={payload}")
listener.close()

cur.execute(f"SELECT count(*), sum(id), sum(score) FROM {table}")
count, ids, score = cur.fetchone()
print(f"count={count} total={ids} score={score}")
conn.close()
