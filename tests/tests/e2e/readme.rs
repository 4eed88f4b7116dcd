//! Issue 12, items 11, 12 and 15: the README's workflow commands, copy-pasted as a new user
//! would — `meshflow` installed with `scripts/install`, the demo left running with
//! `--keep-running`, the `export …` line it prints pasted first — against the demo's
//! `place-order` workflow; and what those commands print.

use crate::demo::Running;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The README's shell block in section `section` that contains `marker`: its command lines.
pub fn readme_commands(section: &str, marker: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find(&format!("\n## {section}\n"))
        .unwrap_or_else(|| panic!("README has no section {section}"));
    let body = &readme[start + 1..];
    let body = &body[..body[3..].find("\n## ").map_or(body.len(), |i| i + 3)];
    let block = body
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("\n```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no sh block with {marker:?} in README section {section}"));
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Runs `line` with `sh` in the repository, after the pasted `export` line, with `path` as
/// PATH and no other meshflow settings.
fn shell(path: &str, export: &str, line: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("{export}\n{line}"))
        .current_dir(repo())
        .env("PATH", path)
        .env_remove("MESHFLOW_WORKFLOW_API")
        .env_remove("MESHFLOW_WORKFLOW_TOKEN_FILE")
        .env_remove("MESHFLOW_WORKFLOW_TOKEN")
        .output()
        .unwrap()
}

fn ok(line: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{line}` failed: {stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "`{line}`: {stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_workflow_commands_work_against_the_demo() {
    // Item 11: the install step, as the quick start runs it (into a directory of our own).
    let bin = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/install"))
        .arg("--no-build")
        .env("MESHFLOW_INSTALL_DIR", bin.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Terminal 1: the demo, left running (the README's quick start with --keep-running).
    let mut demo = Running(
        Command::new(bin.path().join("meshflow"))
            .args(["demo", "--orders", "10", "--keep-running"])
            .env("PATH", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !printed.iter().any(|l: &String| l.starts_with("mesh is up")) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            printed.push(line);
        }
        assert!(
            demo.0.try_wait().unwrap().is_none(),
            "demo exited:\n{}",
            printed.join("\n")
        );
        assert!(Instant::now() < deadline, "{}", printed.join("\n"));
    }
    let text = printed.join("\n");
    // The hints name the installed command, and give the API and token to paste.
    let export = printed
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("export MESHFLOW_WORKFLOW_API=http://"))
        .unwrap_or_else(|| panic!("no export hint:\n{text}"))
        .to_string();
    assert!(
        export.contains(" MESHFLOW_WORKFLOW_TOKEN_FILE=/"),
        "{export}"
    );
    assert!(
        text.contains("\n  meshflow workflow get order-0010"),
        "{text}"
    );

    // Terminal 2: the README's commands, verbatim, after the pasted export line.
    let commands = readme_commands("Workflows", "meshflow workflow start");
    assert!(commands.len() >= 4, "{commands:?}");
    let mut outputs = Vec::new();
    for line in &commands {
        outputs.push((line.clone(), ok(line, &shell(&path, &export, line))));
    }
    let started = outputs
        .iter()
        .find(|(l, _)| l.contains("workflow start"))
        .map(|(l, out)| (l.clone(), out.clone()))
        .unwrap();
    assert!(started.1.contains("started"), "{started:?}");
    let run = started
        .0
        .split("--id ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the README names its run id")
        .to_string();
    // The run it started completes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let get = format!("meshflow workflow get {run}");
        let out = ok(&get, &shell(&path, &export, &get));
        if out.contains("status     Completed") {
            break;
        }
        assert!(Instant::now() < deadline, "{run} did not complete:\n{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Item 15, against the live API.
    let list = |args: &str| {
        let line = format!("meshflow workflow list {args}");
        ok(&line, &shell(&path, &export, &line))
    };
    assert!(list("--status compensated").contains("order-0010"));
    assert!(list("--status COMPENSATED").contains("order-0010"));
    assert!(!list("--status compensated").contains("order-0009"));
    assert!(list("--workflow place-order").contains("order-0009"));
    let out = shell(&path, &export, "meshflow workflow list --status Bogus");
    assert_eq!(out.status.code(), Some(2));
    // Steps in the order they ran (alphabetically, charge came first).
    let get = "meshflow workflow get order-0010";
    let view = ok(get, &shell(&path, &export, get));
    let at = |step: &str| {
        view.lines()
            .position(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("{step}: {view}"))
    };
    assert!(
        at("reserve") < at("charge") && at("charge") < at("ship"),
        "{view}"
    );
    // History has a time column.
    let history = "meshflow workflow history order-0010";
    let table = ok(history, &shell(&path, &export, history));
    assert!(table.starts_with("#"), "{table}");
    assert!(
        table.lines().next().unwrap().contains("TIME (UTC)"),
        "{table}"
    );
    let year = table.lines().nth(1).unwrap();
    assert!(year.contains(" 20"), "{table}");
    // A reader that went away (`| head` after its lines) is no panic.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{export}\nexec meshflow workflow history order-0010"
        ))
        .env("PATH", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{} {stderr}", out.status);
    // Without the token: a hint at where it is.
    let api_only = export
        .split(" MESHFLOW_WORKFLOW_TOKEN_FILE=")
        .next()
        .unwrap();
    let out = shell(&path, api_only, get);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--token-file <state-dir>/workflow-api-token"),
        "{stderr}"
    );
    drop(demo);
}
