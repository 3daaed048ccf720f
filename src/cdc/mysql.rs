//! Just enough of the MySQL client protocol to run one statement on the StarRocks FE (query
//! port, 9030 by default): StarRocks has no HTTP way to empty a table, so a TRUNCATE in
//! PostgreSQL becomes `TRUNCATE TABLE` here. Handshake v10, `mysql_native_password`
//! (with the auth-switch request), COM_QUERY, OK/ERR. Blocking; loader thread only.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
const PACKET_BYTES_MAX: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    #[error("cannot reach the StarRocks FE query port {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("StarRocks FE connection failed")]
    Io(#[from] std::io::Error),
    #[error("StarRocks error {code} ({state}): {message}")]
    Server {
        code: u16,
        state: String,
        message: String,
    },
    #[error("unexpected answer from the StarRocks FE: {0}")]
    Protocol(&'static str),
}

pub struct Mysql {
    stream: TcpStream,
    seq: u8,
}

impl Mysql {
    pub fn connect(
        host: &str,
        port: u16,
        user: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<Mysql, MysqlError> {
        let addr = format!("{host}:{port}");
        let err = |source| MysqlError::Connect {
            addr: addr.clone(),
            source,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))?;
        let stream = TcpStream::connect_timeout(&sock, timeout).map_err(err)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut conn = Mysql { stream, seq: 0 };
        let hello = conn.read_packet()?;
        let (scramble, plugin) = parse_handshake(&hello)?;
        let mut resp = Vec::with_capacity(128);
        let caps = CLIENT_LONG_PASSWORD
            | CLIENT_PROTOCOL_41
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH;
        resp.extend_from_slice(&caps.to_le_bytes());
        resp.extend_from_slice(&(PACKET_BYTES_MAX as u32).to_le_bytes());
        resp.push(33); // utf8_general_ci
        resp.extend_from_slice(&[0; 23]);
        resp.extend_from_slice(user.as_bytes());
        resp.push(0);
        let auth = native_password(password, &scramble);
        resp.push(auth.len() as u8);
        resp.extend_from_slice(&auth);
        resp.extend_from_slice(plugin.as_bytes());
        resp.push(0);
        conn.write_packet(&resp)?;
        let mut answer = conn.read_packet()?;
        if answer.first() == Some(&0xFE) && answer.len() > 1 {
            // Auth switch: plugin name, then a new scramble.
            let rest = &answer[1..];
            let end = memchr::memchr(0, rest).ok_or(MysqlError::Protocol("auth switch"))?;
            let data = rest[end + 1..]
                .strip_suffix(&[0])
                .unwrap_or(&rest[end + 1..]);
            conn.write_packet(&native_password(password, data))?;
            answer = conn.read_packet()?;
        }
        check_ok(&answer)?;
        Ok(conn)
    }

    /// Runs one statement that returns no rows.
    pub fn execute(&mut self, sql: &str) -> Result<(), MysqlError> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(sql.len() + 1);
        packet.push(0x03);
        packet.extend_from_slice(sql.as_bytes());
        self.write_packet(&packet)?;
        let answer = self.read_packet()?;
        check_ok(&answer)
    }

    /// Runs one statement and returns its text result set: the column names and the rows
    /// (at most `ROWS_MAX`; NULL is `None`). A statement without rows gives none. For
    /// StarRocks' own metadata (columns, jobs, transactions: ASCII names and states); a
    /// value that is not UTF-8 is decoded lossily here, so values read to be written back
    /// go through [`Mysql::query_raw`].
    pub fn query(&mut self, sql: &str) -> Result<ResultSet, MysqlError> {
        let (names, rows) = self.query_raw(sql)?;
        let rows = rows
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect();
        Ok((names, rows))
    }

    /// [`Mysql::query`] with the values as the bytes StarRocks sent (a string column may
    /// hold bytes that are not UTF-8: written by another loader, or by a CSV load).
    pub fn query_raw(&mut self, sql: &str) -> Result<RawResultSet, MysqlError> {
        self.seq = 0;
        let mut packet = Vec::with_capacity(sql.len() + 1);
        packet.push(0x03);
        packet.extend_from_slice(sql.as_bytes());
        self.write_packet(&packet)?;
        let first = self.read_packet()?;
        if matches!(first.first(), Some(0x00 | 0xFF)) {
            check_ok(&first)?;
            return Ok((Vec::new(), Vec::new()));
        }
        let mut cur = &first[..];
        let count = lenenc_int(&mut cur).ok_or(MysqlError::Protocol("column count"))?;
        if count > 4096 {
            return Err(MysqlError::Protocol("too many columns"));
        }
        let mut names = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let def = self.read_packet()?;
            let mut cur = &def[..];
            // catalog, schema, table, org_table, then the name.
            let mut name = None;
            for _ in 0..5 {
                name = lenenc_str(&mut cur);
            }
            let name = name.ok_or(MysqlError::Protocol("column definition"))?;
            names.push(name);
        }
        let eof = self.read_packet()?;
        if !is_eof(&eof) {
            return Err(MysqlError::Protocol("expected EOF after the columns"));
        }
        let mut rows = Vec::new();
        loop {
            let row = self.read_packet()?;
            if is_eof(&row) {
                break;
            }
            if row.first() == Some(&0xFF) {
                check_ok(&row)?;
            }
            if rows.len() >= ROWS_MAX {
                return Err(MysqlError::Protocol("result set too large"));
            }
            let mut cur = &row[..];
            let mut values = Vec::with_capacity(names.len());
            for _ in 0..names.len() {
                if cur.first() == Some(&0xFB) {
                    cur = &cur[1..];
                    values.push(None);
                } else {
                    let v = lenenc_bytes(&mut cur).ok_or(MysqlError::Protocol("row"))?;
                    values.push(Some(v.to_vec()));
                }
            }
            rows.push(values);
        }
        Ok((names, rows))
    }

    /// One payload. A payload of 2^24 - 1 bytes or more comes split into full packets and a
    /// shorter last one (a result row holding a large TOAST value read back for `fill`);
    /// they are joined, up to [`PAYLOAD_BYTES_MAX`].
    fn read_packet(&mut self) -> Result<Vec<u8>, MysqlError> {
        const FULL: usize = 0xFF_FFFF;
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; 4];
            self.stream.read_exact(&mut head)?;
            let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
            self.seq = head[3].wrapping_add(1);
            if body.len() + len > PAYLOAD_BYTES_MAX {
                return Err(MysqlError::Protocol("answer larger than 1 GiB"));
            }
            let start = body.len();
            body.resize(start + len, 0);
            self.stream.read_exact(&mut body[start..])?;
            if len < FULL {
                return Ok(body);
            }
        }
    }

    fn write_packet(&mut self, body: &[u8]) -> Result<(), MysqlError> {
        if body.len() >= PACKET_BYTES_MAX {
            return Err(MysqlError::Protocol("statement too large"));
        }
        let len = body.len() as u32;
        let mut packet = Vec::with_capacity(body.len() + 4);
        packet.extend_from_slice(&len.to_le_bytes()[..3]);
        packet.push(self.seq);
        packet.extend_from_slice(body);
        self.stream.write_all(&packet)?;
        self.seq = self.seq.wrapping_add(1);
        Ok(())
    }
}

/// A text result set: column names, then rows (NULL is `None`).
pub type ResultSet = (Vec<String>, Vec<Vec<Option<String>>>);

/// [`ResultSet`] with the values as sent.
pub type RawResultSet = (Vec<String>, Vec<Vec<Option<Vec<u8>>>>);

/// The largest payload read: one result row holds at most a key and a few values of at most
/// 1 GB each (PostgreSQL's largest value), and pgprism reads values one row per payload.
const PAYLOAD_BYTES_MAX: usize = 1 << 30;

/// Rows one [`Mysql::query`] takes (pgprism asks only for a table's columns or jobs).
const ROWS_MAX: usize = 100_000;

/// An EOF packet (0xFE and under 9 bytes; a longer 0xFE packet is data).
fn is_eof(p: &[u8]) -> bool {
    p.first() == Some(&0xFE) && p.len() < 9
}

/// A length-encoded integer, advancing `cur`.
fn lenenc_int(cur: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = cur.split_first()?;
    let (n, width) = match first {
        0..=0xFA => (u64::from(first), 0),
        0xFC => (0, 2),
        0xFD => (0, 3),
        0xFE => (0, 8),
        _ => return None,
    };
    if width == 0 {
        *cur = rest;
        return Some(n);
    }
    let bytes = rest.get(..width)?;
    let mut buf = [0u8; 8];
    buf[..width].copy_from_slice(bytes);
    *cur = &rest[width..];
    Some(u64::from_le_bytes(buf))
}

/// A length-encoded string, advancing `cur` (NULL, 0xFB, is the caller's to check).
fn lenenc_bytes<'a>(cur: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(lenenc_int(cur)?).ok()?;
    let bytes = cur.get(..len)?;
    *cur = &cur[len..];
    Some(bytes)
}

/// [`lenenc_bytes`] as text (column names).
fn lenenc_str(cur: &mut &[u8]) -> Option<String> {
    lenenc_bytes(cur).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn parse_handshake(p: &[u8]) -> Result<(Vec<u8>, String), MysqlError> {
    let bad = MysqlError::Protocol("malformed handshake");
    if p.first() != Some(&10) {
        return Err(check_ok(p).err().unwrap_or(bad));
    }
    let rest = &p[1..];
    let end = memchr::memchr(0, rest).ok_or(MysqlError::Protocol("malformed handshake"))?;
    let rest = &rest[end + 1..];
    // connection id (4), scramble part 1 (8), filler (1), caps (2), charset (1), status (2),
    // caps high (2), auth data length (1), reserved (10), scramble part 2, plugin name.
    if rest.len() < 31 {
        return Err(bad);
    }
    let mut scramble = rest[4..12].to_vec();
    let auth_len = usize::from(rest[20]);
    let tail = &rest[31..];
    let part2 = auth_len.saturating_sub(8).max(13).min(tail.len());
    scramble.extend_from_slice(tail[..part2].strip_suffix(&[0]).unwrap_or(&tail[..part2]));
    let plugin_bytes = &tail[part2..];
    let plugin_end = memchr::memchr(0, plugin_bytes).unwrap_or(plugin_bytes.len());
    let plugin = String::from_utf8_lossy(&plugin_bytes[..plugin_end]).into_owned();
    let plugin = if plugin.is_empty() {
        "mysql_native_password".to_string()
    } else {
        plugin
    };
    Ok((scramble, plugin))
}

fn check_ok(p: &[u8]) -> Result<(), MysqlError> {
    match p.first() {
        Some(0x00) => Ok(()),
        Some(0xFF) if p.len() >= 3 => {
            let code = u16::from_le_bytes([p[1], p[2]]);
            let (state, message) = match p.get(3) {
                Some(b'#') if p.len() >= 9 => (
                    String::from_utf8_lossy(&p[4..9]).into_owned(),
                    String::from_utf8_lossy(&p[9..]).into_owned(),
                ),
                _ => (String::new(), String::from_utf8_lossy(&p[3..]).into_owned()),
            };
            Err(MysqlError::Server {
                code,
                state,
                message,
            })
        }
        _ => Err(MysqlError::Protocol("expected OK or ERR")),
    }
}

/// `SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password)))`; empty for no password.
pub fn native_password(password: &str, scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = sha1(password.as_bytes());
    let stage2 = sha1(&stage1);
    let mut salted = scramble.to_vec();
    salted.extend_from_slice(&stage2);
    let mix = sha1(&salted);
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

/// SHA-1 (FIPS 180-4). Only for the MySQL handshake, which requires it; not for security.
pub fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_payload_split_into_full_packets_is_joined() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let payload: Vec<u8> = (0..0xFF_FFFF + 10).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut wire = Vec::new();
            for (seq, part) in [&sent[..0xFF_FFFF], &sent[0xFF_FFFF..]].iter().enumerate() {
                wire.extend_from_slice(&(part.len() as u32).to_le_bytes()[..3]);
                wire.push(seq as u8);
                wire.extend_from_slice(part);
            }
            // Then a payload of exactly 2^24 - 1 bytes: an empty packet ends it.
            wire.extend_from_slice(&[0xFF, 0xFF, 0xFF, 2]);
            wire.extend_from_slice(&sent[..0xFF_FFFF]);
            wire.extend_from_slice(&[0, 0, 0, 3]);
            s.write_all(&wire).unwrap();
        });
        let mut conn = Mysql {
            stream: TcpStream::connect(addr).unwrap(),
            seq: 0,
        };
        assert!(conn.read_packet().unwrap() == payload);
        assert!(conn.read_packet().unwrap() == payload[..0xFF_FFFF]);
        writer.join().unwrap();
    }

    #[test]
    fn values_keep_their_bytes() {
        let mut row = Vec::new();
        row.push(3);
        row.extend_from_slice(&[b'a', 0xFF, 0xFE]);
        let mut cur = &row[..];
        assert_eq!(lenenc_bytes(&mut cur), Some(&[b'a', 0xFF, 0xFE][..]));
        assert!(cur.is_empty());
        // Cut short: no value, no panic.
        let mut cur = &row[..2];
        assert_eq!(lenenc_bytes(&mut cur), None);
    }

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(&sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(&sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }
}
