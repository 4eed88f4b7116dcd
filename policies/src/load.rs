//! Loading Kubernetes-shaped YAML with errors that name the file, the field path and the line.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// `Result` with [`LoadError`] as the default error.
pub type Result<T, E = LoadError> = std::result::Result<T, E>;

/// A YAML file that could not be read, parsed or validated.
///
/// `Display` gives `file:line: field: message`, e.g.
/// `mesh.yaml:7: spec.workloads[1].app.protocol: unknown variant "http3", expected one of …`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or does not match the spec type (unknown field, wrong type…).
    #[error("{file}:{line}: {field}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line of the offending value (0 when the parser gave none).
        line: usize,
        /// The field path, e.g. `spec.workloads[0].app.port` (`.` for the document root).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The document parsed but breaks a rule of the spec (duplicate name, bad identity…).
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line of the field when it could be located, else 0.
        line: usize,
        /// The field path.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl LoadError {
    /// The field path the error refers to.
    pub fn field(&self) -> &str {
        match self {
            LoadError::Io { .. } => ".",
            LoadError::Parse { field, .. } | LoadError::Invalid { field, .. } => field,
        }
    }

    /// The 1-based line, or 0 when unknown.
    pub fn line(&self) -> usize {
        match self {
            LoadError::Io { .. } => 0,
            LoadError::Parse { line, .. } | LoadError::Invalid { line, .. } => *line,
        }
    }
}

/// Parses one YAML document from `text` (read from `file`, used only in messages) into `T`,
/// rejecting unknown fields if `T` does (`#[serde(deny_unknown_fields)]`).
///
/// # Errors
/// [`LoadError::Parse`] with the field path and line.
pub fn parse_yaml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner();
        let line = inner.location().map_or(0, |l| l.line());
        // serde_yaml appends " at line X column Y" to its message; the line is in our prefix.
        let message = inner.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        // serde_yaml also prefixes the path it knows ("spec.workloads[1].app: …"); ours is exact.
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.contains(' ') && field.starts_with(prefix) => {
                rest.to_string()
            }
            _ => message,
        };
        LoadError::Parse {
            file: file.to_path_buf(),
            line,
            field,
            message,
        }
    })
}

/// Reads `file` and parses it with [`parse_yaml`].
///
/// # Errors
/// [`LoadError::Io`] when unreadable, else as [`parse_yaml`].
pub fn load_yaml<T: DeserializeOwned>(file: &Path) -> Result<(T, String)> {
    let text = std::fs::read_to_string(file).map_err(|source| LoadError::Io {
        file: file.to_path_buf(),
        source,
    })?;
    let value = parse_yaml(file, &text)?;
    Ok((value, text))
}

/// Best-effort line lookup for validation errors: the 1-based line of the first line whose key
/// is `key` and whose value starts with `value` (e.g. `name: backend`), else 0.
pub fn find_line(text: &str, key: &str, value: &str) -> usize {
    text.lines()
        .position(|line| {
            let trimmed = line.trim_start().trim_start_matches("- ");
            trimmed
                .strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .is_some_and(|r| r.trim().trim_matches(['"', '\'']).starts_with(value))
        })
        .map_or(0, |i| i + 1)
}
