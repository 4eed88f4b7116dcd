//! Issue 12, item 12: what the README, docs/ARCHITECTURE.md and the example files tell a new
//! user must match what is built. (The README's workflow commands themselves are run against
//! the demo by `tests/tests/e2e/readme.rs`.)

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The paragraph of `text` that starts with `start`.
fn paragraph<'a>(text: &'a str, start: &str) -> &'a str {
    let at = text
        .find(start)
        .unwrap_or_else(|| panic!("no paragraph {start:?}"));
    let rest = &text[at..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn built_features_are_not_called_unbuilt() {
    let readme = read("README.md");
    let status = paragraph(&readme, "Status:")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let unbuilt = &status[status.find("Not built yet").unwrap_or(status.len())..];
    for built in ["racing", "dashboards", "meshflow demo"] {
        assert!(
            !unbuilt.contains(built) || unbuilt.contains(&format!("holds the {built}")),
            "README Status says {built} is not built: {status}"
        );
    }
    assert!(!status.contains("are not built yet"), "{status}");
    assert!(
        !readme.contains("will also coordinate"),
        "the intro still speaks of workflows in the future"
    );
    let cli = paragraph(&readme, "- **`meshflow` CLI**");
    for command in [
        "meshflow demo",
        "meshflow up",
        "meshflow workflow",
        "meshflow stat",
    ] {
        assert!(cli.contains(command), "CLI bullet lacks {command}: {cli}");
    }

    let architecture = read("docs/ARCHITECTURE.md");
    let last = &architecture[architecture.find("## Not built yet").unwrap()..];
    assert!(!last.contains("meshflow demo"), "{last}");
    for line in architecture.lines().filter(|l| l.contains("Not built yet")) {
        assert!(
            !line.contains("OpenTelemetry") && !line.contains("spans"),
            "{line}"
        );
    }
}

#[test]
fn example_files_point_at_what_runs_them() {
    let hello = read("examples/hello/mesh.yaml");
    let header: String = hello
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        header.contains("meshflow up -f examples/hello/mesh.yaml"),
        "{header}"
    );
    assert!(
        !header.contains("Run it: scripts/quickstart"),
        "the quick start runs the demo, not the hello mesh: {header}"
    );
}

/// Every `-f <file>` / `-d <dir>` in the README's shell blocks names something in the
/// repository (placeholders and `-f -`, standard input, aside).
#[test]
fn readme_commands_name_files_that_exist() {
    let readme = read("README.md");
    let mut checked = 0;
    for block in readme.split("```sh\n").skip(1) {
        let block = block.split("\n```").next().unwrap();
        for line in block.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            for pair in words.windows(2) {
                if matches!(pair[0], "-f" | "-d") && !pair[1].contains('<') && pair[1] != "-" {
                    assert!(
                        repo().join(pair[1]).exists(),
                        "README names {} in `{line}`, which does not exist",
                        pair[1]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 4, "{checked}");
}
