//! The documentation against the code: the configuration reference must match the keys the
//! loader accepts (as `pgprism config-reference` prints them), every relative link in the
//! README and `docs/` must reach a file (and a heading, for a link with an anchor), and the
//! README must show the two commands a newcomer starts with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use pgprism::config::reference::REGENERATE;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The rows of the reference's tables, by key (`| \`proxy.listen\` | ...`).
fn rows(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("| `")?;
            let (key, _) = rest.split_once("` |")?;
            Some((key.to_string(), line.to_string()))
        })
        .collect()
}

#[test]
fn configuration_reference_matches_the_config_keys() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgprism"))
        .arg("config-reference")
        .output()
        .expect("run pgprism config-reference");
    assert!(
        out.status.success(),
        "pgprism config-reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("UTF-8 reference");
    let path = root().join("docs/configuration.md");
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    if generated == written {
        return;
    }
    let (code, docs) = (rows(&generated), rows(&written));
    let mut problems = Vec::new();
    for key in code.keys().filter(|k| !docs.contains_key(*k)) {
        problems.push(format!(
            "key `{key}` is accepted by the loader but not documented"
        ));
    }
    for key in docs.keys().filter(|k| !code.contains_key(*k)) {
        problems.push(format!(
            "key `{key}` is documented but the loader does not know it"
        ));
    }
    for (key, row) in &code {
        if let Some(old) = docs.get(key)
            && old != row
        {
            problems.push(format!(
                "key `{key}` differs:\n    docs: {old}\n    code: {row}"
            ));
        }
    }
    if problems.is_empty() {
        let line = generated
            .lines()
            .zip(written.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(generated.lines().count().min(written.lines().count()));
        problems.push(format!(
            "the text around the tables differs from line {}",
            line + 1
        ));
    }
    panic!(
        "docs/configuration.md disagrees with the config types:\n  {}\nregenerate it with: {REGENERATE}",
        problems.join("\n  ")
    );
}

/// The Markdown files a reader finds: the README and everything in `docs/`.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The text outside fenced code blocks and inline code, where links are links.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if fenced {
            out.push('\n');
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of inline links `[text](target)`.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].trim();
        // `[text](url "title")`: the title is not part of the target.
        let target = target.split_whitespace().next().unwrap_or("");
        targets.push(target.to_string());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and `_` kept, spaces to
/// `-`, everything else dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap_or(c)),
            '-' | '_' => Some(c),
            ' ' => Some('-'),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings, with GitHub's `-1`, `-2` for repeated ones.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let base = anchor(heading);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(match *n {
            0 => base.clone(),
            n => format!("{base}-{n}"),
        });
        *n += 1;
    }
    out
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn every_relative_link_reaches_a_file_and_heading() {
    let root = normalize(&root());
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read page");
        let name = page
            .strip_prefix(&root)
            .unwrap_or(&page)
            .display()
            .to_string();
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target.as_str(), None),
            };
            let resolved = match file {
                "" => page.clone(),
                file => normalize(&page.parent().expect("page dir").join(file)),
            };
            if !resolved.starts_with(&root) {
                broken.push(format!("{name}: `{target}` leaves the repository"));
                continue;
            }
            if !resolved.exists() {
                broken.push(format!("{name}: `{target}`: no such file"));
                continue;
            }
            let Some(fragment) = fragment else { continue };
            if resolved.extension().is_some_and(|e| e == "md") {
                let target_text = std::fs::read_to_string(&resolved).expect("read target");
                if !anchors(&target_text).contains(fragment) {
                    broken.push(format!("{name}: `{target}`: no heading with that anchor"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} relative links found");
    assert!(
        broken.is_empty(),
        "broken links:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn readme_shows_the_two_commands() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_start().starts_with("```")) {
            (None, true) => current = Some(String::new()),
            (Some(block), true) => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), false) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, false) => {}
        }
    }
    for command in ["cargo run --release -- demo", "cargo nextest run"] {
        assert!(
            blocks
                .iter()
                .any(|b| b.lines().any(|l| l.trim() == command)),
            "the README has no code block with the line `{command}`"
        );
    }
}

#[test]
fn link_and_anchor_helpers_follow_github() {
    assert_eq!(anchor(" `[[embed.instance]]`"), "embedinstance");
    assert_eq!(
        anchor(" CDC: PostgreSQL to StarRocks, exactly once"),
        "cdc-postgresql-to-starrocks-exactly-once"
    );
    assert_eq!(
        anchor(" Latency benchmarking: `pgprism bench`"),
        "latency-benchmarking-pgprism-bench"
    );
    let page = "# A\n## B\n```\n# not a heading\n```\n## B\n";
    let expected: BTreeSet<String> = ["a", "b", "b-1"].iter().map(|s| s.to_string()).collect();
    assert_eq!(anchors(page), expected);
    assert_eq!(
        links("see [x](a.md#b) and `[y](not-a-link.md)` and [z](https://e.invalid \"t\")"),
        vec!["a.md#b".to_string(), "https://e.invalid".to_string()]
    );
}

/// The `pgprism ...` command lines of the pages' code blocks (`\` continuations joined,
/// `# comments` dropped), with the page they are on.
fn command_lines() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read page");
        let name = page
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut fenced = false;
        let mut joined = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                joined.clear();
                continue;
            }
            if !fenced {
                continue;
            }
            let line = line.split(" #").next().unwrap_or("").trim();
            joined.push_str(line.trim_end_matches('\\'));
            joined.push(' ');
            if line.ends_with('\\') {
                continue;
            }
            let command = std::mem::take(&mut joined);
            let command = command.trim();
            let rest = command
                .strip_prefix("pgprism ")
                .or_else(|| command.strip_prefix("cargo run --release -- "));
            if let Some(rest) = rest {
                out.push((name.clone(), rest.to_string()));
            }
        }
    }
    out
}

#[test]
fn every_documented_command_line_uses_real_subcommands_and_flags() {
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut wrong = Vec::new();
    let lines = command_lines();
    assert!(
        lines.len() >= 10,
        "only {} command lines found",
        lines.len()
    );
    for (page, line) in &lines {
        let mut words = line.split_whitespace();
        let Some(sub) = words.next() else { continue };
        let text = help.entry(sub.to_string()).or_insert_with(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_pgprism"))
                .args([sub, "--help"])
                .output()
                .expect("run pgprism --help");
            match out.status.success() {
                true => String::from_utf8_lossy(&out.stdout).into_owned(),
                false => String::new(),
            }
        });
        if text.is_empty() {
            wrong.push(format!("{page}: `pgprism {sub}` is not a subcommand"));
            continue;
        }
        for word in words {
            let word = word.trim_matches(|c| c == '[' || c == ']');
            let Some(flag) = word.strip_prefix("--") else {
                continue;
            };
            let flag = flag.split('=').next().unwrap_or("");
            let known = text.match_indices(&format!("--{flag}")).any(|(at, m)| {
                !text[at + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '-')
            });
            if !known {
                wrong.push(format!("{page}: `pgprism {sub}` has no flag `--{flag}`"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The `PGPRISM_*` names in the Rust sources under `dir`.
fn env_names_in(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("source entry").path();
        if path.is_dir() {
            env_names_in(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for (at, _) in text.match_indices("\"PGPRISM_") {
            let name: String = text[at + 1..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
}

#[test]
fn every_environment_variable_pgprism_reads_is_documented() {
    let mut names = BTreeSet::new();
    env_names_in(&root().join("src"), &mut names);
    assert!(names.len() >= 3, "{names:?}");
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).expect("page");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !page.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "environment variables read in src/ but not in docs/configuration.md's Environment table (src/config/reference.rs): {missing:?}"
    );
}

/// `${NAME:-default}` as its default and `${NAME}` as `x`: examples name variables a reader
/// sets, which this process has not.
fn without_environment(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find('}') else {
            out.push_str(&rest[at..]);
            return out;
        };
        let inner = &rest[at + 2..at + end];
        out.push_str(inner.split_once(":-").map_or("x", |(_, default)| default));
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_toml_example_loads() {
    let mut examples: Vec<(String, String)> = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("read page");
        let name = page
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut block: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut block {
                None if line.trim_start().starts_with("```toml") => {
                    block = Some((i + 1, String::new()));
                }
                Some((start, body)) if line.trim_start().starts_with("```") => {
                    examples.push((format!("{name} line {start}"), std::mem::take(body)));
                    block = None;
                }
                Some((_, body)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None => {}
            }
        }
    }
    let example_file = root().join("packaging/pgprism.toml");
    if let Ok(text) = std::fs::read_to_string(&example_file) {
        examples.push(("packaging/pgprism.toml".into(), text));
    }
    assert!(
        examples.len() >= 4,
        "only {} TOML examples found",
        examples.len()
    );
    let refused: Vec<String> = examples
        .iter()
        .filter_map(|(place, text)| {
            pgprism::config::Config::parse(&without_environment(text))
                .err()
                .map(|e| format!("{place}: {e}"))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "TOML examples the loader refuses:\n  {}",
        refused.join("\n  ")
    );
}
