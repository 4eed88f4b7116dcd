//! Writing command output to stdout without panicking when the reader has gone away
//! (`meshflow workflow history … | head`).

use std::io::Write;

/// Writes `text` to stdout. A closed pipe ends the process quietly with status 0 (the reader
/// had what it wanted); any other write error ends it with status 74 (EX_IOERR).
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("meshflow: writing to stdout: {e}");
        std::process::exit(74);
    }
}

/// [`print`] with a newline.
pub fn println(text: &str) {
    print(&format!("{text}\n"));
}
