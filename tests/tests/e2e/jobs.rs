//! Issue 14, acceptance 5: Jobs in classic mode. The proxy is an ordinary container there, so
//! the pod only completes once it exits: after the app's work, the Job's command calls
//! `POST /shutdown` on the proxy's admin port (loopback only), and the proxy drains and exits 0
//! within its drain time + 2 s. The admin listener binds every address in an injected pod (the
//! kubelet probes it), so a peer from outside the pod must be refused.

use std::time::{Duration, Instant};

use meshflow_cli::up::LocalMesh;

use crate::common::*;

/// A local address other than loopback (the one the default route leaves from, else any
/// interface's), so a connection from it is a non-loopback peer of this host's own listener.
fn non_loopback_address() -> std::net::IpAddr {
    let usable = |ip: &std::net::IpAddr| !ip.is_loopback() && !ip.is_unspecified();
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    let routed = socket
        .connect("192.0.2.254:9")
        .or_else(|_| socket.connect("10.255.255.254:9"))
        .ok()
        .and_then(|()| socket.local_addr().ok())
        .map(|a| a.ip())
        .filter(usable);
    // A host without a default route still has its interfaces' addresses.
    let any_interface = || {
        nix::ifaddrs::getifaddrs()
            .ok()?
            .filter_map(|i| {
                i.address?
                    .as_sockaddr_in()
                    .map(|a| std::net::IpAddr::V4(a.ip()))
            })
            .find(usable)
    };
    routed.or_else(any_interface).unwrap_or_else(|| {
        panic!("this host has no IPv4 address other than loopback to test a remote peer from")
    })
}

/// `method /shutdown` on `admin`, from `from` (a local address) when given.
async fn shutdown_request(
    admin: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
    method: &str,
) -> String {
    admin_request(admin, from, method, "/shutdown").await
}

/// `method path` on `admin`, from `from` (a local address) when given: the whole answer.
async fn admin_request(
    admin: std::net::SocketAddr,
    from: Option<std::net::IpAddr>,
    method: &str,
    path: &str,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = match admin {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4().unwrap(),
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6().unwrap(),
    };
    if let Some(ip) = from {
        socket.bind(std::net::SocketAddr::new(ip, 0)).unwrap();
    }
    let mut stream = socket.connect(admin).await.unwrap();
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {admin}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_from_loopback_ends_the_proxy_within_drain_plus_two_seconds() {
    let drain = Duration::from_secs(1);
    let mut t = start_mesh(HELLO, |o| {
        o.drain = drain;
        o.skip_sidecars.insert("default/backend".into());
    });
    let app_port = t.mesh.app_ports["default/backend"];
    // As in an injected pod: the admin listener on every address.
    t.mesh
        .spawn_sidecar(
            "default/backend",
            app_port,
            &["--admin".to_string(), "0.0.0.0:0".to_string()],
        )
        .unwrap();
    let backend = t.mesh.wait_sidecar("default/backend", app_port).unwrap();
    let port: u16 = backend.admin.rsplit(':').next().unwrap().parse().unwrap();
    let sidecar = LocalMesh::sidecar_process("default/backend");

    // From outside the pod (a non-loopback peer): refused, the proxy keeps running.
    let outside = non_loopback_address();
    let answer = shutdown_request(
        std::net::SocketAddr::new(outside, port),
        Some(outside),
        "POST",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // /config_dump shows the app's probe headers (credentials, maybe): pod-local only too.
    let answer = admin_request(
        std::net::SocketAddr::new(outside, port),
        Some(outside),
        "GET",
        "/config_dump",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let answer = admin_request(loopback, None, "GET", "/config_dump").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = shutdown_request(loopback, None, "GET").await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = |t: &mut TestMesh| {
        t.mesh
            .supervisor
            .get_mut(&sidecar)
            .map(|c| c.child.try_wait().unwrap())
    };
    assert!(matches!(running(&mut t), Some(None)), "the proxy exited");
    assert_eq!(
        get_text(&backend.admin.replace("0.0.0.0", "127.0.0.1"), "/live").await,
        "ok\n"
    );

    // Bounded: one address holding idle connections gets 16; the 17th is closed at once, and
    // another client (the kubelet) is still served meanwhile.
    let idle = fill_per_address_cap(loopback, [127, 0, 0, 2].into(), 16).await;
    assert_eq!(
        get_text(&backend.admin.replace("0.0.0.0", "127.0.0.1"), "/live").await,
        "ok\n"
    );
    drop(idle);

    // The Job's app finishes its work and exits; then its command ends the proxy.
    t.mesh.supervisor.stop("app-default-backend");
    let asked = Instant::now();
    let answer = shutdown_request(loopback, None, "POST").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = loop {
        if let Some(Some(status)) = running(&mut t) {
            break status;
        }
        assert!(
            asked.elapsed() < drain + Duration::from_secs(10),
            "the proxy still runs {:?} after POST /shutdown",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = asked.elapsed();
    eprintln!("POST /shutdown to exit: {took:?} (drain {drain:?})");
    // Exit 0: a Job's pod succeeds only when every container does.
    assert!(status.success(), "the proxy exited with {status}");
    assert!(
        took <= drain + Duration::from_secs(2),
        "the proxy took {took:?} to exit (drain {drain:?})"
    );
    // The other sidecar of the mesh is untouched.
    let frontend = t.mesh.workload("default/frontend").clone();
    assert_eq!(get_text(&frontend.admin, "/ready").await, "ready\n");
}
