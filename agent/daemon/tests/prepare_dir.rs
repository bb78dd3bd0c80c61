//! `nencache-agent prepare-dir` (the DaemonSet's root init container): it hands a directory
//! to the agent's user only when that is safe (one it creates, one the user owns already, or
//! an empty root-owned 0755 one as the kubelet's `DirectoryOrCreate` makes it) and refuses,
//! changing nothing, anything else. Run as root (as the init container is), the refusals are
//! checked against a `chown` that would succeed.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::Path,
    process::Command,
};

use nencache_agent::socket::prepare_dir;

/// Another user and group than the test's own, as the agent's are to the init container.
const AGENT: u32 = 65532;

fn owner_and_mode(p: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn me() -> (u32, u32) {
    (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    )
}

fn is_root() -> bool {
    me().0 == 0
}

#[test]
fn a_directory_it_creates_is_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("run/nencache");
    let (uid, gid) = if is_root() { (AGENT, AGENT) } else { me() };
    prepare_dir(&target, uid, gid, 0o750).unwrap();
    assert_eq!(owner_and_mode(&target), (uid, gid, 0o750));
    // The parent it had to create stays the caller's, open to traverse.
    let parent = owner_and_mode(&dir.path().join("run"));
    assert_eq!((parent.0, parent.2), (me().0, 0o755));
    // Again, as after an agent restart (the directory is the agent's now, with its sockets):
    // accepted, and a new mode takes.
    fs::write(target.join("agent.sock.lock"), b"").unwrap();
    prepare_dir(&target, uid, gid, 0o770).unwrap();
    assert_eq!(owner_and_mode(&target), (uid, gid, 0o770));
}

#[test]
fn an_empty_directory_as_the_kubelet_creates_it_is_handed_over() {
    if !is_root() {
        eprintln!("skipped: needs root, as the init container has (a root-owned directory)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("nencache");
    fs::DirBuilder::new().mode(0o755).create(&target).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(owner_and_mode(&target), (0, 0, 0o755));
    prepare_dir(&target, AGENT, AGENT, 0o750).unwrap();
    assert_eq!(owner_and_mode(&target), (AGENT, AGENT, 0o750));
}

#[test]
fn a_directory_that_is_not_safe_to_hand_over_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (other_uid, other_gid) = if is_root() {
        (AGENT, AGENT)
    } else {
        (me().0 + 1, me().1 + 1)
    };

    // Someone's directory with contents, like /etc: the 0755 mode of a kubelet-made directory,
    // but not empty.
    let etc = dir.path().join("etc");
    fs::create_dir(&etc).unwrap();
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(etc.join("passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    // An empty directory whose mode says the kubelet did not just make it.
    let private = dir.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    // A link to a directory that would be acceptable itself.
    let fresh = dir.path().join("fresh");
    fs::create_dir(&fresh).unwrap();
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&fresh, &link).unwrap();
    // A file.
    let file = dir.path().join("file");
    fs::write(&file, b"keep").unwrap();

    for (path, why) in [
        (&etc, "not empty"),
        (&private, "mode 0700"),
        (&link, "symbolic link"),
        (&file, "not a directory"),
    ] {
        let before = owner_and_mode(path);
        let err = prepare_dir(path, other_uid, other_gid, 0o750).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("refusing") && msg.contains(why),
            "{}: {msg}",
            path.display()
        );
        assert_eq!(owner_and_mode(path), before, "{} changed", path.display());
    }
    assert_eq!(
        owner_and_mode(&fresh).2,
        0o755,
        "the link's target is untouched"
    );
    assert_eq!(
        fs::read(etc.join("passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
}

#[test]
fn the_subcommand_refuses_root_as_the_owner_and_says_why_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_nencache-agent");
    let out = Command::new(bin)
        .args(["prepare-dir", "--uid", "0", "--gid", "0"])
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.path().join("x").exists());

    let etc = dir.path().join("etc");
    fs::create_dir(&etc).unwrap();
    fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
    let before = owner_and_mode(&etc);
    let out = Command::new(bin)
        .args([
            "prepare-dir",
            "--uid",
            "65532",
            "--gid",
            "65532",
            "--mode",
            "750",
        ])
        .arg(&etc)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refusing to prepare"), "{stderr}");
    assert_eq!(owner_and_mode(&etc), before);

    let out = Command::new(bin)
        .args(["prepare-dir", "--mode", "rwx"])
        .arg(dir.path().join("y"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an octal mode"));
}

/// Runs `nencache-agent prepare-dir` as the init container does: root, with `CAP_CHOWN` as
/// its only capability (`setpriv` limits the bounding set). `None` when that cannot be set up.
fn prepare_with_chown_only(dir: &Path, mode: &str) -> Option<std::process::Output> {
    let works = is_root()
        && Command::new("setpriv")
            .args(["--bounding-set=-all,+chown", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !works {
        eprintln!(
            "skipped: needs root and setpriv (util-linux) to drop every capability but CHOWN"
        );
        return None;
    }
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all,+chown", "--inh-caps=-all"])
        .arg(env!("CARGO_BIN_EXE_nencache-agent"))
        .args([
            "prepare-dir",
            "--uid",
            "65532",
            "--gid",
            "65532",
            "--mode",
            mode,
        ])
        .arg(dir)
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn with_chown_as_its_only_capability_it_sets_the_mode_and_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("nencache");
    fs::create_dir(&target).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    // First start: the kubelet's empty root:root 0755 directory.
    let Some(out) = prepare_with_chown_only(&target, "750") else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner_and_mode(&target), (AGENT, AGENT, 0o750));
    // A later start with another mode: the directory is the agent's now, not root's, and
    // root without CAP_FOWNER may not chmod it as it stands.
    let out = prepare_with_chown_only(&target, "770").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner_and_mode(&target), (AGENT, AGENT, 0o770));
}
