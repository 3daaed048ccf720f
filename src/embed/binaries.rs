//! Finding the PostgreSQL server binaries and their major version. Read-only: never installs
//! or changes anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::EmbedError;

/// Where Debian/Ubuntu put one directory per installed major version.
const DEBIAN_LIB_DIR: &str = "/usr/lib/postgresql";

/// A directory holding the PostgreSQL server binaries (`postgres`, `initdb`, usually `psql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub bindir: PathBuf,
    pub version_major: u32,
}

impl PgBinaries {
    /// Looks in the configured directory, then `pg_config --bindir`, then the highest
    /// `/usr/lib/postgresql/*/bin`.
    ///
    /// An explicitly configured directory without a `postgres` executable is an error, not a
    /// reason to fall back: a silent fallback would test against a different server than the
    /// one asked for.
    pub fn locate(configured: Option<&Path>) -> Result<Self, EmbedError> {
        if let Some(dir) = configured {
            if !has_server(dir) {
                return Err(EmbedError::ConfiguredBindirInvalid {
                    path: dir.to_path_buf(),
                });
            }
            return Self::from_bindir(dir);
        }
        let mut searched = Vec::new();
        match pg_config_bindir() {
            Some(dir) if has_server(&dir) => return Self::from_bindir(&dir),
            Some(dir) => searched.push(format!("pg_config --bindir = {}", dir.display())),
            None => searched.push("pg_config (not on PATH)".to_owned()),
        }
        if let Some(dir) = highest_debian_bindir() {
            return Self::from_bindir(&dir);
        }
        searched.push(format!("{DEBIAN_LIB_DIR}/*/bin"));
        Err(EmbedError::BinariesNotFound {
            searched: searched.join(", "),
        })
    }

    /// Path of a binary in this directory.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    fn from_bindir(dir: &Path) -> Result<Self, EmbedError> {
        let program = dir.join("postgres");
        let output = crate::subprocess::reset_signals(&mut Command::new(&program))
            .arg("--version")
            .output()
            .map_err(|source| EmbedError::Spawn {
                program: program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        match parse_version_major(&text) {
            Some(version_major) if output.status.success() => Ok(Self {
                bindir: dir.to_path_buf(),
                version_major,
            }),
            _ => Err(EmbedError::VersionUnknown {
                program,
                output: text,
            }),
        }
    }
}

fn has_server(dir: &Path) -> bool {
    dir.join("postgres").is_file() && dir.join("initdb").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = crate::subprocess::reset_signals(&mut Command::new("pg_config"))
        .arg("--bindir")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn highest_debian_bindir() -> Option<PathBuf> {
    let entries = std::fs::read_dir(DEBIAN_LIB_DIR).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            // Directory names are major versions ("15", or "9.6" for old ones); compare
            // numerically so 10 sorts above 9.6.
            let name = entry.file_name().into_string().ok()?;
            let mut parts = name.split('.');
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
            let bindir = entry.path().join("bin");
            has_server(&bindir).then_some(((major, minor), bindir))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bindir)| bindir)
}

/// `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` → 15; `9.6.24` → 9.
fn parse_version_major(text: &str) -> Option<u32> {
    let rest = text.split("(PostgreSQL)").nth(1)?;
    let version = rest.split_whitespace().next()?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_version_major;

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_version_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(
            parse_version_major("postgres (PostgreSQL) 9.6.24\n"),
            Some(9)
        );
        assert_eq!(
            parse_version_major("postgres (PostgreSQL) 17beta1\n"),
            Some(17)
        );
        assert_eq!(parse_version_major("something else"), None);
    }
}
