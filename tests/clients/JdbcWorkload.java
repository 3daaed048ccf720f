// A JDBC application's habits, run by tests/clients.rs through pgprism with the PostgreSQL
// JDBC driver (Debian package libpostgresql-jdbc-java): password authentication, server-side
// prepared statements past prepareThreshold with binary transfer, batches, transactions and
// rollback, fetch-size cursors (portal suspension), SQLSTATEs, COPY in and out.
//
//   java -cp /usr/share/java/postgresql.jar JdbcWorkload.java URL USER PASSWORD TABLE
//
// Prints `key=value` lines; the test asserts them.

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class JdbcWorkload {
    public static void main(String[] args) throws Exception {
        String url = args[0], user = args[1], password = args[2], table = args[3];
        try (Connection c = DriverManager.getConnection(url, user, password)) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE " + table
                        + " (id int PRIMARY KEY, name text, amount numeric(12,2), data bytea)");
            }
            // Past prepareThreshold the driver switches to a named server-side statement and
            // binary parameters.
            int inserted = 0;
            try (PreparedStatement p = c.prepareStatement(
                    "INSERT INTO " + table + " (id, name, amount, data) VALUES (?, ?, ?, ?)")) {
                for (int i = 1; i <= 20; i++) {
                    p.setInt(1, i);
                    p.setString(2, "name " + i + " \u00e9\u00e8");
                    p.setBigDecimal(3, new BigDecimal(i + ".25"));
                    p.setBytes(4, new byte[] {(byte) i, 0, (byte) 255});
                    inserted += p.executeUpdate();
                }
            }
            System.out.println("inserted=" + inserted);
            int batched = 0;
            try (PreparedStatement p = c.prepareStatement(
                    "INSERT INTO " + table + " (id, name, amount) VALUES (?, ?, ?)")) {
                for (int i = 100; i < 200; i++) {
                    p.setInt(1, i);
                    p.setString(2, "batch " + i);
                    p.setBigDecimal(3, new BigDecimal(i));
                    p.addBatch();
                }
                for (int n : p.executeBatch()) {
                    batched += n;
                }
            }
            System.out.println("batched=" + batched);
            long sum = 0;
            try (PreparedStatement p = c.prepareStatement(
                    "SELECT amount FROM " + table + " WHERE id = ?")) {
                for (int i = 1; i <= 20; i++) {
                    p.setInt(1, i);
                    try (ResultSet r = p.executeQuery()) {
                        r.next();
                        sum += r.getBigDecimal(1).movePointRight(2).longValueExact();
                    }
                }
            }
            System.out.println("selected_cents=" + sum);
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("INSERT INTO " + table + " (id, name) VALUES (1000, 'rolled back')");
                c.rollback();
                s.executeUpdate("INSERT INTO " + table + " (id, name) VALUES (1001, 'committed')");
                c.commit();
                // A fetch size inside a transaction: the portal is suspended and resumed.
                s.setFetchSize(7);
                int fetched = 0;
                long ids = 0;
                try (ResultSet r = s.executeQuery("SELECT id FROM " + table + " ORDER BY id")) {
                    while (r.next()) {
                        fetched++;
                        ids += r.getInt(1);
                    }
                }
                c.commit();
                System.out.println("fetched=" + fetched + " id_sum=" + ids);
                try {
                    s.executeUpdate("INSERT INTO " + table + " (id) VALUES (1)");
                } catch (SQLException e) {
                    System.out.println("duplicate_state=" + e.getSQLState());
                }
                try {
                    s.executeQuery("SELECT 1");
                } catch (SQLException e) {
                    System.out.println("aborted_state=" + e.getSQLState());
                }
                c.rollback();
            }
            c.setAutoCommit(true);
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder csv = new StringBuilder();
            for (int i = 2000; i < 3000; i++) {
                csv.append(i).append(",copied ").append(i).append(',').append(i % 97).append('\n');
            }
            long copiedIn = copy.copyIn("COPY " + table + " (id, name, amount) FROM STDIN WITH (FORMAT csv)",
                    new StringReader(csv.toString()));
            System.out.println("copy_in=" + copiedIn);
            StringWriter out = new StringWriter();
            long copiedOut = copy.copyOut("COPY (SELECT id, name FROM " + table + " ORDER BY id) TO STDOUT", out);
            System.out.println("copy_out=" + copiedOut + " copy_lines=" + out.toString().split("\n").length);
            try (Statement s = c.createStatement();
                 ResultSet r = s.executeQuery("SELECT count(*), sum(id) FROM " + table)) {
                r.next();
                System.out.println("count=" + r.getLong(1) + " total=" + r.getLong(2));
            }
        }
    }
}
