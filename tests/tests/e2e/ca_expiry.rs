//! Issue 12, item 4: the mesh CA's expiry. The control plane refuses to start with an expired
//! CA chain; under a CA close to its end it warns, exports the end, and caps every leaf there;
//! once it has passed, sidecars count and log the failed renewal as `issuer_expired`, and the
//! outbound handshake refusal names the expiry instead of an identity mismatch.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

use crate::common::*;

/// A CA certificate valid from now + `not_before` to now + `not_after`, signed by `parent` or
/// self-signed. Returns the certificate, its key and its NotAfter (Unix seconds, as encoded).
fn ca(
    name: &str,
    not_before: time::Duration,
    not_after: time::Duration,
    parent: Option<(&Certificate, &KeyPair)>,
) -> (Certificate, KeyPair, i64) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + not_before;
    params.not_after = now + not_after;
    let cert = match parent {
        Some((p, pk)) => params.signed_by(&key, p, pk).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
    let not_after = parsed.validity().not_after.timestamp();
    (cert, key, not_after)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the control plane with `args` until it exits (or, if it starts serving, kills it and
/// fails): returns its exit code and stderr.
fn control_plane_must_not_start(dir: &Path, state: &Path, args: &[String]) -> (i32, String) {
    let mesh = write(dir, "mesh.yaml", HELLO);
    let ready = dir.join("cp-ready.json");
    let _ = std::fs::remove_file(&ready);
    let stderr_path = dir.join("cp.stderr");
    let mut child = std::process::Command::new(meshflow_cli::supervisor::find_program(
        "meshflow-control-plane",
    ))
    .arg("--mesh")
    .arg(&mesh)
    .arg("--state-dir")
    .arg(state)
    .arg("--ready-file")
    .arg(&ready)
    .args(args)
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(&stderr_path).unwrap())
    .spawn()
    .expect("meshflow-control-plane runs (cargo build --bins)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if ready.exists() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the control plane started with an unusable CA ({args:?}):\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

#[test]
fn control_plane_refuses_to_start_with_an_expired_ca_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (root, root_key, _) = ca(
        "expired test root",
        time::Duration::days(-30),
        time::Duration::minutes(-5),
        None,
    );
    let root_pem = write(dir.path(), "root.pem", &root.pem());
    let root_key_pem = write(dir.path(), "root-key.pem", &root_key.serialize_pem());

    // 1. An expired issuer given with --ca-cert/--ca-key.
    let (code, stderr) = control_plane_must_not_start(
        dir.path(),
        &dir.path().join("state1"),
        &[
            "--ca-cert".into(),
            root_pem.display().to_string(),
            "--ca-key".into(),
            root_key_pem.display().to_string(),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("expired test root") && stderr.contains("expired at"),
        "the message names the certificate and when it expired: {stderr}"
    );

    // 2. A valid intermediate whose root (in --ca-bundle) has expired: the whole chain counts.
    let (int, int_key, _) = ca(
        "valid intermediate",
        time::Duration::days(-1),
        time::Duration::days(365),
        Some((&root, &root_key)),
    );
    let int_pem = write(dir.path(), "int.pem", &int.pem());
    let int_key_pem = write(dir.path(), "int-key.pem", &int_key.serialize_pem());
    let (code, stderr) = control_plane_must_not_start(
        dir.path(),
        &dir.path().join("state2"),
        &[
            "--ca-cert".into(),
            int_pem.display().to_string(),
            "--ca-key".into(),
            int_key_pem.display().to_string(),
            "--ca-bundle".into(),
            root_pem.display().to_string(),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("expired test root"), "{stderr}");

    // 3. The generated root kept in the state directory has expired: refused, not replaced.
    let state = dir.path().join("state3");
    std::fs::create_dir_all(state.join("ca")).unwrap();
    std::fs::write(state.join("ca/root.pem"), root.pem()).unwrap();
    std::fs::write(state.join("ca/root-key.pem"), root_key.serialize_pem()).unwrap();
    let (code, stderr) = control_plane_must_not_start(dir.path(), &state, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("expired at") && stderr.contains("remove"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(state.join("ca/root.pem")).unwrap(),
        root.pem()
    );
}

/// Hostile CA input: a key that is not the certificate's, a certificate that may not
/// issue certificates and one that is not valid yet are refused at start, as configuration
/// errors naming the files and what is wrong, instead of a control plane whose every handshake
/// fails.
#[test]
fn control_plane_refuses_a_mismatched_key_a_non_ca_and_a_ca_not_valid_yet() {
    let dir = tempfile::tempdir().unwrap();
    let ca_args = |cert: &Path, key: &Path| -> Vec<String> {
        vec![
            "--ca-cert".into(),
            cert.display().to_string(),
            "--ca-key".into(),
            key.display().to_string(),
        ]
    };

    // 1. The certificate with another key.
    let (root, _, _) = ca(
        "mismatched test root",
        time::Duration::days(-1),
        time::Duration::days(365),
        None,
    );
    let cert = write(dir.path(), "mismatched.pem", &root.pem());
    let other_key = write(
        dir.path(),
        "other-key.pem",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    let (code, stderr) = control_plane_must_not_start(
        dir.path(),
        &dir.path().join("state1"),
        &ca_args(&cert, &other_key),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("does not match")
            && stderr.contains("mismatched.pem")
            && stderr.contains("other-key.pem"),
        "the message names both files and the mismatch: {stderr}"
    );

    // 2. A CA:FALSE certificate with its own key.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params
        .distinguished_name
        .push(DnType::CommonName, "leaf posing as a CA");
    let leaf = params.self_signed(&key).unwrap();
    let cert = write(dir.path(), "leaf.pem", &leaf.pem());
    let key = write(dir.path(), "leaf-key.pem", &key.serialize_pem());
    let (code, stderr) = control_plane_must_not_start(
        dir.path(),
        &dir.path().join("state2"),
        &ca_args(&cert, &key),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("leaf posing as a CA") && stderr.contains("CA:FALSE"),
        "{stderr}"
    );

    // 3. A CA valid from tomorrow.
    let (future, future_key, _) = ca(
        "future test root",
        time::Duration::days(1),
        time::Duration::days(365),
        None,
    );
    let cert = write(dir.path(), "future.pem", &future.pem());
    let key = write(dir.path(), "future-key.pem", &future_key.serialize_pem());
    let (code, stderr) = control_plane_must_not_start(
        dir.path(),
        &dir.path().join("state3"),
        &ca_args(&cert, &key),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("future test root") && stderr.contains("not valid before"),
        "{stderr}"
    );
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_near_its_end_caps_leaves_warns_and_its_expiry_is_named_by_sidecars() {
    // A root with 40 s left and the default 24 h leaf TTL.
    let keys = tempfile::tempdir().unwrap();
    let (root, root_key, ca_end) = ca(
        "short-lived test root",
        time::Duration::days(-1),
        time::Duration::seconds(40),
        None,
    );
    let cert = write(keys.path(), "ca.pem", &root.pem());
    let key = write(keys.path(), "ca-key.pem", &root_key.serialize_pem());
    let t = start_mesh(HELLO, |o| {
        o.control_plane_args = vec![
            "--ca-cert".into(),
            cert.display().to_string(),
            "--ca-key".into(),
            key.display().to_string(),
        ];
    });
    let frontend = t.mesh.workload("frontend").clone();
    let backend = t.mesh.workload("backend").clone();

    // Exported and warned.
    let cp = metrics(&t.mesh.control_plane_admin).await;
    assert_eq!(
        metric(&cp, "meshflow_ca_expiration_timestamp_seconds", &[]) as i64,
        ca_end,
        "{cp}"
    );
    let cp_log = std::fs::read_to_string(t.state_dir().join("logs/control-plane.log")).unwrap();
    assert!(
        cp_log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("mesh CA expires in")),
        "the control plane warns at start:\n{cp_log}"
    );

    // Leaves end with the CA, not 24 h later.
    for w in [&frontend, &backend] {
        let text = metrics(&w.admin).await;
        let leaf_end = metric(
            &text,
            "meshflow_identity_cert_expiration_timestamp_seconds",
            &[],
        ) as i64;
        assert_eq!(
            leaf_end, ca_end,
            "{}: leaf capped at the CA's NotAfter",
            w.key
        );
    }

    // After the CA's end every renewal fails; the sidecar says why.
    let deadline = Instant::now() + Duration::from_secs((ca_end - unix_now()).max(0) as u64 + 60);
    loop {
        let text = metrics(&frontend.admin).await;
        if metric(
            &text,
            "meshflow_identity_renewal_failures_total",
            &[("reason", "issuer_expired")],
        ) >= 1.0
        {
            assert_eq!(
                metric(
                    &text,
                    "meshflow_identity_renewal_failures_total",
                    &[("reason", "tls")]
                ),
                0.0,
                "{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal failure counted as issuer_expired:\n{text}\n{}",
            std::fs::read_to_string(t.state_dir().join("logs/proxy-default-frontend.log"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log =
        std::fs::read_to_string(t.state_dir().join("logs/proxy-default-frontend.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("SVID request failed"))
        .expect("the failed renewal is logged");
    assert!(
        line.contains("issuer_expired") && line.contains("the mesh CA has expired"),
        "{line}"
    );

    // And the data path: the refusal names the expiry, not an identity mismatch. The control
    // plane refuses from the CA's last second on (ms); certificate checks count whole seconds,
    // so wait until that second is over.
    while unix_now() <= ca_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = via(&frontend.outbound)
        .get("http://backend.default/after-expiry")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let text = metrics(&frontend.admin).await;
    assert!(
        metric(
            &text,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "outbound"), ("reason", "expired")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshflow_tls_handshake_errors_total",
            &[("direction", "outbound"), ("reason", "other")]
        ),
        0.0,
        "{text}"
    );
    let log =
        std::fs::read_to_string(t.state_dir().join("logs/proxy-default-frontend.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("outbound TLS refused"))
        .expect("the outbound refusal is logged");
    assert!(line.contains("has expired"), "{line}");
    assert!(
        !line.contains("did not prove the expected identity"),
        "{line}"
    );
}
