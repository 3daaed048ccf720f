//! The configuration reference (`pgprism config-reference`, written to
//! `docs/configuration.md`), generated from the config types themselves: every key the loader
//! accepts, with its full dotted name, TOML type, default, meaning and flag. It owns the walk
//! from [`Config`] to those keys; it must never hold a list of keys of its own, or the page
//! could drift from the loader again.
//!
//! Where each part comes from, and why:
//! - **Keys and meanings** from the `///` comments and `#[serde]` attributes of the config
//!   types, read from this module's own sources, compiled in (`include_str!`, so an installed
//!   binary prints the reference of its own build). The doc comments exist nowhere else: serde
//!   drops them, and a schema derive (schemars) would add a dependency and a second derive on
//!   every type for one page. A hand-written table checked against the types was the other
//!   choice; it would make every new key a second edit instead of one regeneration command.
//! - **Defaults** from serde: `Config::default()` serialized as the loader reads it, so a
//!   default is the value the code really uses, in the form a file spells it.
//! - **Flags** from the caller (`cli`, which owns them and finds by trial which key each flag
//!   sets; `config` is a leaf and imports no command line).
//!
//! The source reading is deliberately small: it understands the shapes the config types use
//! (`pub struct`/`pub enum` with derives, `///` docs, `#[serde(...)]`, one field per
//! declaration) and fails, naming what it did not understand, on anything else. The tests
//! below hold it to serde's view: every documented key is accepted by [`Config::parse`] and
//! lands where documented, and every key serde writes is documented.

use std::collections::{BTreeMap, BTreeSet};

use super::{Config, EmbedInstanceConfig, MirrorConfig};

/// The command that rewrites the page; named in the page and in the test that compares them.
pub const REGENERATE: &str = "cargo run -q -- config-reference > docs/configuration.md";

/// The sources of the config types (every file of `src/config` but this one; a test checks
/// the list is complete).
const SOURCES: &[(&str, &str)] = &[
    ("mod.rs", include_str!("mod.rs")),
    ("pool.rs", include_str!("pool.rs")),
    ("url.rs", include_str!("url.rs")),
    ("dns.rs", include_str!("dns.rs")),
    ("env.rs", include_str!("env.rs")),
];

/// What the reference could not be built from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceError {
    #[error("src/config/{file} line {line}: {message}")]
    Source {
        file: &'static str,
        line: usize,
        message: String,
    },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("cannot serialize the default configuration")]
    Defaults(#[source] toml::ser::Error),
}

/// One key of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Full dotted name; `[]` marks an array of tables (`mirror[].url`).
    pub key: String,
    /// TOML type, in words.
    pub kind: String,
    /// The default as TOML spells it; `None` when the key is unset by default.
    pub default: Option<toml::Value>,
    /// The field's `///` comment (or its type's), on one line; empty when it has none.
    pub meaning: String,
    /// For an enumeration: each accepted value with its meaning.
    pub values: Vec<(String, String)>,
    /// Environment variables the meaning names (`$PGPRISM_...`).
    pub env: Vec<String>,
}

/// One TOML table (`[proxy]`) or array of tables (`[[mirror]]`).
#[derive(Debug, Clone)]
pub struct Section {
    /// The header as a file spells it: `[proxy]`, `[[embed.instance]]`.
    pub header: String,
    pub doc: String,
    pub entries: Vec<Entry>,
}

/// Every section, in the order of the fields of [`Config`].
#[derive(Debug, Clone)]
pub struct Reference {
    pub sections: Vec<Section>,
}

impl Reference {
    /// Reads the config types and the defaults.
    pub fn build() -> Result<Reference, ReferenceError> {
        let types = Types::parse(SOURCES)?;
        let defaults =
            toml::Value::try_from(Config::default()).map_err(ReferenceError::Defaults)?;
        let root = types.structure("Config", "")?;
        let mut sections = Vec::new();
        for field in &root.fields {
            let Some(table) = types.table_of(&field.ty) else {
                return Err(ReferenceError::Key {
                    key: field.name.clone(),
                    message:
                        "a top-level key that is not a table: the reference has no section for it"
                            .into(),
                });
            };
            let default = match table.array {
                false => defaults.get(&field.name).cloned(),
                true => element_default(table.name),
            };
            let Some(default) = default else {
                return Err(ReferenceError::Key {
                    key: field.name.clone(),
                    message: format!(
                        "no default for a `{}`: add it to element_default in src/config/reference.rs",
                        table.name
                    ),
                });
            };
            types.walk(&field.name, field, &table, &default, &mut sections)?;
        }
        Ok(Reference { sections })
    }

    /// Every entry, section by section.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.sections.iter().flat_map(|s| s.entries.iter())
    }

    /// The Markdown page. `flags` maps a key to the flags that set it (with the commands that
    /// take them), as `cli` finds them.
    pub fn markdown(&self, flags: &BTreeMap<String, Vec<String>>) -> String {
        let mut out = String::new();
        out.push_str("# Configuration reference\n\n");
        out.push_str(&format!(
            "<!-- Generated by `pgprism config-reference` from the config types in src/config; do not edit.\n     Regenerate: {REGENERATE} -->\n\n"
        ));
        out.push_str(&format!(
            "Generated from the configuration types by `pgprism config-reference`: after adding or \
             changing a key, regenerate it with\n\n```sh\n{REGENERATE}\n```\n\n\
             (`tests/docs.rs` fails, naming the keys, while this page and the keys disagree.) \
             [Index](README.md)\n\n"
        ));
        out.push_str(INTRO);
        out.push_str("\nSections: ");
        let links: Vec<String> = self
            .sections
            .iter()
            .map(|s| format!("[`{}`](#{})", s.header, anchor(&s.header)))
            .collect();
        out.push_str(&links.join(", "));
        out.push_str(".\n");
        for section in &self.sections {
            out.push_str(&format!("\n## `{}`\n\n", section.header));
            if !section.doc.is_empty() {
                out.push_str(&section.doc);
                out.push_str("\n\n");
            }
            out.push_str("| key | type | default | flag | meaning |\n|---|---|---|---|---|\n");
            for entry in &section.entries {
                let flag = flags
                    .get(&entry.key)
                    .map(|f| f.join(", "))
                    .unwrap_or_default();
                let default = match &entry.default {
                    Some(value) => format!("`{}`{}", render(value), size_hint(&entry.key, value)),
                    None => "unset".to_string(),
                };
                let mut meaning = if entry.meaning.is_empty() {
                    "(undocumented)".to_string()
                } else {
                    entry.meaning.clone()
                };
                if !entry.values.is_empty() {
                    let values: Vec<String> = entry
                        .values
                        .iter()
                        .map(|(name, doc)| match doc.trim_end_matches('.') {
                            "" => format!("`\"{name}\"`"),
                            doc => format!("`\"{name}\"`: {doc}"),
                        })
                        .collect();
                    meaning.push_str(&format!(" Values: {}.", values.join("; ")));
                }
                if !entry.env.is_empty() {
                    meaning.push_str(&format!(" Environment: `{}`.", entry.env.join("`, `")));
                }
                out.push_str(&format!(
                    "| `{}` | {} | {} | {} | {} |\n",
                    entry.key,
                    entry.kind,
                    cell(&default),
                    cell(&flag),
                    cell(&meaning)
                ));
            }
        }
        out.push_str(EXAMPLE);
        out
    }
}

/// What every key shares; the page's introduction.
const INTRO: &str = "TOML with kebab-case keys. `${VAR}` and `${VAR:-default}` are expanded from \
the environment before parsing (`$$` is a literal `$`); command-line flags override the file. \
Unknown keys are refused, and every error names the key path (`mirror[0].url`). \
`pgprism check --config FILE` validates a file and prints the effective configuration \
(passwords masked). In the tables, `[]` marks a key of an array of tables (`mirror[].url` is \
`url` in each `[[mirror]]`); a flag column names the flags that set the key and the commands \
that take them.\n";

/// The environment pgprism reads besides `${VAR}` in the file, and a short file to start
/// from; appended to the generated tables. (Variables are read where they act, not in the
/// config types, so they are listed here; `tests/docs.rs` checks every `PGPRISM_` variable
/// the sources read appears on the page.)
const EXAMPLE: &str = "
## Environment

| variable | meaning |
|---|---|
| `RUST_LOG` | Log filter (`info`, `pgprism=debug`, ...); overrides `--log`. |
| `PGPRISM_STATE_DIR` | Where the registry of embedded servers lives when `embed.state-dir` is unset. |
| `PGPRISM_TEMPLATE_DIR` | The `initdb` template cache of embedded servers (default `/var/tmp/pgprism-templates`); a user who cannot write a cache made by root sets their own. |
| `PGPRISM_UPGRADE_FD` | Set by pgprism itself for the new process of an upgrade (`SIGUSR2`): the socket it takes the listening sockets from ([upgrade.md](upgrade.md)). Never set it by hand. |
| `PGPRISM_FAILPOINTS` | Crash tests only: CDC and upgrade failpoints, `name=action[,name=action]` with `kill`, `exit`, `exit-after-MS`, `pause-MS`, `error` or `N*action`. Unset in production. |
| `PGPRISM_TEST_SHARD_BUSY_FILE` | Tests only: a file of per-shard busy figures, `shard=percent[,shard=percent]` (`0=95,1=0`), that `client-placement = \"pack\"` placement and client rebalancing read at each look instead of the measured ones; a shard not named, or a missing or garbled file, reads as measured. The variable is looked at once, at start; unset in production. |
| `NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID` | Set by systemd: readiness (`READY=1`), stop and watchdog notifications. |

## Example

```toml
[proxy]
listen = \"0.0.0.0:6432\"
unix-socket-dir = \"/var/run/pgprism\"   # psql -h /var/run/pgprism -p 6432
shards = 0

[primary]
url = \"postgres://${PRIMARY_HOST:-127.0.0.1}:5432\"
# or, co-located: url = \"postgres:///?host=/var/run/postgresql&port=5432\"

[admin]
listen = \"127.0.0.1:9930\"

[[mirror]]
name = \"pg16\"
url = \"postgres://app:${MIRROR_PASSWORD}@db2:5432/app\"
```
";

/// The default of one element of an array of tables (serde writes none for an empty array).
fn element_default(type_name: &str) -> Option<toml::Value> {
    match type_name {
        "MirrorConfig" => toml::Value::try_from(MirrorConfig::default()).ok(),
        "EmbedInstanceConfig" => toml::Value::try_from(EmbedInstanceConfig::default()).ok(),
        _ => None,
    }
}

/// A value as a TOML file spells it, on one line.
fn render(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => toml_string(s),
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(render).collect();
            format!("[{}]", items.join(", "))
        }
        toml::Value::Table(table) => {
            let items: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{k} = {}", render(v)))
                .collect();
            match items.is_empty() {
                true => "{}".into(),
                false => format!("{{ {} }}", items.join(", ")),
            }
        }
        toml::Value::Float(f) if f.fract() == 0.0 && f.is_finite() => format!("{f:.1}"),
        other => other.to_string(),
    }
}

/// A TOML string: literal (single quotes) when it holds backslashes and no single quote, as a
/// person writes a regex; basic otherwise.
fn toml_string(s: &str) -> String {
    if s.contains('\\') && !s.contains('\'') && !s.contains('\n') {
        return format!("'{s}'");
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// ` (16 MiB)` after a byte count that is a whole number of KiB, MiB or GiB.
fn size_hint(key: &str, value: &toml::Value) -> String {
    let toml::Value::Integer(n) = value else {
        return String::new();
    };
    if !key.contains("bytes") || *n < 1024 {
        return String::new();
    }
    for (unit, size) in [("GiB", 1i64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n % size == 0 {
            return format!(" ({} {unit})", n / size);
        }
    }
    String::new()
}

/// Text safe inside a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, other punctuation dropped.
pub fn anchor(heading: &str) -> String {
    heading
        .chars()
        .filter_map(|c| match c {
            c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
            '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

/// serde's `rename_all = "kebab-case"` for a variant: a `-` before each capital but the first.
fn kebab_variant(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.char_indices() {
        if i > 0 && c.is_uppercase() {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A field of a config struct, as serde names it.
#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: String,
    doc: String,
}

#[derive(Debug, Clone)]
struct Struct {
    doc: String,
    fields: Vec<Field>,
}

#[derive(Debug, Clone)]
struct Enum {
    doc: String,
    /// serde name and doc of each variant.
    variants: Vec<(String, String)>,
}

/// A field type that is a table: a config struct, or an array of them.
struct Table<'a> {
    name: &'a str,
    array: bool,
}

/// The config types found in the sources, by name.
#[derive(Debug, Default)]
struct Types {
    structs: BTreeMap<String, Struct>,
    enums: BTreeMap<String, Enum>,
}

/// Doc lines and attributes seen before an item or a field.
#[derive(Default)]
struct Pending {
    doc: Vec<String>,
    attrs: Vec<String>,
}

impl Pending {
    fn doc(&mut self) -> String {
        let doc = self.doc.join(" ");
        self.doc.clear();
        doc.trim().to_string()
    }
}

impl Types {
    fn parse(sources: &[(&'static str, &'static str)]) -> Result<Types, ReferenceError> {
        let mut types = Types::default();
        for &(file, text) in sources {
            let lines: Vec<&str> = text.lines().collect();
            let mut pending = Pending::default();
            let mut i = 0;
            while i < lines.len() {
                let line = lines[i].trim();
                // The tests below quote config snippets; nothing of theirs is a config type.
                if line.starts_with("#[cfg(test)]") {
                    break;
                }
                if let Some(doc) = line.strip_prefix("///") {
                    pending.doc.push(doc.trim().to_string());
                } else if line.starts_with("#[") {
                    let (attr, next) = attribute(&lines, i);
                    pending.attrs.push(attr);
                    i = next;
                    continue;
                } else if let Some((is_struct, name)) = item_name(line, "struct")
                    .map(|name| (true, name))
                    .or_else(|| item_name(line, "enum").map(|name| (false, name)))
                {
                    let deserialized = derives_deserialize(&pending.attrs);
                    let kebab = renames_kebab(&pending.attrs, file, i)?;
                    let doc = pending.doc();
                    pending.attrs.clear();
                    if !deserialized {
                        i = skip_block(&lines, i);
                        continue;
                    }
                    i = if is_struct {
                        let (fields, next) = struct_body(&lines, i + 1, file, kebab)?;
                        types.structs.insert(name, Struct { doc, fields });
                        next
                    } else {
                        let (variants, next) = enum_body(&lines, i + 1, file, kebab)?;
                        types.enums.insert(name, Enum { doc, variants });
                        next
                    };
                    continue;
                } else if !line.is_empty() && !line.starts_with("//") {
                    pending = Pending::default();
                }
                i += 1;
            }
        }
        Ok(types)
    }

    fn structure(&self, name: &str, key: &str) -> Result<&Struct, ReferenceError> {
        self.structs.get(name).ok_or_else(|| ReferenceError::Key {
            key: key.to_string(),
            message: format!("type `{name}` is not a config struct in src/config"),
        })
    }

    /// The table a field type stands for, if it is one.
    fn table_of<'a>(&self, ty: &'a str) -> Option<Table<'a>> {
        if self.structs.contains_key(ty) {
            return Some(Table {
                name: ty,
                array: false,
            });
        }
        let inner = generic(ty, "Vec")?;
        self.structs.contains_key(inner).then_some(Table {
            name: inner,
            array: true,
        })
    }

    /// One section for `table` (at `key`), then one per table inside it.
    fn walk(
        &self,
        key: &str,
        field: &Field,
        table: &Table<'_>,
        default: &toml::Value,
        sections: &mut Vec<Section>,
    ) -> Result<(), ReferenceError> {
        let def = self.structure(table.name, key)?;
        // The header is the TOML path (`[[embed.instance]]`); keys mark arrays with `[]`.
        let path = key.replace("[]", "");
        let (header, prefix) = match table.array {
            true => (format!("[[{path}]]"), format!("{key}[].")),
            false => (format!("[{path}]"), format!("{key}.")),
        };
        let doc = match field.doc.is_empty() {
            true => def.doc.clone(),
            false => field.doc.clone(),
        };
        let index = sections.len();
        sections.push(Section {
            header,
            doc,
            entries: Vec::new(),
        });
        for inner in &def.fields {
            let inner_key = format!("{prefix}{}", inner.name);
            if let Some(sub) = self.table_of(&inner.ty) {
                let sub_default = match sub.array {
                    false => default.get(&inner.name).cloned(),
                    true => element_default(sub.name),
                };
                let Some(sub_default) = sub_default else {
                    return Err(ReferenceError::Key {
                        key: inner_key,
                        message: format!(
                            "no default for a `{}`: add it to element_default in src/config/reference.rs",
                            sub.name
                        ),
                    });
                };
                self.walk(&inner_key, inner, &sub, &sub_default, sections)?;
                continue;
            }
            let entry = self.entry(inner_key, inner, default.get(&inner.name))?;
            sections[index].entries.push(entry);
        }
        Ok(())
    }

    fn entry(
        &self,
        key: String,
        field: &Field,
        default: Option<&toml::Value>,
    ) -> Result<Entry, ReferenceError> {
        let ty = generic(&field.ty, "Option").unwrap_or(&field.ty);
        let mut meaning = field.doc.clone();
        let mut values = Vec::new();
        let kind = match self.enums.get(ty) {
            Some(e) => {
                if meaning.is_empty() {
                    meaning = e.doc.clone();
                }
                values = e.variants.clone();
                "string".to_string()
            }
            None => kind(ty).ok_or_else(|| ReferenceError::Key {
                key: key.clone(),
                message: format!(
                    "type `{ty}` has no TOML type in the reference: extend `kind` in src/config/reference.rs"
                ),
            })?,
        };
        let env = env_names(&meaning);
        Ok(Entry {
            key,
            kind,
            default: default.cloned(),
            meaning,
            values,
            env,
        })
    }
}

/// `T` of `Outer<T>`.
fn generic<'a>(ty: &'a str, outer: &str) -> Option<&'a str> {
    ty.strip_prefix(outer)?
        .strip_prefix('<')?
        .strip_suffix('>')
        .map(str::trim)
}

/// The TOML type of a Rust field type, in words.
fn kind(ty: &str) -> Option<String> {
    let words = match ty {
        "String" | "&'static str" => "string",
        "PathBuf" => "string (path)",
        "bool" => "boolean",
        "u8" | "u16" | "u32" | "u64" | "usize" | "i8" | "i16" | "i32" | "i64" | "isize" => {
            "integer"
        }
        "f32" | "f64" => "float",
        _ => {
            if let Some(inner) = generic(ty, "Vec") {
                let inner = kind(inner)?;
                return Some(format!("array of {inner}s"));
            }
            if generic(ty, "BTreeMap").is_some() || generic(ty, "HashMap").is_some() {
                return Some("table".into());
            }
            return None;
        }
    };
    Some(words.to_string())
}

/// `$PGPRISM_...` variables a meaning names.
fn env_names(text: &str) -> Vec<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("$PGPRISM_") {
        let name: String = text[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    names.into_iter().collect()
}

/// `Name` of `pub struct Name {` / `pub enum Name {`.
fn item_name(line: &str, kind: &str) -> Option<String> {
    let rest = line
        .strip_prefix("pub ")
        .or_else(|| line.strip_prefix("pub(crate) "))
        .unwrap_or(line)
        .strip_prefix(kind)?
        .strip_prefix(' ')?;
    let rest = rest.strip_suffix('{')?.trim();
    rest.chars()
        .all(|c| c.is_alphanumeric() || c == '_')
        .then(|| rest.to_string())
}

/// The line after the block that opens on `lines[start]` (braces counted; the config
/// sources put no braces in strings or comments of items that are not config types).
fn skip_block(lines: &[&str], start: usize) -> usize {
    let mut depth = 0i32;
    for (i, line) in lines.iter().enumerate().skip(start) {
        depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
        if depth <= 0 {
            return i + 1;
        }
    }
    lines.len()
}

/// One attribute starting at `lines[start]`, joined when it spans lines; and the next line.
fn attribute(lines: &[&str], start: usize) -> (String, usize) {
    let mut text = String::new();
    let mut depth = 0i32;
    let mut i = start;
    while i < lines.len() {
        let line = lines[i].trim();
        text.push_str(line);
        depth += line.matches('[').count() as i32 - line.matches(']').count() as i32;
        i += 1;
        if depth <= 0 {
            break;
        }
    }
    (text, i)
}

fn derives_deserialize(attrs: &[String]) -> bool {
    attrs
        .iter()
        .any(|a| a.starts_with("#[derive(") && a.contains("Deserialize"))
}

/// The arguments of `#[serde(...)]` attributes, split at top-level commas.
fn serde_args(attrs: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    for attr in attrs {
        let Some(inner) = attr
            .strip_prefix("#[serde(")
            .and_then(|a| a.strip_suffix(")]"))
        else {
            continue;
        };
        let mut depth = 0;
        let mut quoted = false;
        let mut current = String::new();
        for c in inner.chars() {
            match c {
                '"' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    args.push(current.trim().to_string());
                    current.clear();
                    continue;
                }
                _ => {}
            }
            current.push(c);
        }
        if !current.trim().is_empty() {
            args.push(current.trim().to_string());
        }
    }
    args
}

/// The quoted value of `name = "value"` among serde arguments.
fn serde_value(args: &[String], name: &str) -> Option<String> {
    args.iter().find_map(|a| {
        let (k, v) = a.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Whether the item renames to kebab-case (the only `rename_all` the config uses).
fn renames_kebab(
    attrs: &[String],
    file: &'static str,
    line: usize,
) -> Result<bool, ReferenceError> {
    match serde_value(&serde_args(attrs), "rename_all").as_deref() {
        None => Ok(false),
        Some("kebab-case") => Ok(true),
        Some(other) => Err(ReferenceError::Source {
            file,
            line: line + 1,
            message: format!("rename_all = \"{other}\" is not understood by the reference"),
        }),
    }
}

/// What [`struct_body`] and [`enum_body`] find at one line of a body.
enum BodyLine {
    /// The body's closing `}`.
    Close,
    /// A doc comment or an attribute, taken for the next item; reading goes on at this line.
    Taken(usize),
    /// Something else (an item, a blank line, a comment), for the caller.
    Other,
}

/// Reads `lines[i]` of a struct's or enum's body: a doc comment or attribute goes to
/// `pending`.
fn body_line(lines: &[&str], i: usize, pending: &mut Pending) -> BodyLine {
    let line = lines[i].trim();
    if line == "}" {
        return BodyLine::Close;
    }
    if let Some(doc) = line.strip_prefix("///") {
        pending.doc.push(doc.trim().to_string());
        return BodyLine::Taken(i + 1);
    }
    if line.starts_with("#[") {
        let (attr, next) = attribute(lines, i);
        pending.attrs.push(attr);
        return BodyLine::Taken(next);
    }
    BodyLine::Other
}

/// The fields of a struct whose body starts at `lines[start]`; and the line after it.
fn struct_body(
    lines: &[&str],
    start: usize,
    file: &'static str,
    kebab: bool,
) -> Result<(Vec<Field>, usize), ReferenceError> {
    let mut fields = Vec::new();
    let mut pending = Pending::default();
    let mut i = start;
    while i < lines.len() {
        match body_line(lines, i, &mut pending) {
            BodyLine::Close => return Ok((fields, i + 1)),
            BodyLine::Taken(next) => {
                i = next;
                continue;
            }
            BodyLine::Other => {}
        }
        let line = lines[i].trim();
        if line.is_empty() || line.starts_with("//") {
            i += 1;
            continue;
        }
        // A declaration, possibly over several lines: up to a `,` outside `<...>`.
        let first = i;
        let mut decl = String::new();
        loop {
            decl.push_str(lines[i].trim());
            decl.push(' ');
            i += 1;
            let depth = decl.matches('<').count() as i32 - decl.matches('>').count() as i32;
            if (decl.trim_end().ends_with(',') && depth == 0) || i >= lines.len() {
                break;
            }
            if lines[i].trim() == "}" {
                break;
            }
        }
        let decl = decl.trim().trim_end_matches(',');
        let decl = decl
            .strip_prefix("pub(crate) ")
            .or_else(|| decl.strip_prefix("pub "))
            .unwrap_or(decl);
        let Some((ident, ty)) = decl.split_once(':') else {
            return Err(ReferenceError::Source {
                file,
                line: first + 1,
                message: format!("expected a field `name: Type,`, found `{decl}`"),
            });
        };
        let args = serde_args(&pending.attrs);
        let doc = pending.doc();
        pending.attrs.clear();
        if args
            .iter()
            .any(|a| a == "skip" || a == "skip_deserializing")
        {
            continue;
        }
        if args.iter().any(|a| a == "flatten") {
            return Err(ReferenceError::Source {
                file,
                line: first + 1,
                message: "#[serde(flatten)] is not understood by the reference".into(),
            });
        }
        let ident = ident.trim();
        let name = match serde_value(&args, "rename") {
            Some(name) => name,
            None if kebab => ident.replace('_', "-"),
            None => ident.to_string(),
        };
        fields.push(Field {
            name,
            ty: ty.split_whitespace().collect::<Vec<_>>().join(" "),
            doc,
        });
    }
    Err(ReferenceError::Source {
        file,
        line: start,
        message: "a struct without its closing `}`".into(),
    })
}

/// The variants of an enum whose body starts at `lines[start]`; and the line after it.
fn enum_body(
    lines: &[&str],
    start: usize,
    file: &'static str,
    kebab: bool,
) -> Result<(Vec<(String, String)>, usize), ReferenceError> {
    let mut variants = Vec::new();
    let mut pending = Pending::default();
    let mut i = start;
    while i < lines.len() {
        match body_line(lines, i, &mut pending) {
            BodyLine::Close => return Ok((variants, i + 1)),
            BodyLine::Taken(next) => {
                i = next;
                continue;
            }
            BodyLine::Other => {}
        }
        let line = lines[i].trim();
        i += 1;
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let ident: String = line
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() || !line[ident.len()..].trim_start().starts_with([',', '=']) {
            return Err(ReferenceError::Source {
                file,
                line: i,
                message: format!("expected a unit variant `Name,`, found `{line}`"),
            });
        }
        let args = serde_args(&pending.attrs);
        let doc = pending.doc();
        pending.attrs.clear();
        if args
            .iter()
            .any(|a| a == "skip" || a == "skip_deserializing")
        {
            continue;
        }
        let name = match serde_value(&args, "rename") {
            Some(name) => name,
            None if kebab => kebab_variant(&ident),
            None => ident,
        };
        variants.push((name, doc));
    }
    Err(ReferenceError::Source {
        file,
        line: start,
        message: "an enum without its closing `}`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Reference {
        Reference::build().expect("the reference builds from src/config")
    }

    /// A value of the key's TOML type, for keys unset by default.
    fn sample(kind: &str) -> toml::Value {
        match kind {
            "boolean" => toml::Value::Boolean(true),
            "integer" => toml::Value::Integer(1),
            "float" => toml::Value::Float(0.5),
            "table" => toml::Value::Table(toml::Table::new()),
            k if k.starts_with("array") => toml::Value::Array(Vec::new()),
            _ => toml::Value::String("/probe".into()),
        }
    }

    /// A document holding only `value` at `key` (`[]` segments become one-element arrays).
    fn document(key: &str, value: toml::Value) -> toml::Value {
        let segments: Vec<&str> = key.split('.').collect();
        let mut node = value;
        for segment in segments.iter().rev() {
            let (name, array) = match segment.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (*segment, false),
            };
            let mut table = toml::Table::new();
            let inner = if array {
                toml::Value::Array(vec![node])
            } else {
                node
            };
            table.insert(name.to_string(), inner);
            node = toml::Value::Table(table);
        }
        node
    }

    /// The value at `key` in a serialized config (index 0 for `[]`).
    fn lookup<'a>(root: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
        let mut node = root;
        for segment in key.split('.') {
            node = match segment.strip_suffix("[]") {
                Some(name) => node.get(name)?.get(0)?,
                None => node.get(segment)?,
            };
        }
        Some(node)
    }

    #[test]
    fn every_documented_key_is_accepted_by_the_loader_and_lands_there() {
        let reference = reference();
        let mut checked = 0;
        for entry in reference.entries() {
            let mut values: Vec<toml::Value> =
                vec![entry.default.clone().unwrap_or_else(|| sample(&entry.kind))];
            values.extend(
                entry
                    .values
                    .iter()
                    .map(|(v, _)| toml::Value::String(v.clone())),
            );
            for value in values {
                let text = toml::to_string(&document(&entry.key, value.clone())).unwrap();
                let cfg = Config::parse(&text).unwrap_or_else(|e| {
                    panic!("`{}` refused by the loader: {e}\n{text}", entry.key)
                });
                let back = toml::Value::try_from(&cfg).unwrap();
                assert_eq!(
                    lookup(&back, &entry.key),
                    Some(&value),
                    "`{}` did not land where documented:\n{text}",
                    entry.key
                );
                checked += 1;
            }
        }
        assert!(checked > 100, "only {checked} keys and values checked");
    }

    #[test]
    fn every_key_serde_writes_is_documented_with_its_default() {
        let reference = reference();
        let documented: BTreeMap<&str, &Entry> =
            reference.entries().map(|e| (e.key.as_str(), e)).collect();
        // One element in each array of tables, so that their keys are written too.
        let mut cfg = Config::default();
        cfg.mirror.push(MirrorConfig::default());
        cfg.embed.instance.push(EmbedInstanceConfig::default());
        let written = toml::Value::try_from(&cfg).unwrap();
        let mut leaves = Vec::new();
        collect_leaves(&written, "", &documented, &mut leaves);
        assert!(leaves.len() > 50, "{leaves:?}");
        for (key, value) in &leaves {
            let entry = documented
                .get(key.as_str())
                .unwrap_or_else(|| panic!("serde writes `{key}`, the reference lacks it"));
            assert_eq!(
                entry.default.as_ref(),
                Some(value),
                "`{key}`: the reference's default differs"
            );
        }
        // And nothing documented with a default is missing from what serde writes.
        let written_keys: BTreeSet<&str> = leaves.iter().map(|(k, _)| k.as_str()).collect();
        for entry in reference.entries().filter(|e| e.default.is_some()) {
            assert!(
                written_keys.contains(entry.key.as_str()),
                "`{}` is documented with a default serde does not write",
                entry.key
            );
        }
    }

    fn collect_leaves(
        node: &toml::Value,
        prefix: &str,
        documented: &BTreeMap<&str, &Entry>,
        out: &mut Vec<(String, toml::Value)>,
    ) {
        let toml::Value::Table(table) = node else {
            return;
        };
        for (name, value) in table {
            let key = format!("{prefix}{name}");
            match value {
                // A documented table-valued key (`settings`) is a leaf, not a section.
                toml::Value::Table(_) if !documented.contains_key(key.as_str()) => {
                    collect_leaves(value, &format!("{key}."), documented, out)
                }
                toml::Value::Array(items)
                    if matches!(items.first(), Some(toml::Value::Table(_))) =>
                {
                    collect_leaves(&items[0], &format!("{key}[]."), documented, out)
                }
                _ => out.push((key, value.clone())),
            }
        }
    }

    #[test]
    fn every_key_has_a_meaning() {
        let reference = reference();
        let undocumented: Vec<&str> = reference
            .entries()
            .filter(|e| e.meaning.is_empty())
            .map(|e| e.key.as_str())
            .collect();
        assert!(
            undocumented.is_empty(),
            "keys without a `///` comment on their field (or their type) in src/config: {undocumented:?}"
        );
    }

    #[test]
    fn enum_defaults_are_among_their_values() {
        for entry in reference().entries().filter(|e| !e.values.is_empty()) {
            let Some(toml::Value::String(default)) = &entry.default else {
                panic!("`{}`: an enumeration without a string default", entry.key);
            };
            assert!(
                entry.values.iter().any(|(v, _)| v == default),
                "`{}`: default `{default}` is not among {:?}",
                entry.key,
                entry.values
            );
        }
    }

    #[test]
    fn every_config_source_is_read() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
        for file in std::fs::read_dir(&dir).unwrap() {
            let name = file.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".rs") && name != "reference.rs" {
                assert!(
                    SOURCES.iter().any(|(n, _)| *n == name),
                    "src/config/{name} is not in SOURCES of src/config/reference.rs"
                );
            }
        }
    }

    #[test]
    fn sections_follow_the_file_layout() {
        let reference = reference();
        let headers: Vec<&str> = reference
            .sections
            .iter()
            .map(|s| s.header.as_str())
            .collect();
        for header in [
            "[proxy]",
            "[primary]",
            "[[mirror]]",
            "[embed]",
            "[[embed.instance]]",
        ] {
            assert!(headers.contains(&header), "{headers:?}");
        }
        let keys: BTreeSet<&str> = reference.entries().map(|e| e.key.as_str()).collect();
        for key in [
            "proxy.listen",
            "mirror[].url",
            "embed.instance[].port",
            "embed.bindir",
            "pool.auth-type",
        ] {
            assert!(keys.contains(key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn kebab_variants_match_serde() {
        for (ident, name) in [
            ("DdlDml", "ddl-dml"),
            ("Md5", "md5"),
            ("ScramSha256", "scram-sha256"),
            ("FullRow", "full-row"),
        ] {
            assert_eq!(kebab_variant(ident), name);
        }
        let written = toml::Value::try_from(crate::config::PoolConfig::default()).unwrap();
        assert_eq!(
            written.get("auth-type"),
            Some(&toml::Value::String("scram-sha-256".into()))
        );
        // The spelling serde's rule gives, which files used before the rename, still loads.
        let cfg = Config::parse("[pool]\nauth-type = \"scram-sha256\"\n").unwrap();
        assert_eq!(cfg.pool.auth_type, crate::config::AuthType::ScramSha256);
    }
}
