//! Walking the file's table: every value is looked up through a `Node`, which knows the key
//! path that leads to it, so that every refusal names the key.

use std::path::PathBuf;
use std::time::Duration;

use super::defaults::MAX_ANY_DURATION;
use super::print::toml_str;
use super::{invalid, ConfigError};

/// A table of the file with the key path that leads to it; an absent table reads as empty,
/// so that every key takes its default.
pub(super) struct Node<'t> {
    pub(super) path: String,
    pub(super) table: Option<&'t toml::Table>,
}

impl<'t> Node<'t> {
    pub(super) fn root(table: &'t toml::Table) -> Self {
        Node {
            path: String::new(),
            table: Some(table),
        }
    }

    /// The full key path of `name` in this table, as it is spelled in error messages.
    pub(super) fn key(&self, name: &str) -> String {
        let name = if is_bare_key(name) {
            name.to_owned()
        } else {
            toml_str(name)
        };
        self.child_path(&name)
    }

    pub(super) fn child_path(&self, spelled: &str) -> String {
        if self.path.is_empty() {
            spelled.to_owned()
        } else {
            format!("{}.{spelled}", self.path)
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&'t toml::Value> {
        self.table.and_then(|table| table.get(name))
    }

    /// Refuses the first key that is not one of `known` (a typo would otherwise be a
    /// silently ignored setting).
    pub(super) fn only(&self, known: &[&str]) -> Result<(), ConfigError> {
        let Some(table) = self.table else {
            return Ok(());
        };
        match table.keys().find(|key| !known.contains(&key.as_str())) {
            Some(unknown) => Err(invalid(
                self.key(unknown),
                format!("is not a known key; the keys here are {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    pub(super) fn table(&self, name: &str) -> Result<Node<'t>, ConfigError> {
        let table = match self.get(name) {
            None => None,
            Some(toml::Value::Table(table)) => Some(table),
            Some(other) => return Err(wrong_type(self.key(name), "a table", other)),
        };
        Ok(Node {
            path: self.key(name),
            table,
        })
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&'t str>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(wrong_type(self.key(name), "a string", other)),
        }
    }

    pub(super) fn boolean(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Boolean(value)) => Ok(Some(*value)),
            Some(other) => Err(wrong_type(self.key(name), "true or false", other)),
        }
    }

    /// A file path: a string that is not empty.
    pub(super) fn path(&self, name: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(name)? {
            Some(text) if text.trim().is_empty() => Err(invalid(
                self.key(name),
                "is empty; leave it out or name a file",
            )),
            other => Ok(other.map(PathBuf::from)),
        }
    }

    pub(super) fn integer(&self, name: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Integer(number)) => Ok(Some(*number)),
            Some(other) => Err(wrong_type(self.key(name), "an integer", other)),
        }
    }

    /// An integer or a float, as a float.
    pub(super) fn number(&self, name: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            #[allow(clippy::cast_precision_loss)]
            Some(toml::Value::Integer(number)) => Ok(Some(*number as f64)),
            Some(toml::Value::Float(number)) => Ok(Some(*number)),
            Some(other) => Err(wrong_type(self.key(name), "a number", other)),
        }
    }

    pub(super) fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        self.get(name)
            .map(|value| parse_duration(&self.key(name), value))
            .transpose()
    }

    /// A duration that must be longer than zero.
    pub(super) fn positive_duration(
        &self,
        name: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let duration = self.duration(name)?.unwrap_or(default);
        if duration.is_zero() {
            return Err(invalid(self.key(name), "must be longer than zero"));
        }
        Ok(duration)
    }

    /// An integer in `min..=max`, or the default.
    pub(super) fn bounded(
        &self,
        name: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let number = self.integer(name)?.unwrap_or(default);
        if number < min {
            return Err(invalid(
                self.key(name),
                format!("is {number}; it must be at least {min}"),
            ));
        }
        if number > max {
            return Err(invalid(
                self.key(name),
                format!("is {number}; it must be at most {max}"),
            ));
        }
        Ok(number)
    }

    pub(super) fn array(&self, name: &str) -> Result<Option<&'t Vec<toml::Value>>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(toml::Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(self.key(name), "an array", other)),
        }
    }

    /// An array of strings; each bad element is named by its index.
    pub(super) fn strings(&self, name: &str) -> Result<Option<Vec<&'t str>>, ConfigError> {
        let Some(items) = self.array(name)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                toml::Value::String(text) => Ok(text.as_str()),
                other => Err(wrong_type(
                    format!("{}[{index}]", self.key(name)),
                    "a string",
                    other,
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Names the expected and the found type, never the value (it may be a secret).
pub(super) fn wrong_type(key: String, expected: &str, found: &toml::Value) -> ConfigError {
    invalid(
        key,
        format!("expected {expected}, found {}", type_name(found)),
    )
}

pub(super) fn parse_duration(key: &str, value: &toml::Value) -> Result<Duration, ConfigError> {
    let toml::Value::String(text) = value else {
        return Err(invalid(
            key,
            format!(
                "expected a duration string such as \"30s\", found {}",
                type_name(value)
            ),
        ));
    };
    let duration = humantime::parse_duration(text.trim()).map_err(|_| {
        invalid(
            key,
            format!("{text:?} is not a duration (e.g. \"1s\", \"500ms\")"),
        )
    })?;
    // Every duration is added to a clock somewhere: none may be near what overflows it.
    at_most(key, duration, MAX_ANY_DURATION)
}

/// Refuses a duration longer than `max`, naming the key.
pub(super) fn at_most(
    key: &str,
    duration: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if duration > max {
        return Err(invalid(
            key,
            format!(
                "is {}; it must be at most {}",
                humantime::format_duration(duration),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(duration)
}
