//! A directory of Kubernetes-shaped policy YAML (several documents per file, `---` separated),
//! parsed into typed policies with file, field and line on every error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::authn::{effective_mtls_mode, MtlsMode, PeerAuthentication, RequestAuthentication};
use crate::authz::AuthorizationPolicy;
use crate::load::{parse_yaml, LoadError, Result};
use crate::traffic::TrafficPolicy;

/// Every policy of a directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySet {
    /// `kind: TrafficPolicy` documents, at most one per destination service.
    pub traffic: Vec<TrafficPolicy>,
    /// `kind: AuthorizationPolicy` documents, unique by namespace/name.
    #[serde(default)]
    pub authorization: Vec<AuthorizationPolicy>,
    /// `kind: RequestAuthentication` documents (JWT), unique by namespace/name.
    #[serde(default)]
    pub request_authentication: Vec<RequestAuthentication>,
    /// `kind: PeerAuthentication` documents (mTLS mode), unique by namespace/name.
    #[serde(default)]
    pub peer_authentication: Vec<PeerAuthentication>,
}

/// The kinds a policy directory may hold today.
pub const SUPPORTED_KINDS: &[&str] = &[
    "TrafficPolicy",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "PeerAuthentication",
];

/// Appends `policy` to `list` unless a document of the same kind has its `namespace/name`
/// (`place`: file, document text and its line offset, for the error).
fn push_unique<T>(
    list: &mut Vec<T>,
    policy: T,
    id_of: fn(&T) -> String,
    id: &str,
    name: &str,
    kind: &str,
    (file, doc, offset): (&Path, &str, usize),
) -> Result<()> {
    if list.iter().any(|p| id_of(p) == id) {
        return Err(defined_twice(file, doc, offset, kind, name, id));
    }
    list.push(policy);
    Ok(())
}

fn defined_twice(
    file: &Path,
    doc: &str,
    offset: usize,
    kind: &str,
    name: &str,
    id: &str,
) -> LoadError {
    LoadError::Invalid {
        file: file.to_path_buf(),
        line: offset + crate::load::find_line(doc, "name", name),
        field: "metadata.name".into(),
        message: format!("{kind} {id} is defined twice"),
    }
}

#[derive(Deserialize)]
struct KindOnly {
    #[serde(default)]
    kind: Option<String>,
}

/// Splits a multi-document YAML text on `---` lines: (0-based line offset, document text).
/// Documents with nothing but blank lines and comments are dropped.
pub fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

fn shift(err: LoadError, offset: usize) -> LoadError {
    match err {
        LoadError::Parse {
            file,
            line,
            field,
            message,
        } => LoadError::Parse {
            file,
            line: if line > 0 { line + offset } else { 0 },
            field,
            message,
        },
        LoadError::Invalid {
            file,
            line,
            field,
            message,
        } => LoadError::Invalid {
            file,
            line: if line > 0 { line + offset } else { 0 },
            field,
            message,
        },
        other => other,
    }
}

impl PolicySet {
    /// Parses one file's documents into `self`.
    ///
    /// # Errors
    /// [`LoadError`] naming the file, field and line (counted in the whole file).
    pub fn add_file(&mut self, file: &Path, text: &str) -> Result<()> {
        for (offset, doc) in split_documents(text) {
            let kind: KindOnly = parse_yaml(file, &doc).map_err(|e| shift(e, offset))?;
            match kind.kind.as_deref() {
                Some("TrafficPolicy") => {
                    let policy = TrafficPolicy::parse(file, &doc).map_err(|e| shift(e, offset))?;
                    if let Some(dup) = self.traffic.iter().find(|p| {
                        p.spec.service == policy.spec.service && p.namespace() == policy.namespace()
                    }) {
                        return Err(LoadError::Invalid {
                            file: file.to_path_buf(),
                            line: offset
                                + crate::load::find_line(&doc, "service", &policy.spec.service),
                            field: "spec.service".into(),
                            message: format!(
                                "service {}.{} already has TrafficPolicy {:?}; merge them",
                                policy.spec.service,
                                policy.namespace(),
                                dup.metadata.name
                            ),
                        });
                    }
                    self.traffic.push(policy);
                }
                Some("AuthorizationPolicy") => {
                    let policy =
                        AuthorizationPolicy::parse(file, &doc).map_err(|e| shift(e, offset))?;
                    let (name, id) = (policy.metadata.name.clone(), policy.id());
                    let place = (file, doc.as_str(), offset);
                    push_unique(
                        &mut self.authorization,
                        policy,
                        AuthorizationPolicy::id,
                        &id,
                        &name,
                        "AuthorizationPolicy",
                        place,
                    )?;
                }
                Some("RequestAuthentication") => {
                    let policy =
                        RequestAuthentication::parse(file, &doc).map_err(|e| shift(e, offset))?;
                    let (name, id) = (policy.metadata.name.clone(), policy.id());
                    let place = (file, doc.as_str(), offset);
                    push_unique(
                        &mut self.request_authentication,
                        policy,
                        RequestAuthentication::id,
                        &id,
                        &name,
                        "RequestAuthentication",
                        place,
                    )?;
                }
                Some("PeerAuthentication") => {
                    let policy =
                        PeerAuthentication::parse(file, &doc).map_err(|e| shift(e, offset))?;
                    let (name, id) = (policy.metadata.name.clone(), policy.id());
                    let place = (file, doc.as_str(), offset);
                    push_unique(
                        &mut self.peer_authentication,
                        policy,
                        PeerAuthentication::id,
                        &id,
                        &name,
                        "PeerAuthentication",
                        place,
                    )?;
                }
                other => {
                    return Err(LoadError::Invalid {
                        file: file.to_path_buf(),
                        line: offset + crate::load::find_line(&doc, "kind", ""),
                        field: "kind".into(),
                        message: format!(
                            "kind {:?} is not supported here (supported: {})",
                            other.unwrap_or(""),
                            SUPPORTED_KINDS.join(", ")
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Loads every `*.yaml` / `*.yml` file of `dir` (sorted by name; not recursive).
    ///
    /// # Errors
    /// The first file that cannot be read or parsed.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut set = Self::default();
        for (file, text) in read_dir_texts(dir)? {
            set.add_file(&file, &text)?;
        }
        Ok(set)
    }

    /// The AuthorizationPolicies that select a workload (its namespace's and the root
    /// namespace's, by selector).
    pub fn authorization_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + Clone + 'a {
        self.authorization
            .iter()
            .filter(move |p| p.selects(namespace, labels))
    }

    /// The RequestAuthentications that select a workload (its namespace's and the root
    /// namespace's, by selector).
    pub fn request_authentication_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a RequestAuthentication> + Clone + 'a {
        self.request_authentication
            .iter()
            .filter(move |p| p.selects(namespace, labels))
    }

    /// The effective mTLS mode of a workload's application `port` and the PeerAuthentication
    /// that set it (see [`effective_mtls_mode`]; STRICT when none applies).
    pub fn mtls_mode_for(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        port: u16,
    ) -> (MtlsMode, Option<String>) {
        effective_mtls_mode(
            self.peer_authentication_for(namespace, labels),
            namespace,
            port,
        )
    }

    /// The PeerAuthentications that apply to a workload (see
    /// [`PeerAuthentication::applies_to`]).
    pub fn peer_authentication_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a std::collections::BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a PeerAuthentication> + Clone + 'a {
        self.peer_authentication
            .iter()
            .filter(move |p| p.applies_to(namespace, labels))
    }

    /// The TrafficPolicy for service `name` in `namespace`.
    pub fn traffic_for(&self, name: &str, namespace: &str) -> Option<&TrafficPolicy> {
        self.traffic
            .iter()
            .find(|p| p.spec.service == name && p.namespace() == namespace)
    }
}

/// (path, text) of every `*.yaml`/`*.yml` file in `dir`, sorted by name.
///
/// # Errors
/// [`LoadError::Io`] for a directory that is missing or not a directory, and for unreadable
/// files.
pub fn read_dir_texts(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        // Any case: a policy in `DENY.YAML` silently skipped would fail open.
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Io {
                file: file.clone(),
                source,
            })?;
            Ok((file, text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_errors_count_lines_in_the_whole_file() {
        let text = "# shipping\napiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: a }\nspec:\n  service: a\n---\napiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: b }\nspec:\n  service: b\n  timeouts: { request: 5 }\n";
        let mut set = PolicySet::default();
        let err = set.add_file(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(err.line(), 13, "{err}");
        assert_eq!(err.field(), "spec.timeouts.request");
    }

    #[test]
    fn policy_files_are_read_whatever_the_case_of_their_extension() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.yaml", "B.YAML", "c.Yml", "notes.txt"] {
            std::fs::write(dir.path().join(name), "x: 1\n").unwrap();
        }
        let names: Vec<String> = read_dir_texts(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["B.YAML", "a.yaml", "c.Yml"]);
    }

    #[test]
    fn a_missing_policy_directory_is_an_error() {
        let err = PolicySet::load_dir(Path::new("/nonexistent/meshflow-policies")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/meshflow-policies: cannot read:"),
            "{err}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(
            PolicySet::load_dir(file.path()).is_err(),
            "a file is not a directory"
        );
    }

    #[test]
    fn unknown_kinds_and_duplicates_are_refused() {
        let mut set = PolicySet::default();
        let err = set
            .add_file(Path::new("p.yaml"), "apiVersion: v1\nkind: ConfigMap\n")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("kind \"ConfigMap\" is not supported"),
            "{err}"
        );
        let one = "apiVersion: meshflow.io/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: a }\nspec:\n  service: a\n";
        let err = set
            .add_file(Path::new("p.yaml"), &format!("{one}---\n{one}"))
            .unwrap_err();
        assert!(
            err.to_string().contains("already has TrafficPolicy"),
            "{err}"
        );
        assert_eq!(err.line(), 11);
    }
}
