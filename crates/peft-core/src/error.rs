//! The one error type of the workspace: every failure a user can cause names its file, key,
//! option or shape.

use std::path::PathBuf;

/// Result alias used across the peft crates.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, adapting, training or saving.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what the format requires.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A tensor the model or adapter needs is absent from a file.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor has a dtype we cannot use here.
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Target modules matched no module of the model.
    #[error(
        "target modules {targets} matched no module of the model; modules that exist: {available}"
    )]
    NoTargetMatch { targets: String, available: String },
    /// An operation referred to an adapter that is not there.
    #[error("no adapter named `{0}`")]
    UnknownAdapter(String),
    /// Anything else, with a message that says what.
    #[error("{0}")]
    Other(String),
}

impl PeftError {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error for `path`.
    /// A malformed file. Names taken from the file may hold newlines or other control
    /// characters: they are escaped, so the error stays one line.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        let message: String = message.into();
        let message = if message.chars().any(char::is_control) {
            message
                .chars()
                .flat_map(|c| {
                    if c.is_control() {
                        c.escape_default().collect::<Vec<_>>()
                    } else {
                        vec![c]
                    }
                })
                .collect()
        } else {
            message
        };
        Self::Format {
            path: path.into(),
            message,
        }
    }
}

/// Deserialise `value` into `T`; an error names the field at fault (`rope_scaling.factor:
/// invalid type ...`).
pub fn from_json_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(located)
}

/// [`from_json_value`] from JSON bytes.
pub fn from_json_slice<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes))
        .map_err(located)
}

/// `field.path: message`, or the message alone for an error at the top level.
fn located<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

/// The message of a caught panic's payload (its first line), for one-line reports.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    msg.lines().next().unwrap_or_default().to_string()
}
