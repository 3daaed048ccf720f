//! `${VAR}` and `${VAR:-default}` expansion of the config text, before TOML parsing, so any
//! value (numbers included) can come from the environment. `$$` is a literal `$`.

use super::ConfigError;

pub(super) fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let line = text[..text.len() - rest.len() + at].matches('\n').count() + 1;
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or(ConfigError::EnvUnterminated { line })?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expr, None),
            };
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(ConfigError::EnvMissing {
                        line,
                        name: name.to_string(),
                    });
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.internal".into()),
            "PORT" => Some("5433".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_and_default_values() {
        let got = expand("a = \"${HOST}:${PORT}\"\nb = ${MISSING:-7}\n", env).unwrap();
        assert_eq!(got, "a = \"db.internal:5433\"\nb = 7\n");
    }

    #[test]
    fn missing_variable_names_line_and_variable() {
        let err = expand("x = 1\ny = \"${NOPE}\"\n", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("NOPE"), "{err}");
    }

    #[test]
    fn dollar_escapes_and_unterminated() {
        assert_eq!(expand("p = \"a$$b $c\"", env).unwrap(), "p = \"a$b $c\"");
        assert!(expand("p = \"${HOST\"", env).is_err());
    }
}
