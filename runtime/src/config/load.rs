//! Loading a [`HamokConfig`]: defaults < TOML file < `HAMOK_*` environment < values set in code.

use std::fmt::Write as _;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

use super::env::EnvProvider;
use super::{HamokConfig, CONFIG_FILE_KEY};
use crate::error::HamokError;

impl HamokConfig {
    /// The configuration sources in precedence order: the defaults, then the TOML file `toml_file` if given,
    /// then the `HAMOK_*` environment variables naming a known key (read now). Merge values set in code on
    /// top, then call [`HamokConfig::from_figment`]:
    ///
    /// ```
    /// use figment::providers::Serialized;
    /// use hamok_runtime::config::HamokConfig;
    ///
    /// let figment = HamokConfig::figment(None)
    ///     .merge(Serialized::default("election_timeout_ms", 200))
    ///     .merge(Serialized::default("raft.max_inflight_appends", 8));
    /// let config = HamokConfig::from_figment(figment).unwrap();
    /// assert_eq!(config.election_timeout_ms, 200);
    /// assert_eq!(config.raft.max_inflight_appends, 8);
    /// ```
    ///
    /// A `toml_file` is used exactly as given (no search in parent directories); a missing or unreadable
    /// file makes [`HamokConfig::from_figment`] fail with key `"config_file"`.
    pub fn figment(toml_file: Option<&Path>) -> Figment {
        let vars = std::env::vars_os().filter_map(|(key, value)| {
            Some((
                key.into_string().ok()?,
                value.to_string_lossy().into_owned(),
            ))
        });
        Self::figment_with_env(toml_file, vars)
    }

    /// As [`HamokConfig::figment`], with the environment given as `(name, value)` pairs.
    pub(super) fn figment_with_env(
        toml_file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(HamokConfig::default()));
        if let Some(path) = toml_file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(EnvProvider::new(vars))
    }

    /// Extracts the configuration from `figment` and validates it.
    ///
    /// # Errors
    ///
    /// [`HamokError::Config`] naming the dotted key that failed (`"election_timeout_ms"`,
    /// `"raft.max_inflight_appends"`), or `"config_file"` if the TOML file could not be read or parsed.
    pub fn from_figment(figment: Figment) -> Result<HamokConfig, HamokError> {
        let config: HamokConfig = figment.extract().map_err(config_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads the configuration: defaults < `toml_file` (if given) < `HAMOK_*` environment, then validates it.
    ///
    /// # Errors
    ///
    /// As [`HamokConfig::from_figment`].
    pub fn load(toml_file: Option<&Path>) -> Result<HamokConfig, HamokError> {
        Self::from_figment(Self::figment(toml_file))
    }
}

/// Turns the first error of a failed extraction into a [`HamokError::Config`] naming its dotted key.
pub(super) fn config_error(error: figment::Error) -> HamokError {
    let Some(error) = error.into_iter().next() else {
        return HamokError::Config {
            key: CONFIG_FILE_KEY.to_owned(),
            reason: "unknown error".to_owned(),
        };
    };
    let mut path = error.path.clone();
    if let figment::error::Kind::UnknownField(field, _) = &error.kind {
        // Make sure the unknown field itself is named, not only its parent table.
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    let key = if path.is_empty() {
        // No key: the provider itself failed, i.e. the TOML file could not be read or parsed.
        CONFIG_FILE_KEY.to_owned()
    } else {
        path.join(".")
    };
    let mut reason = error.kind.to_string().trim_end().to_owned();
    if let Some(metadata) = &error.metadata {
        match &metadata.source {
            Some(source) => write!(reason, " (in {source} {})", metadata.name),
            None => write!(reason, " (in {})", metadata.name),
        }
        .expect("writing to a String cannot fail");
    }
    HamokError::Config { key, reason }
}
