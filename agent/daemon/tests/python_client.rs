//! The contract in `docs/api.md` is enough to write a client: `grpc_client.py`, written from
//! that page and the proto alone with Python's stock `grpcio`, runs against the real agent.
//! It handshakes, attaches (descriptors over `SCM_RIGHTS`), maps the regions, puts and gets
//! over gRPC and over fast-path frames, and checks the documented errors and the page's
//! worked exchange byte for byte; see the script's docstring for the full list.
//!
//! The test needs `python3` with `grpcio` and `grpcio-tools` (`.ci/run` installs them);
//! without them it prints why it is skipped and passes.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    fs::File,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_client.py");

/// Far more than a run takes (a few seconds), so that a hung script fails the test.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_python_client_written_from_the_api_doc_passes_against_the_agent() {
    if !python_has_grpc() {
        eprintln!(
            "skipped: needs python3 with grpcio and grpcio-tools \
             (python3 -m pip install grpcio grpcio-tools)"
        );
        return;
    }
    let agent = TestAgent::start(&[]);
    // stdout and stderr into one file, in the order the script wrote them.
    let out_path = agent.dir.path().join("grpc_client.out");
    let out = File::create(&out_path).unwrap();
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg(&agent.socket)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(status) if status.success() => println!("{output}"),
        Some(status) => panic!(
            "grpc_client.py failed ({status}):\n{output}\n--- agent log:\n{}",
            agent.log()
        ),
        None => panic!(
            "grpc_client.py still running after {SCRIPT_TIMEOUT:?}, killed:\n{output}\n\
             --- agent log:\n{}",
            agent.log()
        ),
    }
}
