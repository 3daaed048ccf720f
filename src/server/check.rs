//! `pgprism check` and the start-up check: the config's own validation, then what `config`
//! must not do itself (it is a leaf): read the TLS files of every URL and of `[client-tls]`,
//! the admin endpoint's token file and certificate,
//! compile compare's patterns, parse the StarRocks URL. Runs on the main (or control) thread,
//! before any shard starts, so a bad file fails the start, never a shard's first connect.

use crate::config::{Config, ConfigError, PgUrl};

/// Everything [`Config::validate`] checks, plus the checks that need more than the config.
pub fn check(cfg: &Config) -> Result<(), ConfigError> {
    cfg.validate()?;
    let url_tls = |key: &str, url: &str| -> Result<(), ConfigError> {
        let url: PgUrl = url.parse().map_err(|e| ConfigError::invalid(key, &e))?;
        crate::tls::Upstream::try_from(&url)
            .map(drop)
            .map_err(|e| ConfigError::invalid(key, &e))
    };
    if !cfg.primary.url.is_empty() {
        url_tls("primary.url", &cfg.primary.url)?;
    }
    for (i, mirror) in cfg.mirror.iter().enumerate() {
        url_tls(&format!("mirror[{i}].url"), &mirror.url)?;
        // Each shard pools its own connections: the size is split over them.
        let shards = cfg.shard_count();
        if mirror.pool_size > 0 && mirror.pool_size < shards {
            return Err(ConfigError::key(
                &format!("mirror[{i}].pool-size"),
                format!(
                    "{} connections cannot be split over {shards} shards: expected at least one \
                     per shard, or 0 for one mirror connection per client session",
                    mirror.pool_size
                ),
            ));
        }
    }
    if !cfg.shadow.url.is_empty() {
        url_tls("shadow.url", &cfg.shadow.url)?;
        crate::compare::validate(&cfg.compare)?;
    }
    crate::tls::client_side(&cfg.client_tls)?;
    // The admin token file (present, private, long enough) and certificate, as the endpoint
    // will read them.
    crate::control::check_admin(&cfg.admin)?;
    if !cfg.cdc.source.is_empty() {
        crate::cdc::validate(&cfg.cdc)?;
    }
    super::low_port::check(cfg)
}
