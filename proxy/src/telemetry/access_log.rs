//! The optional access log (`--access-log -` for stdout, or a file path, appended): one JSON
//! object per line and request, with the trace id of the request's span (the caller's trace
//! when its `traceparent` was valid, else the fresh one that replaced it), direction, peer principal, method, authority, normalized path, status,
//! duration (ms), endpoint, retries and the authorization decision and policy.

use std::io::Write;
use std::sync::Mutex;

/// Where access-log lines go.
pub struct AccessLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl AccessLog {
    /// `-` (or `stdout`): standard output; otherwise a file opened for appending.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(target: &str) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if target == "-" || target == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        Ok(Self {
            out: Mutex::new(out),
        })
    }

    /// Writes one entry as a line (a failed write is dropped: logging never fails a request).
    pub fn write(&self, entry: &serde_json::Value) {
        let mut line = entry.to_string();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}
