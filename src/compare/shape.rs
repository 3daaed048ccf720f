//! What compare reads of a statement's text, kept per statement *shape*: the text with its
//! plain literals masked (`WHERE aid = 41` and `WHERE aid = 7` are one shape), so a
//! workload that sends the same statements with other values (nearly all of them) reads
//! each text once in a byte pass instead of tokenizing and scanning it again.
//!
//! Ordered dispatch reads every compared statement for the relations and rows it touches
//! (see [`footprint`]), and compare whether it has a top-level ORDER BY: about 4,400 and
//! 2,200 instructions per pgbench `-S` statement, most of a transaction's growth since
//! before ordered dispatch (callgrind, benches/callgrind-ab.sh). The shape pass costs a few
//! hundred; the values are bound from the literals as the parameters of a prepared
//! statement are ([`Footprint::bind_literals`]).
//!
//! What makes a cached reading hold for every text of a shape: the key keeps every byte of
//! the text but the contents of the masked literals (and records where they were), so two
//! texts of one key tokenize alike but for those contents, and only the row probes read
//! them (as [`Value::Lit`](footprint::Value::Lit), bound per text). Masked are string
//! literals without a prefix (`'...'`, not `E'...'`) and numbers of digits only (not `1.5`
//! or `1e3`, which stay in the key); a text whose other bytes hold a comment, a dollar
//! quote or a backslash is not cached at all, since the other scanners here (ORDER BY)
//! could read those apart from the tokenizer. The order keys of an `ORDER BY` (`ORDER BY
//! 2` names a column by a number) are read from each text.
//!
//! Bounded: at most `compare.shape-cache-max` shapes per shard (then the cache starts over),
//! texts of at most [`SHAPE_TEXT_BYTES_MAX`] bytes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use super::footprint::{self, Footprint, Lits, Scan};
use crate::sql;

/// Longer texts are read each time: they are rarely repeated, and the cache's memory is
/// this times `compare.shape-cache-max` at most.
pub(crate) const SHAPE_TEXT_BYTES_MAX: usize = 2048;

/// Marks a masked string literal's contents in a key (never a byte of UTF-8 text).
const STRING: u8 = 0xff;
/// Marks a masked number in a key.
const NUMBER: u8 = 0xfe;
/// Ends the text in the key of a text of several statements; their classes follow.
const CLASSES_AFTER: u8 = 0xfd;

/// What compare reads of one statement text.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    /// It has a top-level ORDER BY.
    pub(crate) ordered: bool,
    pub(crate) scan: Scan,
}

/// A reading of a shape: its footprint with [`footprint::Value::Lit`] where a masked
/// literal's value goes.
#[derive(Debug)]
struct Template {
    ordered: bool,
    scan: Scan,
}

/// One masked literal of the text being read.
#[derive(Debug, Clone, Copy)]
struct Literal {
    start: u32,
    end: u32,
    string: bool,
}

/// The shard's shapes.
pub(crate) struct Shapes {
    max: usize,
    map: HashMap<Box<[u8]>, Rc<Template>, KeyBuild>,
    /// The key of the text being read (reused).
    key: Vec<u8>,
    literals: Vec<Literal>,
    starts: Vec<u32>,
}

impl Shapes {
    /// At most `max` shapes (0: none kept, every text is read).
    pub(crate) fn new(max: usize) -> Shapes {
        Shapes {
            max,
            map: HashMap::with_hasher(KeyBuild::default()),
            key: Vec::new(),
            literals: Vec::new(),
            starts: Vec::new(),
        }
    }

    /// What compare reads of `text` (a statement of class `class`, or several).
    pub(crate) fn read(&mut self, text: &str, class: sql::Class) -> Reading {
        if self.max == 0 || text.len() > SHAPE_TEXT_BYTES_MAX || !self.mask(text, class) {
            return Reading {
                ordered: sql::has_top_level_order_by(text.as_bytes()),
                scan: scan_all(text, class, None),
            };
        }
        let template = match self.map.get(&self.key[..]) {
            Some(t) => t.clone(),
            None => {
                self.starts.clear();
                self.starts.extend(self.literals.iter().map(|l| l.start));
                let lits = Lits {
                    base: text.as_ptr() as usize,
                    starts: &self.starts,
                };
                let template = Rc::new(Template {
                    ordered: sql::has_top_level_order_by(text.as_bytes()),
                    scan: scan_all(text, class, Some(&lits)),
                });
                if self.map.len() >= self.max {
                    // Starts over: a workload of more shapes than the bound reads its texts
                    // as if uncached, and a steady one fills it again at once.
                    self.map.clear();
                }
                self.map
                    .insert(self.key.as_slice().into(), template.clone());
                template
            }
        };
        let sql = text.as_bytes();
        let literals = &self.literals;
        let footprint = template.scan.footprint.bind_literals(|k, negative| {
            let l = literals.get(usize::from(k))?;
            let bytes = sql.get(l.start as usize..l.end as usize)?;
            if l.string {
                footprint::text_value(bytes, true)
            } else {
                footprint::number_value(bytes, negative)
            }
        });
        Reading {
            ordered: template.ordered,
            scan: Scan {
                footprint,
                nondeterministic: template.scan.nondeterministic,
            },
        }
    }

    /// Fills the key and the literals of `text`; false when it is not cached (see the
    /// module's doc).
    fn mask(&mut self, text: &str, class: sql::Class) -> bool {
        let sql = text.as_bytes();
        self.key.clear();
        self.literals.clear();
        self.key.push(class as u8);
        // `run`: the start of the bytes not copied to the key yet. `several`: a `;` outside
        // quotes with more than blanks after it (the text may hold several statements).
        let (mut run, mut i, mut several) = (0usize, 0usize, false);
        while i < sql.len() {
            let c = sql[i];
            match CLASSES[usize::from(c)] {
                PLAIN => i += 1,
                WORD => {
                    // A word (digits in it are no number): one table look-up a byte (the
                    // comparisons of `is_word_byte` cost three times as much, and words are
                    // most of a statement).
                    i += 1;
                    while i < sql.len() && CLASSES[usize::from(sql[i])] & IN_WORD != 0 {
                        i += 1;
                    }
                }
                DIGIT => {
                    // As the tokenizer reads a number: letters and points run on in it.
                    let start = i;
                    let mut digits = true;
                    while i < sql.len() {
                        let class = CLASSES[usize::from(sql[i])];
                        if class != DIGIT {
                            if !(sql[i].is_ascii_alphabetic() || sql[i] == b'.') {
                                break;
                            }
                            digits = false;
                        }
                        i += 1;
                    }
                    if digits {
                        self.key.extend_from_slice(&sql[run..start]);
                        self.key.push(NUMBER);
                        self.literals.push(Literal {
                            start: start as u32,
                            end: i as u32,
                            string: false,
                        });
                        run = i;
                    }
                }
                _ => match c {
                    b'\'' => {
                        // A prefix (E'', B'', X'', U&'', N'') reads the contents otherwise.
                        if i > 0 && (is_word_byte(sql[i - 1]) || sql[i - 1] == b'&') {
                            return false;
                        }
                        let end = sql::skip_quoted(sql, i);
                        if end < i + 2 || sql[end - 1] != b'\'' {
                            return false; // not closed
                        }
                        self.key.extend_from_slice(&sql[run..=i]);
                        self.key.push(STRING);
                        self.literals.push(Literal {
                            start: (i + 1) as u32,
                            end: (end - 1) as u32,
                            string: true,
                        });
                        run = end - 1;
                        i = end;
                    }
                    b'"' => i = sql::skip_quoted(sql, i),
                    b'$' => {
                        // `$1`, a parameter, stays; a dollar quote is not cached.
                        let mut j = i + 1;
                        while j < sql.len() && sql[j].is_ascii_digit() {
                            j += 1;
                        }
                        if j == i + 1 || sql.get(j).is_some_and(|&b| is_word_byte(b) || b == b'$') {
                            return false;
                        }
                        i = j;
                    }
                    b'-' if sql.get(i + 1) == Some(&b'-') => return false,
                    b'/' if sql.get(i + 1) == Some(&b'*') => return false,
                    b'-' | b'/' => i += 1,
                    b';' => {
                        i += 1;
                        several = several || sql[i..].iter().any(|b| !b.is_ascii_whitespace());
                    }
                    _ => return false, // a backslash
                },
            }
        }
        self.key.extend_from_slice(&sql[run..]);
        if several {
            // The class of a statement may hang on a masked literal (`EXPLAIN (ANALYZE 0)
            // DELETE ...` reads, `EXPLAIN (ANALYZE 1) DELETE ...` writes), and `class` is
            // only the first one's: the key holds every statement's, after a byte no text
            // holds.
            self.key.push(CLASSES_AFTER);
            for range in sql::split_statements(sql) {
                self.key
                    .push(sql.get(range).map_or(sql::Class::Other, sql::classify) as u8);
            }
        }
        self.literals.len() <= usize::from(u16::MAX)
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// A byte of no interest to the shape pass.
const PLAIN: u8 = 0;
/// A byte that starts a word (a letter, `_`, any byte of a non-ASCII character).
const WORD: u8 = 1;
/// A digit.
const DIGIT: u8 = 3;
/// A byte that may start a literal, a quoted name, a parameter or a comment.
const SPECIAL: u8 = 4;
/// The bit of the classes of bytes that go on a word.
const IN_WORD: u8 = 1;

/// The class of each byte.
const CLASSES: [u8; 256] = {
    let mut table = [PLAIN; 256];
    let mut b = 0usize;
    while b < 256 {
        table[b] = match b as u8 {
            b'a'..=b'z' | b'A'..=b'Z' | b'_' | 0x80..=0xff => WORD,
            b'0'..=b'9' => DIGIT,
            b'\'' | b'"' | b'$' | b'\\' | b'-' | b'/' | b';' => SPECIAL,
            _ => PLAIN,
        };
        b += 1;
    }
    table
};

/// What every statement of `text` touches (a simple Query may hold several), and the first
/// reason its result may differ by nature; a shape's when `lits` are its masked literals.
fn scan_all(text: &str, class: sql::Class, lits: Option<&Lits>) -> Scan {
    let ranges = sql::split_statements(text.as_bytes());
    if ranges.len() <= 1 {
        return footprint::scan_with(text, class, lits);
    }
    let mut all = Scan {
        footprint: Footprint::default(),
        nondeterministic: None,
    };
    for one in ranges.into_iter().filter_map(|r| text.get(r)) {
        let scan = footprint::scan_with(one, sql::classify(one.as_bytes()), lits);
        all.footprint.join(&scan.footprint);
        all.nondeterministic = all.nondeterministic.or(scan.nondeterministic);
    }
    all
}

/// The hasher of the shape map: keys are a few dozen bytes, hashed 8 at a time with one
/// folded multiply each (SipHash took about 300 instructions for a pgbench statement),
/// from a key drawn once per process so a client cannot choose texts that share buckets.
#[derive(Clone, Copy)]
struct KeyBuild(u64);

impl Default for KeyBuild {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        // std's RandomState is seeded from the OS's random source.
        KeyBuild(
            *SEED.get_or_init(|| {
                std::collections::hash_map::RandomState::new().hash_one(0x5a_u64) | 1
            }),
        )
    }
}

impl BuildHasher for KeyBuild {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

struct KeyHasher(u64);

impl KeyHasher {
    fn mix(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps `ab` and `ab\0` apart.
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statements and the literals to put in their `{}` places.
    const STATEMENTS: &[(&str, &[&[&str]])] = &[
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
            &[&["1"], &["41"], &["07"], &["1234567890123456789"], &["0"]],
        ),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + -{} WHERE aid = {};",
            &[&["1", "2"], &["300", "2"], &["5", "99"]],
        ),
        (
            "UPDATE t SET v = {} WHERE id = -{}",
            &[&["1", "2"], &["3", "0"]],
        ),
        (
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, {}, {}, -{}, CURRENT_TIMESTAMP);",
            &[&["1", "2", "3", "4"], &["5", "6", "7", "8"]],
        ),
        (
            "INSERT INTO t (a, b) VALUES ({}, '{}'), ({}, '{}')",
            &[
                &["1", "x", "2", "y"],
                &["1", "2024-01-01", "2", "y"],
                &["1", "x", "1", "x"],
            ],
        ),
        (
            "SELECT v FROM hot WHERE id = '{}' AND k = {}",
            &[
                &["3", "4"],
                &["x", "4"],
                &["3.0", "4"],
                &["0", "0"],
                &["it''s", "1"],
                &["TRUE", "9"],
            ],
        ),
        (
            "SELECT v FROM hot WHERE id = '{}' AND id = '{}'",
            &[&["3", "4"], &["3.0", "4"], &["3.0", "03"], &["a", "b"]],
        ),
        ("SELECT v FROM hot WHERE {} = id", &[&["3"], &["12"]]),
        (
            "SELECT v FROM hot WHERE id = 3.{} OR id = {}",
            &[&["5", "1"], &["0", "2"]],
        ),
        (
            "SELECT name FROM t WHERE k = {} ORDER BY {} LIMIT {}",
            &[&["1", "1", "5"], &["2", "2", "10"]],
        ),
        (
            "SELECT * FROM t WHERE k = {} LIMIT {}",
            &[&["1", "5"], &["2", "10"]],
        ),
        ("SELECT now(), v FROM t WHERE k = '{}'", &[&["a"], &["b"]]),
        (
            "BEGIN; UPDATE a SET v = {} WHERE id = {}; SELECT x FROM b WHERE k = '{}'; COMMIT",
            &[&["1", "2", "z"], &["3", "4", "y;"]],
        ),
        (
            "SELECT v FROM \"Hot\" h WHERE h.id = {} FOR UPDATE",
            &[&["1"], &["2"]],
        ),
        (
            "DELETE FROM t WHERE a = {} AND b = '{}' RETURNING *",
            &[&["1", "q"], &["2", "-"]],
        ),
        ("SELECT v FROM t2 WHERE c1 = {}", &[&["1"], &["2"]]),
        (
            "SELECT v FROM hot WHERE id = {}_000 AND k = {}abc AND j = {}.5 AND s = '{}'",
            &[&["1", "2", "3", "a\\b"], &["4", "5", "6", "x"]],
        ),
        ("SELECT 1", &[&[]]),
    ];

    fn fill(template: &str, values: &[&str]) -> String {
        let mut out = String::new();
        let mut parts = template.split("{}");
        out.push_str(parts.next().unwrap_or(""));
        for (part, value) in parts.zip(values) {
            out.push_str(value);
            out.push_str(part);
        }
        out
    }

    fn direct(text: &str) -> Reading {
        Reading {
            ordered: sql::has_top_level_order_by(text.as_bytes()),
            scan: scan_all(text, sql::classify(text.as_bytes()), None),
        }
    }

    fn same(a: &Reading, b: &Reading, text: &str) {
        assert_eq!(a.ordered, b.ordered, "{text}");
        assert_eq!(a.scan.footprint, b.scan.footprint, "{text}");
        assert_eq!(a.scan.nondeterministic, b.scan.nondeterministic, "{text}");
    }

    #[test]
    fn a_shape_read_once_reads_every_text_of_it_as_the_text_itself() {
        let mut shapes = Shapes::new(64);
        for _round in 0..2 {
            for (template, rows) in STATEMENTS {
                for values in *rows {
                    let text = fill(template, values);
                    let read = shapes.read(&text, sql::classify(text.as_bytes()));
                    same(&read, &direct(&text), &text);
                }
            }
        }
        // Every statement above was cached (one shape each, some with more: `3.5` is no
        // masked literal).
        assert!(
            shapes.map.len() >= STATEMENTS.len() - 1,
            "{}",
            shapes.map.len()
        );
        // And the values were bound: two rows of one shape are told apart.
        let one = shapes.read("SELECT v FROM hot WHERE id = 1", sql::Class::Select);
        let two = shapes.read("SELECT v FROM hot WHERE id = 2", sql::Class::Select);
        assert_ne!(one.scan.footprint, two.scan.footprint);
        assert!(!one.scan.footprint.probes.is_empty());
    }

    #[test]
    fn texts_the_shape_pass_cannot_vouch_for_are_read_whole() {
        let mut shapes = Shapes::new(64);
        for text in [
            "SELECT v FROM hot WHERE id = E'3'",
            "SELECT v FROM hot WHERE id = $$3$$",
            "SELECT v FROM hot WHERE id = 3 -- order by\n",
            "SELECT v FROM hot WHERE id = /* x */ 3",
            "SELECT v FROM hot WHERE id = '3",
            "SELECT v FROM hot WHERE id = 3 \\g",
        ] {
            let read = shapes.read(text, sql::classify(text.as_bytes()));
            same(&read, &direct(text), text);
        }
        assert!(shapes.map.is_empty());
        // A parameter is no literal: kept in the key.
        let text = "SELECT v FROM hot WHERE id = $1 AND k = 2";
        same(&shapes.read(text, sql::Class::Select), &direct(text), text);
        assert_eq!(shapes.map.len(), 1);
    }

    #[test]
    fn every_statement_of_a_text_keys_its_shape_by_its_class() {
        // The masked `0` and `1` make one key of the text; only the second statement's class
        // tells the two apart (the first one's is the same).
        let read = "SELECT 1; EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 5";
        let write = "SELECT 1; EXPLAIN (ANALYZE 1) DELETE FROM t WHERE id = 5";
        for texts in [[read, write], [write, read]] {
            let mut shapes = Shapes::new(64);
            for text in texts {
                let got = shapes.read(text, sql::classify(text.as_bytes()));
                same(&got, &direct(text), text);
            }
        }
        let mut shapes = Shapes::new(64);
        assert!(!shapes.read(read, sql::Class::Select).scan.footprint.write);
        assert!(shapes.read(write, sql::Class::Select).scan.footprint.write);
        // A `;` that ends the text, or sits in a string, keys nothing more.
        let one = "SELECT v FROM hot WHERE id = 3 AND s = 'a;b';  ";
        same(&shapes.read(one, sql::Class::Select), &direct(one), one);
        assert!(!shapes.key.contains(&CLASSES_AFTER));
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let mut shapes = Shapes::new(4);
        for n in 0..20 {
            let text = format!("SELECT v FROM t{n} WHERE id = 1");
            shapes.read(&text, sql::Class::Select);
            assert!(shapes.map.len() <= 4);
        }
        let mut none = Shapes::new(0);
        none.read("SELECT 1", sql::Class::Select);
        assert!(none.map.is_empty());
    }
}
