//! What the agent's process tests share: a real `nencache-agent` on a temporary socket, a
//! hand-made attach, byte patterns and polling.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::{
    io::Write,
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use nencache_api::{
    PROTOCOL_VERSION,
    attach::{self, Hello, Reply},
};
use nencache_client::{Client, ClientError};
use tonic::Code;

pub const AGENT: &str = env!("CARGO_BIN_EXE_nencache-agent");
pub const CLI: &str = env!("CARGO_BIN_EXE_nencache");

pub struct TestAgent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    args: Vec<String>,
}

impl TestAgent {
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        Self::start_at(dir, socket, extra)
    }

    pub fn start_at(dir: tempfile::TempDir, socket: PathBuf, extra: &[&str]) -> Self {
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut args = vec![
            "serve",
            "--socket",
            socket.to_str().unwrap(),
            "--admin-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ];
        if !extra.contains(&"--host-capacity") {
            args.extend_from_slice(&["--host-capacity", "64MiB"]);
        }
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let child = no_default_tier(&mut Command::new(AGENT))
            .args(&args)
            .stderr(log)
            .spawn()
            .unwrap();
        let mut a = Self {
            child,
            dir,
            socket,
            args,
        };
        a.wait_ready();
        a
    }

    /// An agent started by the caller (another user, a given umask) from `cmd`, with its
    /// standard error going to `<dir>/agent.log`, once it serves `socket`. It cannot be
    /// restarted.
    pub fn spawn(dir: tempfile::TempDir, socket: PathBuf, mut cmd: Command) -> Self {
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = cmd.stderr(log).spawn().unwrap();
        let mut a = Self {
            child,
            dir,
            socket,
            args: Vec::new(),
        };
        a.wait_ready();
        a
    }

    /// Kills the agent with SIGKILL (no clean-up at all) and starts a new one on the same
    /// socket with the same arguments, as a DaemonSet would after an OOM kill.
    pub fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        self.child = no_default_tier(&mut Command::new(AGENT))
            .args(&self.args)
            .stderr(log)
            .spawn()
            .unwrap();
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) {
        let t = Instant::now();
        while !self.log().contains("nencache agent serving") {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited with {status}: {}", self.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "agent not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin_addr(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("admin endpoint listening"))
            .unwrap();
        let start = line.find("\"addr\":\"").unwrap() + 8;
        line[start..].split('"').next().unwrap().to_string()
    }

    /// A GET on the admin endpoint; the whole response, status line included.
    pub fn http(&self, path: &str) -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(self.admin_addr()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// How many calls of `method` the agent has answered, all codes together.
    pub fn calls(&self, method: &str) -> u64 {
        let needle = format!("nencache_agent_rpc_total{{method=\"{method}\"");
        self.http("/metrics")
            .lines()
            .filter(|l| l.starts_with(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn attach_path(&self) -> PathBuf {
        self.socket.with_extension("sock.attach")
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.unwrap()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches by hand, as a client library would: hello, then the reply with descriptors.
pub fn raw_attach(
    agent: &TestAgent,
) -> (
    std::os::unix::net::UnixStream,
    Reply,
    Vec<std::os::fd::OwnedFd>,
) {
    raw_attach_as(agent, PROTOCOL_VERSION)
}

/// [`raw_attach`] with the hello's version given.
pub fn raw_attach_as(
    agent: &TestAgent,
    version: u32,
) -> (
    std::os::unix::net::UnixStream,
    Reply,
    Vec<std::os::fd::OwnedFd>,
) {
    attach_at(&agent.attach_path(), version)
}

/// Attaches by hand to the attach socket at `path`, with the hello's version given.
pub fn attach_at(
    path: &std::path::Path,
    version: u32,
) -> (
    std::os::unix::net::UnixStream,
    Reply,
    Vec<std::os::fd::OwnedFd>,
) {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.write_all(
        &Hello {
            version,
            tenant: String::new(),
        }
        .encode(),
    )
    .unwrap();
    let mut buf = vec![0u8; 512];
    let mut fds = Vec::new();
    let n = attach::recv_with_fds(s.as_fd(), &mut buf, &mut fds).unwrap();
    (s, Reply::decode(&buf[..n]).unwrap(), fds)
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn code(r: Result<impl std::fmt::Debug, ClientError>) -> Code {
    r.unwrap_err().code().expect("a status from the agent")
}

pub async fn raw_grpc(
    socket: &std::path::Path,
) -> nencache_api::v1::node_cache_client::NodeCacheClient<tonic::transport::Channel> {
    nencache_api::v1::node_cache_client::NodeCacheClient::new(raw_channel(socket).await)
}

pub async fn raw_channel(socket: &std::path::Path) -> tonic::transport::Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// Runs the agent without the default lower tier (a file in the user's data directory that
/// every test agent would share), unless its flags configure tiers.
pub fn no_default_tier(cmd: &mut Command) -> &mut Command {
    cmd.env("NENCACHE_AGENT_NVME_SIZE", "0")
}

/// The address a compat listener of `protocol` (`lm`, `redis`) logged it serves on.
pub fn listener_addr(agent: &TestAgent, protocol: &str) -> String {
    let t = Instant::now();
    loop {
        let log = agent.log();
        if let Some(line) = log.lines().find(|l| {
            l.contains("compat listener serving")
                && l.contains(&format!("\"protocol\":\"{protocol}\""))
        }) {
            let start = line.find("\"addr\":\"").unwrap() + 8;
            return line[start..].split('"').next().unwrap().to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no listener: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
