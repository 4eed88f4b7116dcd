//! `meshflow-proxy wait-ready [--admin 127.0.0.1:15020] [--timeout 120s]`: returns (exit 0)
//! once the sidecar's admin `/ready` answers 200, exit 1 at the timeout. Injection runs it as
//! the classic proxy container's `postStart` hook: the kubelet starts the next container only
//! when the hook returns, so the app never starts before its proxy. Blocking std I/O, no
//! runtime: it runs once per pod start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;

/// Flags of `meshflow-proxy wait-ready`.
#[derive(Debug, Parser)]
#[command(
    name = "meshflow-proxy wait-ready",
    about = "Wait until the sidecar's admin /ready answers 200 (exit 0), or exit 1 at the timeout"
)]
pub struct WaitReady {
    /// The sidecar's admin address.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Parses `args` (after `wait-ready`), waits, and returns the exit code.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let flags = match WaitReady::try_parse_from(
        std::iter::once(std::ffi::OsString::from("wait-ready")).chain(args),
    ) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 64 } else { 0 };
        }
    };
    match wait(flags.admin, flags.timeout) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("meshflow-proxy wait-ready: {e}");
            1
        }
    }
}

/// Polls `http://<admin>/ready` every 100 ms until it answers 200.
///
/// # Errors
/// At `timeout`, with the last answer (or connection error).
pub fn wait(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match ready_status(admin) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("/ready answered {status}"),
            Err(e) => format!("{admin}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(format!("not ready after {timeout:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ready_status(admin: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut head = [0u8; 32];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    // "HTTP/1.x 200 …"
    std::str::from_utf8(&head[..read])
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn waits_for_a_200_and_gives_up_at_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for status in [
                "503 Service Unavailable",
                "503 Service Unavailable",
                "200 OK",
            ] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = [0u8; 256];
                let _ = stream.read(&mut request);
                let _ = write!(stream, "HTTP/1.0 {status}\r\ncontent-length: 0\r\n\r\n");
            }
        });
        let started = Instant::now();
        wait(admin, Duration::from_secs(10)).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "two 503s first"
        );
        server.join().unwrap();

        // Nothing listens there any more.
        let err = wait(admin, Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("not ready after"), "{err}");
        assert_eq!(
            main([
                "--admin".into(),
                admin.to_string().into(),
                "--timeout".into(),
                "100ms".into()
            ]),
            1
        );
        assert_eq!(main(["--admin".into(), "nowhere".into()]), 64);
    }
}
