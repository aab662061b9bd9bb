//! The command line as library code the binary (`src/main.rs`) only
//! dispatches to: its flags ([`args`]), `inspect`'s typed report, `info`'s
//! table, `get`'s .npy files, `bench`'s load generator and `status`'s
//! tables.
pub mod args;
pub mod info;
pub mod inspect;
pub mod loadgen;
pub mod npy;
pub mod status;

/// Writes one line to stdout for the client commands. When the reader of
/// their stdout leaves (`info | head -1`), they end as a Unix tool does, by
/// SIGPIPE, instead of panicking on EPIPE; any other write error ends the
/// process with a message and exit code 1.
pub fn say(args: std::fmt::Arguments) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // SAFETY: default disposition, then the signal to ourselves.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}
