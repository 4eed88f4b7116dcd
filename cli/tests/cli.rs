//! The `meshflow` binary as a new user meets it, without a running mesh (issue 12, items
//! 11–15): input errors, hints, the install and quick-start scripts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn meshflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshflow"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Item 13: a policy directory that does not exist is an input error (64), not "REFUSED
/// plaintext … STRICT" (4).
#[test]
fn policy_check_of_a_missing_directory_is_an_input_error() {
    let out = meshflow()
        .args([
            "policy",
            "check",
            "-d",
            "nosuchdir",
            "--label",
            "app=payment",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(stderr.contains("nosuchdir: cannot read"), "{stderr}");
    assert!(!stdout.contains("REFUSED"), "{stdout}");
}

/// Item 13: a `jwksUri: file://…` that is not there is an input error too.
#[test]
fn policy_check_with_a_missing_key_set_file_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("jwt.yaml"),
        "apiVersion: meshflow.io/v1alpha1\nkind: RequestAuthentication\nmetadata: { name: jwt, namespace: default }\nspec:\n  jwtRules:\n  - issuer: https://auth.example.com\n    jwksUri: file://jwks.json\n",
    )
    .unwrap();
    let out = meshflow()
        .args(["policy", "check", "-d"])
        .arg(dir.path())
        .args(["--principal", "cluster.local/ns/default/sa/a"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(stderr.contains("jwks.json: cannot read"), "{stderr}");
}

/// Item 13: `meshflow up` refuses a mesh file whose `policiesDir` does not exist, naming the
/// file, the field and the line, before starting anything.
#[test]
fn up_refuses_a_missing_policies_dir_naming_file_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: meshflow.io/v1alpha1\nkind: Mesh\nmetadata: { name: m }\nspec:\n  policiesDir: policies\n  workloads:\n    - name: a\n      app: { command: [\"true\"] }\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = meshflow()
        .args(["up", "-f"])
        .arg(&mesh)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:5: spec.policiesDir: policy directory",
            mesh.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!state.exists(), "nothing started, nothing written");
}

/// Item 15: an unknown `--status` is a usage error listing the values; any case is accepted.
#[test]
fn workflow_list_status_is_checked_and_case_insensitive() {
    let out = meshflow()
        .args([
            "workflow",
            "list",
            "--status",
            "Bogus",
            "--api",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid value 'Bogus'"), "{stderr}");
    assert!(stderr.contains("Compensated"), "{stderr}");
    // Parsed (lower case): the command gets as far as the (absent) API.
    let out = meshflow()
        .args([
            "workflow",
            "list",
            "--status",
            "compensated",
            "--api",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the workflow API"), "{stderr}");
}

/// Item 15: an unreachable API says what to check.
#[test]
fn an_unreachable_workflow_api_gives_a_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = meshflow()
        .args(["workflow", "get", "order-1", "--api"])
        .arg(format!("http://127.0.0.1:{port}"))
        .env_remove("MESHFLOW_WORKFLOW_TOKEN_FILE")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach the workflow API at http://127.0.0.1:{port}"
        )),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
    assert!(stderr.contains("workflow API\""), "{stderr}");
}

/// One HTTP answer from a listener on a thread (something that is not the workflow API).
fn one_answer(response: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://{addr}")
}

/// Item 15: `--api` at a port that is not the workflow API said `HTTP 404: -`.
#[test]
fn a_wrong_api_port_says_so() {
    let api = one_answer(
        "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found",
    );
    let out = meshflow()
        .args(["workflow", "get", "order-1", "--api", &api])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("HTTP 404: -"), "{stderr}");
    assert!(
        stderr.contains(&format!("HTTP 404 from {api} without a workflow API error")),
        "{stderr}"
    );
}

/// Item 15: a missing token says where the token is.
#[test]
fn a_missing_token_says_where_the_token_is() {
    let api = one_answer("HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 29\r\nconnection: close\r\n\r\n{\"error\":\"missing API token\"}");
    let out = meshflow()
        .args(["workflow", "list", "--api", &api])
        .env_remove("MESHFLOW_WORKFLOW_TOKEN_FILE")
        .env_remove("MESHFLOW_WORKFLOW_TOKEN")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no token was given"), "{stderr}");
    assert!(
        stderr.contains("--token-file <state-dir>/workflow-api-token"),
        "{stderr}"
    );

    let out = meshflow()
        .args([
            "workflow",
            "list",
            "--api",
            &api,
            "--token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("token file /nonexistent/token"), "{stderr}");
    assert!(stderr.contains("meshflow up` prints the file"), "{stderr}");
}

/// Item 15: `meshflow stat --admin` takes the `http://` form `meshflow up` prints.
#[test]
fn stat_takes_the_admin_url_up_prints() {
    let out = meshflow()
        .args(["stat", "--admin", "https://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // The http:// form is accepted; the (absent) sidecar is what fails.
    let out = meshflow()
        .args(["stat", "--admin", "http://127.0.0.1:1", "--window", "10ms"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1:"), "{stderr}");
    assert!(!stderr.contains("http://http://"), "{stderr}");
}

/// Item 11: `scripts/install` links `meshflow` into a directory on PATH, and the linked
/// command finds its sibling binaries (it runs `meshflow --version` through the link).
#[test]
fn install_links_meshflow_onto_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/install"))
        .arg("--no-build")
        .env("MESHFLOW_INSTALL_DIR", dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let link = dir.path().join("meshflow");
    assert_eq!(
        link.canonicalize().unwrap(),
        repo().join("target/debug/meshflow").canonicalize().unwrap()
    );
    assert!(stderr.contains("is not on your PATH"), "{stderr}");
    let out = Command::new(&link).arg("--version").output().unwrap();
    assert!(out.status.success());
}

/// Item 11: the quick start says how long the first build takes, shows cargo's progress (no
/// `--quiet`) and installs `meshflow`. `cargo` is replaced by a recorder, and the demo asked
/// for its `--help`, so nothing is built or started.
#[test]
fn quickstart_says_how_long_the_build_takes_and_shows_progress() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let calls = dir.path().join("cargo-calls");
    let cargo = bin.join("cargo");
    std::fs::write(
        &cargo,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let installed = dir.path().join("installed");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(repo().join("scripts/quickstart"))
        .arg("--help")
        .env("PATH", &path)
        .env("MESHFLOW_INSTALL_DIR", &installed)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("The first build takes ~15-20 minutes on 2 cores"),
        "{stderr}"
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(calls.contains("build --bins"), "{calls}");
    assert!(!calls.contains("--quiet"), "{calls}");
    assert!(installed.join("meshflow").exists());
    assert!(
        stdout.contains("--keep-running"),
        "the demo's help: {stdout}"
    );
}
