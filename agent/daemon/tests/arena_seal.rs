//! A client must not be able to change a committed value. The real `nencache-agent` runs as
//! an unprivileged user; a probe process, running as another user of the agent's group or
//! as the agent's own user, attaches over the attach socket exactly as a client does,
//! receives the arena descriptor and tries every way of writing the arena through it (and
//! through a read-write re-open of it via `/proc/self/fd`), each aimed at its own page of a
//! committed value. The test then reads the value back with the ordinary client.
//!
//! The tests need root (to run the agent and the probe as other users); without it they
//! print why they are skipped and pass.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    fs::{File, OpenOptions},
    os::{
        fd::AsRawFd,
        unix::{
            fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt},
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::Command,
};

use common::{AGENT, TestAgent, attach_at, pattern};
use nencache_api::{PROTOCOL_VERSION, attach::status};
use nencache_client::{Client, PutOutcome};
use rustix::{
    fs::{FallocateFlags, Mode, OFlags},
    mm::{Advice, MapFlags, MprotectFlags, ProtFlags},
};

/// Set in the probe's environment: the attach socket to use.
const PROBE_ATTACH: &str = "NENCACHE_TEST_PROBE_ATTACH";
/// Set in the probe's environment: the seed of the committed value's bytes.
const PROBE_SEED: &str = "NENCACHE_TEST_PROBE_SEED";
/// Set in the probe's environment: the agent's pid.
const PROBE_AGENT_PID: &str = "NENCACHE_TEST_PROBE_AGENT_PID";
const PROBE_TEST: &str = "seal_probe";

/// The agent's group, which the probes belong to.
const GROUP: u32 = 61_000;
/// The agent's user.
const AGENT_UID: u32 = 61_001;
/// Another user of the agent's group.
const OTHER_UID: u32 = 61_002;

const PAGE: usize = 4096;
const VALUE_PAGES: usize = 16;
const MARK: [u8; 8] = [0xee; 8];

/// Paths that may succeed as calls (they write nothing shared); the value must still be
/// unchanged.
const MAY_SUCCEED: &[&str] = &["reopen O_RDWR", "/proc/self/mem into MAP_PRIVATE"];

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn mode(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.gid())
}

/// `path` itself when every user can reach and run it, else a copy in `dir` (which the
/// users of the test can reach).
fn runnable_by_anyone(path: &Path, dir: &Path) -> PathBuf {
    let reachable = path
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0));
    if reachable && std::fs::metadata(path).unwrap().mode() & 0o001 != 0 {
        return path.to_path_buf();
    }
    let copy = dir.join(path.file_name().unwrap());
    std::fs::copy(path, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// The agent, running as `AGENT_UID:GROUP` under a given umask, on a socket in a directory
/// of its own (`<tmp>/run`, which it creates).
fn start_sealed_agent(umask: u32) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(AGENT_UID), Some(GROUP)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let exe = runnable_by_anyone(Path::new(AGENT), dir.path());
    let mut cmd = Command::new(exe);
    common::no_default_tier(&mut cmd);
    cmd.args(["serve", "--socket"])
        .arg(&socket)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--host-capacity",
            "16MiB",
        ])
        .uid(AGENT_UID)
        .gid(GROUP);
    // SAFETY: umask is async-signal-safe and changes only the child.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::umask(Mode::from_raw_mode(umask));
            Ok(())
        });
    }
    TestAgent::spawn(dir, socket, cmd)
}

/// One write path as the probe reports it.
#[derive(Debug)]
struct Outcome {
    path: String,
    result: String,
    changed: bool,
}

fn errno_name(e: rustix::io::Errno) -> String {
    use rustix::io::Errno;
    let names = [
        (Errno::PERM, "EPERM"),
        (Errno::ACCESS, "EACCES"),
        (Errno::BADF, "EBADF"),
        (Errno::INVAL, "EINVAL"),
        (Errno::NOTSUP, "EOPNOTSUPP"),
        (Errno::FAULT, "EFAULT"),
        (Errno::IO, "EIO"),
    ];
    names.iter().find(|(n, _)| *n == e).map_or_else(
        || format!("errno {}", e.raw_os_error()),
        |(_, s)| (*s).into(),
    )
}

fn result_of(r: rustix::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(e),
    }
}

/// A shared or private mapping of the whole of `fd`, kept for the probe's life.
fn map(fd: &File, len: usize, prot: ProtFlags, flags: MapFlags) -> rustix::io::Result<*mut u8> {
    // SAFETY: a fresh mapping at an address the kernel picks; it is never unmapped, and it
    // is only accessed within `len` bytes.
    unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) }.map(|p| p.cast())
}

/// Runs in the probe process (re-executed test binary, as another user) when the
/// environment names an attach socket; does nothing otherwise. Prints one
/// `PROBE<TAB>path<TAB>result<TAB>changed` line per write path.
#[test]
fn seal_probe() {
    let (Ok(attach_path), Ok(seed)) = (std::env::var(PROBE_ATTACH), std::env::var(PROBE_SEED))
    else {
        return;
    };
    let seed: u64 = seed.parse().unwrap();
    // Attach exactly as a client does (the connection lives as long as the probe).
    let (_session, reply, mut fds) = attach_at(Path::new(&attach_path), PROTOCOL_VERSION);
    assert_eq!(reply.status, status::OK, "{}", reply.message);
    assert_eq!(fds.len(), 2, "arena and staging descriptors");
    let staging = File::from(fds.pop().unwrap());
    let arena = File::from(fds.pop().unwrap());
    let len = usize::try_from(reply.arena_len).unwrap();
    let mut out: Vec<(String, String, bool)> = Vec::new();
    let access = rustix::fs::fcntl_getfl(&arena).unwrap() & OFlags::RWMODE;
    out.push((
        "received descriptor".into(),
        if access == OFlags::RDONLY {
            "O_RDONLY".into()
        } else {
            format!("{access:?}")
        },
        false,
    ));

    // Find the committed value (values start on a page boundary).
    let view = map(&arena, len, ProtFlags::READ, MapFlags::SHARED).unwrap();
    // SAFETY: `view` maps `len` readable bytes for the probe's life.
    let view = unsafe { std::slice::from_raw_parts(view.cast_const(), len) };
    let want = pattern(seed, VALUE_PAGES * PAGE);
    let off = (0..len - want.len())
        .step_by(PAGE)
        .find(|&o| view[o..o + want.len()] == want[..])
        .expect("the committed value is in the arena");
    let page_at = |i: usize| off + i * PAGE;
    let changed = |i: usize| view[page_at(i)..page_at(i) + PAGE] != want[i * PAGE..(i + 1) * PAGE];
    let mark = |p: *mut u8, i: usize| {
        // SAFETY: `p` maps the whole arena writable (the call that made it succeeded), and
        // the page lies inside the arena.
        unsafe { p.add(page_at(i)).cast::<[u8; 8]>().write_volatile(MARK) };
    };

    // What a client could do with a read-write re-open of its read-only descriptor.
    let reopened = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", arena.as_raw_fd()));
    out.push((
        "reopen O_RDWR".into(),
        match &reopened {
            Ok(_) => "ok".into(),
            Err(e) => e.raw_os_error().map_or_else(
                || e.to_string(),
                |n| errno_name(rustix::io::Errno::from_raw_os_error(n)),
            ),
        },
        false,
    ));
    let reopened = reopened.ok();
    // Each attempt aims at its own page of the value.
    let mut page = 0;
    // Every path on the re-opened descriptor when there is one, then on the received one.
    let fds: Vec<(&str, &File)> = reopened
        .iter()
        .map(|f| ("reopened", f))
        .chain([("received", &arena)])
        .collect();
    for (which, f) in &fds {
        if *which == "reopened" {
            let r = rustix::io::pwrite(f, &MARK, page_at(page) as u64);
            out.push((
                "pwrite (reopened)".to_string(),
                result_of(r.map(drop)),
                changed(page),
            ));
            page += 1;
            let r = rustix::fs::seek(f, rustix::fs::SeekFrom::Start(page_at(page) as u64))
                .and_then(|_| rustix::io::write(f, &MARK));
            out.push((
                "write (reopened)".to_string(),
                result_of(r.map(drop)),
                changed(page),
            ));
            page += 1;
        }
        let r = map(f, len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED);
        if let Ok(p) = r {
            mark(p, page);
        }
        out.push((
            format!("mmap MAP_SHARED PROT_WRITE ({which})"),
            result_of(r.map(drop)),
            changed(page),
        ));
        page += 1;
        let ro = map(f, len, ProtFlags::READ, MapFlags::SHARED).unwrap();
        // SAFETY: `ro` maps `len` bytes.
        let r = unsafe {
            rustix::mm::mprotect(ro.cast(), len, MprotectFlags::READ | MprotectFlags::WRITE)
        };
        if r.is_ok() {
            mark(ro, page);
        }
        out.push((
            format!("mprotect PROT_WRITE ({which})"),
            result_of(r),
            changed(page),
        ));
        page += 1;
        let r = rustix::fs::fallocate(
            f,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            page_at(page) as u64,
            PAGE as u64,
        );
        out.push((
            format!("fallocate PUNCH_HOLE ({which})"),
            result_of(r),
            changed(page),
        ));
        page += 1;
        let ro = map(f, len, ProtFlags::READ, MapFlags::SHARED).unwrap();
        // SAFETY: the page lies inside the `len`-byte mapping `ro`.
        let r =
            unsafe { rustix::mm::madvise(ro.add(page_at(page)).cast(), PAGE, Advice::LinuxRemove) };
        out.push((
            format!("madvise MADV_REMOVE ({which})"),
            result_of(r),
            changed(page),
        ));
        page += 1;
        // Writes through /proc/self/mem force their way into read-only mappings; into a
        // private mapping they must copy the page, never reach the shared one.
        let private = map(f, len, ProtFlags::READ, MapFlags::PRIVATE).unwrap();
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .and_then(|mem| mem.write_at(&MARK, private as u64 + page_at(page) as u64));
        let r = match r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e}"),
        };
        out.push((
            format!("/proc/self/mem into MAP_PRIVATE ({which})"),
            r,
            changed(page),
        ));
        page += 1;
    }
    // The agent's own writable mapping, through /proc/<agent>/mem: refused because the agent
    // is not dumpable (else a process of its user could write it).
    if let Ok(pid) = std::env::var(PROBE_AGENT_PID) {
        let r = std::fs::read_to_string(format!("/proc/{pid}/maps")).and_then(|maps| {
            let start = maps
                .lines()
                .find(|l| l.contains("nencache-arena") && l.split(' ').nth(1) == Some("rw-s"))
                .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
                .ok_or_else(|| std::io::Error::other("no writable arena mapping listed"))?;
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/mem"))?
                .write_at(&MARK, start + page_at(page) as u64)
        });
        out.push((
            "/proc/<agent>/mem".into(),
            match r {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("{e}"),
            },
            changed(page),
        ));
    }
    // The staging area stays writable: clients write their puts there.
    let r = map(
        &staging,
        usize::try_from(reply.staging_len).unwrap(),
        ProtFlags::READ | ProtFlags::WRITE,
        MapFlags::SHARED,
    );
    if let Ok(p) = r {
        // SAFETY: the mapping is writable and at least one page long.
        unsafe { p.cast::<[u8; 8]>().write_volatile(MARK) };
    }
    out.push((
        "staging MAP_SHARED PROT_WRITE".into(),
        result_of(r.map(drop)),
        false,
    ));
    // Resizing last: a shrink that succeeded would make the view fault.
    for (which, f) in &fds {
        for (what, size) in [("shrink", off as u64), ("grow", 2 * len as u64)] {
            let r = rustix::fs::ftruncate(f, size);
            let now = rustix::fs::fstat(&arena).unwrap().st_size;
            out.push((
                format!("ftruncate {what} ({which})"),
                result_of(r),
                now != len as i64,
            ));
        }
    }
    for (path, result, changed) in out {
        println!("PROBE\t{path}\t{result}\t{changed}");
    }
}

/// Runs the probe as `uid` (group `GROUP`) against the attach socket `attach`; `dir` is
/// where a copy of the test binary goes if the probe's user cannot reach this one.
fn run_probe(dir: &Path, attach: &Path, uid: u32, seed: u64, agent_pid: u32) -> Vec<Outcome> {
    let exe = runnable_by_anyone(&std::env::current_exe().unwrap(), dir);
    let out = Command::new(exe)
        .args(["--exact", PROBE_TEST, "--nocapture", "--test-threads=1"])
        .env(PROBE_ATTACH, attach)
        .env(PROBE_SEED, seed.to_string())
        .env(PROBE_AGENT_PID, agent_pid.to_string())
        .uid(uid)
        .gid(GROUP)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe as uid {uid} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes: Vec<Outcome> = stdout
        .lines()
        // The harness prints the test's name without a newline before its output.
        .filter_map(|l| l.split_once("PROBE\t").map(|(_, rest)| rest))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Outcome {
                path: f[0].into(),
                result: f[1].into(),
                changed: f[2] == "true",
            }
        })
        .collect();
    assert!(!outcomes.is_empty(), "the probe did not run: {stdout}");
    outcomes
}

async fn committed_values_stay_unwritable(probe_uid: u32, umask: u32) {
    if !is_root() {
        eprintln!(
            "SKIPPED: needs root, to run the agent as uid {AGENT_UID} and the probe as uid \
             {probe_uid} (group {GROUP})"
        );
        return;
    }
    let agent = start_sealed_agent(umask);
    // The socket directory, lock and sockets have their modes whatever the umask, and the
    // agent's group: the probe reaches the attach socket through them.
    let run = agent.socket.parent().unwrap();
    assert_eq!(mode(run), (0o750, GROUP), "socket directory");
    assert_eq!(mode(&run.join("agent.sock.lock")), (0o600, GROUP), "lock");
    for p in [agent.socket.clone(), agent.attach_path()] {
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(mode(&p), (0o660, GROUP), "{}", p.display());
    }

    let client = Client::connect(&agent.socket).await.unwrap();
    let seed = 0x5ea1;
    let value = pattern(seed, VALUE_PAGES * PAGE);
    assert_eq!(
        client.put(b"sealed/value", &value, b"meta").await.unwrap(),
        PutOutcome::Stored
    );
    let outcomes = tokio::task::spawn_blocking({
        let (dir, attach) = (agent.dir.path().to_path_buf(), agent.attach_path());
        let pid = agent.child.id();
        move || run_probe(&dir, &attach, probe_uid, seed, pid)
    })
    .await
    .unwrap();
    let mut table = String::new();
    let mut wrote = Vec::new();
    for o in &outcomes {
        table.push_str(&format!(
            "  {:<45} {:<10} {}\n",
            o.path,
            o.result,
            if o.changed { "VALUE CHANGED" } else { "" }
        ));
        let expected_ok = MAY_SUCCEED.iter().any(|p| o.path.starts_with(p))
            || o.path.starts_with("staging")
            || o.path == "received descriptor";
        if o.changed || (o.result == "ok" && !expected_ok) {
            wrote.push(o.path.clone());
        }
    }
    eprintln!("write paths as uid {probe_uid} (agent uid {AGENT_UID}):\n{table}");
    let staging = outcomes.iter().find(|o| o.path.starts_with("staging"));
    assert_eq!(
        staging.map(|o| o.result.as_str()),
        Some("ok"),
        "clients must still write the staging area:\n{table}"
    );
    assert_eq!(
        outcomes
            .iter()
            .find(|o| o.path == "received descriptor")
            .map(|o| o.result.as_str()),
        Some("O_RDONLY")
    );
    // The value reads back unchanged through the ordinary client, and the agent still
    // commits through its own mapping.
    let got = client.get(&[b"sealed/value"]).await.unwrap().pop().unwrap();
    let intact = got.as_deref() == Some(&value[..]);
    drop(got);
    let again = pattern(seed + 1, 3 * PAGE + 5);
    assert_eq!(
        client.put(b"sealed/after", &again, b"").await.unwrap(),
        PutOutcome::Stored
    );
    let after = client.get(&[b"sealed/after"]).await.unwrap().pop().unwrap();
    assert_eq!(
        after.as_deref(),
        Some(&again[..]),
        "the agent still commits"
    );
    assert!(
        wrote.is_empty() && intact,
        "uid {probe_uid} wrote the arena through {wrote:?} (value intact: {intact}):\n{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_of_the_agents_group_cannot_write_committed_values() {
    committed_values_stay_unwritable(OTHER_UID, 0o077).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_user_cannot_write_committed_values() {
    committed_values_stay_unwritable(AGENT_UID, 0o000).await;
}
