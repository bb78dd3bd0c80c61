//! The pure build step, from YAML fixtures of `NenCacheCluster` to the objects it owns; and
//! the generated CRD against the checked-in `crds/` file.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::PodSpec;
use kube::CustomResourceExt;
use nencache_agent::config::ServeArgs;
use nencache_operator::{
    build::{
        CONFIG_HASH_ANNOTATION, DISK_MOUNT, NVME_MOUNT, Policy, Resources, SpecError, build,
        config_hash, validate,
    },
    crd::{DEFAULT_IMAGE, NenCacheCluster, PullPolicy},
};

fn fixture(name: &str) -> NenCacheCluster {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn with_spec(yaml: &str) -> NenCacheCluster {
    let mut ncc = fixture("minimal.yaml");
    ncc.spec = serde_yaml_ng::from_str(yaml).unwrap();
    ncc
}

/// The objects of `ncc` under the default policy.
fn built(ncc: &NenCacheCluster) -> Resources {
    let policy = Policy::default();
    build(ncc, &validate(ncc, &policy).unwrap(), &policy)
}

#[test]
fn minimal_spec_gets_gpu_nodes_defaults_and_a_locked_down_pod() {
    let ncc = fixture("minimal.yaml");
    let v = validate(&ncc, &Policy::default()).unwrap();
    assert_eq!((v.host_bytes, v.staging_bytes), (1 << 30, 256 << 20));
    let r = build(&ncc, &v, &Policy::default());
    let ds = &r.daemon_set;
    assert_eq!(ds.metadata.name.as_deref(), Some("cache-agent"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some("inference"));
    let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("NenCacheCluster", "cache", Some(true))
    );
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"],
        "true"
    );
    assert_eq!((pod.host_ipc, pod.host_network), (Some(false), Some(false)));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add, None,
        "no capability without a feature that needs it"
    );
    let mem = &c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"];
    assert_eq!(mem.0, "1536Mi", "arena + staging + 256Mi");
    let ru = ds
        .spec
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        ru.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let sockets = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "sockets")
        .unwrap();
    assert_eq!(sockets.host_path.as_ref().unwrap().path, "/run/nencache");
    // The init container hands the root-owned hostPath to the agent's user, with CHOWN only.
    let init = &pod.init_containers.as_ref().unwrap()[0];
    let args = init.args.as_ref().unwrap();
    assert_eq!(args.first().map(String::as_str), Some("prepare-dir"));
    assert_eq!(args.last().map(String::as_str), Some("/run/nencache"));
    let isc = init.security_context.as_ref().unwrap();
    assert_eq!(
        (isc.privileged, isc.allow_privilege_escalation),
        (Some(false), Some(false))
    );
    let icaps = isc.capabilities.as_ref().unwrap();
    assert_eq!(icaps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(icaps.add.as_deref(), Some(&["CHOWN".to_string()][..]));
    // The agent never calls the API server.
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        r.service_account.automount_service_account_token,
        Some(false)
    );
    assert!(r.service_monitor.is_none());
    let svc = r.service.spec.as_ref().unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert_eq!(svc.selector, ds.spec.selector.match_labels);
    assert_eq!(
        pod.service_account_name.as_deref(),
        r.service_account.metadata.name.as_deref()
    );
}

#[test]
fn full_spec_is_carried_into_the_pod() {
    let ncc = fixture("full.yaml");
    let r = built(&ncc);
    let pod = r.daemon_set.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/nencache-agent:1.2.3")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "serve",
            "--config",
            "/etc/nencache/agent.yaml",
            "--eviction",
            "lru"
        ]
    );
    assert_eq!(c.env.as_ref().unwrap()[0].name, "RUST_BACKTRACE");
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["IPC_LOCK".to_string()][..]),
        "lockMemory needs IPC_LOCK"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    assert_eq!(pod.node_selector.as_ref().unwrap().len(), 1);
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9500)
    );
    assert_eq!(
        r.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        9500
    );
}

/// The pod template's spec.
fn pod(r: &Resources) -> &PodSpec {
    r.daemon_set.spec.template.spec.as_ref().unwrap()
}

/// The agent's configuration file of `r`, parsed.
fn agent_yaml(r: &Resources) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(&r.config_map.data.as_ref().unwrap()["agent.yaml"]).unwrap()
}

/// The agent container's memory request and limit.
/// The settings the agent resolves from the configuration the operator wrote.
fn agent_settings(
    r: &Resources,
) -> Result<nencache_agent::config::Settings, nencache_agent::config::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, &r.config_map.data.as_ref().unwrap()["agent.yaml"]).unwrap();
    ServeArgs {
        config: Some(path),
        ..ServeArgs::default()
    }
    .resolve(None)
}

fn agent_memory(r: &Resources) -> (String, String) {
    let res = pod(r).containers[0].resources.as_ref().unwrap();
    (
        res.requests.as_ref().unwrap()["memory"].0.clone(),
        res.limits.as_ref().unwrap()["memory"].0.clone(),
    )
}

#[test]
fn the_generated_agent_config_is_accepted_by_the_agent() {
    // The smallest storage tiers the operator accepts must be ones the agent accepts.
    let mut smallest = fixture("minimal.yaml");
    smallest.spec = serde_yaml_ng::from_str(
        "tiers: {nvme: {size: 256Mi, hostPath: /var/lib/nencache/n}, \
         disk: {size: 256Mi, hostPath: /var/lib/nencache/d}}",
    )
    .unwrap();
    // Each lower tier as the agent reads it: name, path, bytes, I/O engine, admission.
    let deep = [
        (
            "nvme",
            "/var/lib/nencache/nvme/cache.t2",
            64u64 << 30,
            "IoUring",
            "Reused",
        ),
        ("disk", "/var/lib/nencache/disk", 256 << 30, "Mmap", "All"),
    ];
    let least = [
        (
            "nvme",
            "/var/lib/nencache/nvme/cache.t2",
            256 << 20,
            "Auto",
            "Reused",
        ),
        ("disk", "/var/lib/nencache/disk", 256 << 20, "Mmap", "All"),
    ];
    for (name, ncc, capacity, lock, tiers) in [
        (
            "minimal.yaml",
            fixture("minimal.yaml"),
            1u64 << 30,
            false,
            &[][..],
        ),
        ("full.yaml", fixture("full.yaml"), 8 << 30, true, &[]),
        ("tiers.yaml", fixture("tiers.yaml"), 4 << 30, false, &deep),
        ("smallest tiers", smallest, 1 << 30, false, &least),
    ] {
        let r = built(&ncc);
        let s = agent_settings(&r).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.engine.host.capacity, capacity);
        assert_eq!(s.engine.host.lock_memory, lock);
        // Never the agent's own default tier in its user's data directory.
        assert!(!s.default_tier, "{name}");
        let got: Vec<_> = s
            .engine
            .tiers
            .iter()
            .map(|t| {
                (
                    t.tier.name(),
                    t.store.path.to_str().unwrap(),
                    t.store.capacity,
                    format!("{:?}", t.store.io_engine),
                    format!("{:?}", t.admission),
                )
            })
            .collect();
        let want: Vec<_> = tiers
            .iter()
            .map(|&(t, p, b, io, a)| (t, p, b, io.to_string(), a.to_string()))
            .collect();
        assert_eq!(got, want, "{name}");
        assert!(s.socket.starts_with(&ncc.spec.socket_dir));
        assert_eq!(s.socket.file_name().unwrap(), "agent.sock");
        assert_eq!(s.admin_addr.unwrap().port(), ncc.spec.metrics.port);
        // Below the pod's grace period, so the agent's shutdown never meets SIGKILL.
        let grace = pod(&r).termination_grace_period_seconds.unwrap();
        assert!(
            s.shutdown_grace < std::time::Duration::from_secs(grace.try_into().unwrap()),
            "{name}: agent {:?}, pod {grace}s",
            s.shutdown_grace
        );
    }
}

#[test]
fn a_cluster_without_storage_tiers_writes_an_empty_tiers_section() {
    // Without any `tiers:` key the agent would make a disk tier of its own.
    for r in [
        built(&fixture("minimal.yaml")),
        built(&fixture("full.yaml")),
    ] {
        let tiers = &agent_yaml(&r)["tiers"];
        assert!(
            tiers
                .as_mapping()
                .is_some_and(serde_yaml_ng::Mapping::is_empty),
            "{tiers:?}"
        );
        let pod = pod(&r);
        assert_eq!(pod.init_containers.as_ref().unwrap().len(), 1);
        assert_eq!(pod.volumes.as_ref().unwrap().len(), 2, "config and sockets");
    }
}

#[test]
fn storage_tiers_are_written_into_the_agent_configuration() {
    let r = built(&fixture("tiers.yaml"));
    let yaml = agent_yaml(&r);
    let nvme = &yaml["tiers"]["nvme"];
    assert_eq!(
        nvme["path"].as_str(),
        Some("/var/lib/nencache/nvme/cache.t2")
    );
    assert_eq!(nvme["size"].as_u64(), Some(64 << 30));
    assert_eq!(nvme["io_engine"].as_str(), Some("io_uring"));
    assert_eq!(nvme["admission"].as_str(), Some("reused"));
    let disk = &yaml["tiers"]["disk"];
    assert_eq!(disk["path"].as_str(), Some("/var/lib/nencache/disk"));
    assert_eq!(disk["size"].as_u64(), Some(256 << 30));
    assert_eq!(disk.as_mapping().unwrap().len(), 2, "{disk:?}");

    // One tier alone; the I/O engine defaults to auto, the admission to the agent's.
    let r = built(&with_spec(
        "tiers: {nvme: {size: 1Ti, hostPath: /var/lib/nencache/nvme}}",
    ));
    let tiers = agent_yaml(&r)["tiers"].clone();
    assert_eq!(tiers.as_mapping().unwrap().len(), 1, "{tiers:?}");
    assert_eq!(tiers["nvme"]["size"].as_u64(), Some(1 << 40));
    assert_eq!(tiers["nvme"]["io_engine"].as_str(), Some("auto"));
    assert!(tiers["nvme"].get("admission").is_none(), "{tiers:?}");
    let r = built(&with_spec(
        "tiers: {disk: {size: 500G, hostPath: /var/lib/nencache/disk}}",
    ));
    let tiers = agent_yaml(&r)["tiers"].clone();
    assert_eq!(tiers.as_mapping().unwrap().len(), 1, "{tiers:?}");
    assert_eq!(tiers["disk"]["size"].as_u64(), Some(500_000_000_000));
}

#[test]
fn storage_tiers_mount_their_host_directories_prepared_for_the_agent() {
    let ncc = fixture("tiers.yaml");
    let r = built(&ncc);
    let pod = pod(&r);
    let volumes = pod.volumes.as_ref().unwrap();
    let agent = &pod.containers[0];
    let inits = pod.init_containers.as_ref().unwrap();
    assert_eq!(
        inits[0].name, "prepare-socket-dir",
        "the socket directory first"
    );
    for (volume, host, mount) in [
        ("tier-nvme", "/var/lib/nencache/deep/nvme", NVME_MOUNT),
        ("tier-disk", "/var/lib/nencache/deep/disk", DISK_MOUNT),
    ] {
        let hp = volumes
            .iter()
            .find(|v| v.name == volume)
            .unwrap_or_else(|| panic!("no volume {volume}"))
            .host_path
            .as_ref()
            .unwrap();
        assert_eq!(hp.path, host);
        assert_eq!(hp.type_.as_deref(), Some("DirectoryOrCreate"));
        let m = agent
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == volume)
            .unwrap();
        assert_eq!(m.mount_path, mount);
        assert_ne!(m.read_only, Some(true));
        // The kubelet creates the directory owned by root: an init container from the
        // helper image hands it to the agent's user, for the agent alone (0700).
        let init = inits
            .iter()
            .find(|c| c.name == format!("prepare-{volume}-dir"))
            .unwrap_or_else(|| panic!("no init container for {volume}"));
        assert_eq!(init.image.as_deref(), Some(DEFAULT_IMAGE));
        let args = init.args.as_ref().unwrap();
        assert_eq!(
            args,
            &[
                "prepare-dir",
                "--uid",
                "65532",
                "--gid",
                "65532",
                "--mode",
                "700",
                mount
            ]
        );
        let im = init.volume_mounts.as_ref().unwrap();
        assert_eq!(
            (im[0].name.as_str(), im[0].mount_path.as_str()),
            (volume, mount)
        );
        let caps = init
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["CHOWN".to_string()][..]));
    }
    assert_eq!(inits.len(), 3);
    // hostPath volumes are not the pod's ephemeral storage: nothing asks for any.
    let res = agent.resources.as_ref().unwrap();
    for m in [&res.requests, &res.limits].into_iter().flatten() {
        assert!(!m.contains_key("ephemeral-storage"), "{m:?}");
    }
}

#[test]
fn storage_tier_host_paths_are_checked_like_the_socket_directory() {
    let policy = Policy::default();
    let tier = |t: &str, path: &str| {
        validate(
            &with_spec(&format!(
                "tiers: {{{t}: {{size: 1Gi, hostPath: {path:?}}}}}"
            )),
            &policy,
        )
    };
    for t in ["nvme", "disk"] {
        for ok in [
            "/var/lib/nencache",
            "/var/lib/nencache/nvme",
            "/var/lib/nencache/a/b_c.d",
        ] {
            assert!(tier(t, ok).is_ok(), "{t} {ok}: {:?}", tier(t, ok));
        }
        for (bad, why) in [
            ("/mnt/nvme", "outside"),
            ("/var/lib/kubelet", "outside"),
            ("/var/lib/nencache/../kubelet", "\"..\""),
            ("/var/lib/nencache/", "trailing"),
            ("var/lib/nencache/x", "absolute"),
            ("/", "root"),
        ] {
            let err = tier(t, bad).unwrap_err();
            assert!(
                matches!(err, SpecError::HostPath { .. }),
                "{t} {bad}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("tiers.{t}.hostPath: ")),
                "{t} {bad}: {msg}"
            );
            assert!(msg.contains(why), "{t} {bad}: {msg}");
            assert!(
                msg.contains("/run/nencache, /var/lib/nencache"),
                "{t} {bad}: {msg}"
            );
        }
    }
    // The operator's own prefixes apply to them as to socketDir.
    let custom = Policy::new(
        ["/srv/cache".to_string(), "/run/nencache".to_string()],
        "helper:1".into(),
        PullPolicy::IfNotPresent,
    )
    .unwrap();
    let spec = |p: &str| with_spec(&format!("tiers: {{nvme: {{size: 8Gi, hostPath: {p}}}}}"));
    assert!(validate(&spec("/srv/cache/nvme"), &custom).is_ok());
    let err = validate(&spec("/var/lib/nencache/nvme"), &custom).unwrap_err();
    assert!(
        err.to_string()
            .contains("host paths must be in one of: /srv/cache, /run/nencache"),
        "{err}"
    );
}

#[test]
fn storage_tier_directories_stay_apart_from_the_sockets_and_each_other() {
    let policy = Policy::default();
    let check = |spec: &str| validate(&with_spec(spec), &policy);
    assert!(
        check(
            "{socketDir: /run/nencache, tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/a}, \
             disk: {size: 1Gi, hostPath: /var/lib/nencache/b}}}"
        )
        .is_ok()
    );
    for (spec, field, other) in [
        // A tier in, at or around the socket directory, which injected pods mount.
        (
            "{socketDir: /var/lib/nencache/s, \
             tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/s}}}",
            "tiers.nvme.hostPath",
            "socketDir",
        ),
        (
            "{socketDir: /run/nencache, \
             tiers: {disk: {size: 1Gi, hostPath: /run/nencache/disk}}}",
            "tiers.disk.hostPath",
            "socketDir",
        ),
        (
            "{socketDir: /run/nencache/s, tiers: {nvme: {size: 1Gi, hostPath: /run/nencache}}}",
            "tiers.nvme.hostPath",
            "socketDir",
        ),
        // The two tiers sharing a directory, or one inside the other.
        (
            "{tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/t}, \
             disk: {size: 1Gi, hostPath: /var/lib/nencache/t}}}",
            "tiers.disk.hostPath",
            "tiers.nvme.hostPath",
        ),
        (
            "{tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/t}, \
             disk: {size: 1Gi, hostPath: /var/lib/nencache/t/disk}}}",
            "tiers.disk.hostPath",
            "tiers.nvme.hostPath",
        ),
        // The socket directory (mounted at its own path in the agent's container) on or
        // around where the agent's container mounts a tier.
        (
            "{socketDir: /var/lib/nencache, \
             tiers: {nvme: {size: 1Gi, hostPath: /run/nencache/t}}}",
            "socketDir",
            "tiers.nvme",
        ),
        (
            "{socketDir: /var/lib/nencache/disk/s, \
             tiers: {disk: {size: 1Gi, hostPath: /run/nencache/t}}}",
            "socketDir",
            "tiers.disk",
        ),
    ] {
        let err = check(spec).unwrap_err();
        assert!(matches!(err, SpecError::Overlap { .. }), "{spec}: {err}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("{field}: ")), "{spec}: {msg}");
        assert!(msg.contains(other), "{spec}: {msg}");
    }
    // Without the tier, its mount path is free for the sockets.
    assert!(
        check(
            "{socketDir: /var/lib/nencache/nvme, \
             tiers: {disk: {size: 1Gi, hostPath: /run/nencache/t}}}"
        )
        .is_ok()
    );
}

#[test]
fn storage_tier_sizes_are_parsed_and_too_small_ones_refused() {
    let policy = Policy::default();
    let sized = |t: &str, size: &str| {
        validate(
            &with_spec(&format!(
                "tiers: {{{t}: {{size: {size}, hostPath: /var/lib/nencache/{t}}}}}"
            )),
            &policy,
        )
    };
    // Two regions of 128 MiB (the 64 MiB largest value with headers, rounded up to a power
    // of two) at least.
    assert_eq!(sized("nvme", "256Mi").unwrap().nvme_bytes, Some(256 << 20));
    assert_eq!(sized("disk", "256Mi").unwrap().disk_bytes, Some(256 << 20));
    assert_eq!(
        sized("disk", "2T").unwrap().disk_bytes,
        Some(2_000_000_000_000)
    );
    for (t, size, needle) in [
        ("nvme", "255Mi", "at least 256Mi"),
        ("nvme", "64Mi", "at least 256Mi"),
        ("nvme", "0", "at least 256Mi"),
        ("disk", "128Mi", "at least 256Mi"),
        ("disk", "256M", "at least 256Mi"),
        ("nvme", "lots", "not a size"),
        ("disk", "1.5Ti", "not a size"),
    ] {
        let err = sized(t, size).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("tiers.{t}.size: ")),
            "{t} {size}: {msg}"
        );
        assert!(msg.contains(needle), "{t} {size}: {msg}");
    }
}

#[test]
fn the_largest_value_can_be_raised_for_large_chunks() {
    let policy = Policy::default();
    let spec = |extra: &str| {
        with_spec(&format!(
            "tiers: {{host: {{size: 4Gi{extra}}}, nvme: {{size: 512Mi, hostPath: /var/lib/nencache/n}}}}"
        ))
    };
    let ncc = spec(", maxValue: 96Mi");
    let v = validate(&ncc, &policy).unwrap();
    assert_eq!(v.max_value_bytes, Some(96 << 20));
    assert_eq!(
        v.staging_bytes,
        256 << 20,
        "twice 96Mi is below the default"
    );
    // What the operator writes, the agent accepts, with that largest value.
    let agent_max_value = |ncc: &NenCacheCluster| {
        let s = agent_settings(&built(ncc)).unwrap();
        assert!(!s.default_tier);
        s.engine.limits.max_value
    };
    assert_eq!(agent_max_value(&ncc), 96 << 20);
    // Larger values: staging grows to hold two; no lower tier, still none.
    let large = with_spec("tiers: {host: {size: 4Gi, maxValue: 200Mi}}");
    let v = validate(&large, &policy).unwrap();
    assert_eq!(v.staging_bytes, 400 << 20);
    assert_eq!(agent_max_value(&large), 200 << 20);
    assert_eq!(validate(&spec(""), &policy).unwrap().max_value_bytes, None);
    for (extra, field, needle) in [
        (", maxValue: 512Ki", "tiers.host.maxValue", "from 1Mi"),
        (", maxValue: 2Gi", "tiers.host.maxValue", "a quarter"),
        (", maxValue: 200Mi", "tiers.nvme.size", "four times"),
        (", maxValue: big", "tiers.host.maxValue", "not a size"),
    ] {
        let msg = validate(&spec(extra), &policy).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{field}: ")) && msg.contains(needle),
            "{extra}: {msg}"
        );
    }
}

#[test]
fn the_memory_request_includes_the_lower_tiers_index() {
    // 4Gi arena + 256Mi staging + (64Gi + 256Gi) / 512 = 640Mi of index + 256Mi.
    let r = built(&fixture("tiers.yaml"));
    assert_eq!(
        agent_memory(&r),
        ("5248Mi".to_string(), "5248Mi".to_string())
    );
    // The index is rounded up to whole MiB: 1Gi / 512 = 2Mi, 1G / 512 rounds up to 2Mi, and
    // 1T / 512 to 1863Mi.
    for (spec, mem) in [
        ("{}", "1536Mi"),
        (
            "tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/n}}",
            "1538Mi",
        ),
        (
            "tiers: {disk: {size: 1G, hostPath: /var/lib/nencache/d}}",
            "1538Mi",
        ),
        (
            "tiers: {disk: {size: 1T, hostPath: /var/lib/nencache/d}}",
            "3399Mi",
        ),
    ] {
        assert_eq!(agent_memory(&built(&with_spec(spec))).0, mem, "{spec}");
    }
    // Resources from the spec are taken as they are.
    let r = built(&with_spec(
        "{tiers: {nvme: {size: 1Ti, hostPath: /var/lib/nencache/n}}, \
         resources: {requests: {memory: 3Gi}, limits: {memory: 3Gi}}}",
    ));
    assert_eq!(agent_memory(&r), ("3Gi".to_string(), "3Gi".to_string()));
}

#[test]
fn storage_tiers_give_the_agent_time_to_write_them_at_shutdown() {
    let grace = |spec: &str| {
        let r = built(&with_spec(spec));
        pod(&r).termination_grace_period_seconds.unwrap()
    };
    let nvme = "nvme: {size: 1Gi, hostPath: /var/lib/nencache/n}";
    let disk = "disk: {size: 1Gi, hostPath: /var/lib/nencache/d}";
    let agent_grace = |spec: &str| {
        agent_yaml(&built(&with_spec(spec)))["shutdown_grace"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (spec, seconds) in [
        ("{}".to_string(), 30),
        ("terminationGracePeriodSeconds: 45".into(), 45),
        // Never below the agent's default 10 s drain and 10 s to exit.
        ("terminationGracePeriodSeconds: 0".into(), 20),
        (format!("tiers: {{{nvme}}}"), 60),
        (format!("tiers: {{{disk}}}"), 60),
        (format!("tiers: {{{nvme}, {disk}}}"), 60),
        (
            format!("{{tiers: {{{nvme}}}, terminationGracePeriodSeconds: 30}}"),
            60,
        ),
        (
            format!("{{tiers: {{{disk}}}, terminationGracePeriodSeconds: 300}}"),
            300,
        ),
    ] {
        assert_eq!(grace(&spec), seconds, "{spec}");
        // The agent drains and writes down within its own grace, which ends 10 s before the
        // kubelet's SIGKILL, leaving time to flush the tiers and exit.
        assert_eq!(agent_grace(&spec), format!("{}s", seconds - 10), "{spec}");
    }
}

#[test]
fn invalid_specs_are_refused_with_the_field_named() {
    let cases = [
        ("tiers: {host: {size: lots}}", "tiers.host.size"),
        ("tiers: {host: {size: 1Mi}}", "at least 64Mi"),
        ("peers: {enabled: true, tlsSecret: peers-tls}", "peers"),
        ("compat: {redisPort: 0}", "compat.redisPort"),
        ("compat: {lmPort: 9464}", "metrics.port"),
        (
            "compat: {lmPort: 6379, redisPort: 6379}",
            "compat.redisPort: 6379 is out of range (the same as compat.lmPort)",
        ),
        ("socketDir: run/nencache", "absolute"),
    ];
    for (spec, needle) in cases {
        let err = validate(&with_spec(spec), &Policy::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "{spec}: {err}");
    }
    // What the agent still lacks stays refused.
    for (spec, what) in [
        ("tiers: {gpu: {size: 4Gi}}", "tiers.gpu"),
        ("tiers: {host: {hugePages: true}}", "tiers.host.hugePages"),
    ] {
        assert_eq!(
            validate(&with_spec(spec), &Policy::default()),
            Err(SpecError::Unsupported(what)),
            "{spec}"
        );
    }
}

#[test]
fn host_paths_must_be_normalized_and_inside_the_allowed_prefixes() {
    let policy = Policy::default();
    let check = |dir: &str| validate(&with_spec(&format!("socketDir: {dir:?}")), &policy);
    for ok in [
        "/run/nencache",
        "/run/nencache/team-a",
        "/var/lib/nencache",
        "/var/lib/nencache/a/b_c.d",
    ] {
        assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
    }
    for (bad, why) in [
        ("/etc", "outside"),
        ("/", "root"),
        ("/run", "outside"),
        ("/run/nencachex", "outside"),
        ("/var/lib/kubelet", "outside"),
        ("/run/nencache/../../etc", "\"..\""),
        ("/run/nencache/./a", "\".\""),
        ("/run/nencache//a", "empty component"),
        ("/run/nencache/", "trailing"),
        ("/run/nencache/a b", "characters"),
        ("/run/nencache/a\nhost: {}", "characters"),
        ("run/nencache", "absolute"),
    ] {
        let err = check(bad).unwrap_err();
        assert!(matches!(err, SpecError::HostPath { .. }), "{bad}: {err}");
        let msg = err.to_string();
        // The field, what is wrong, and what is allowed.
        assert!(msg.starts_with("socketDir: "), "{bad}: {msg}");
        assert!(msg.contains(why), "{bad}: {msg}");
        assert!(
            msg.contains("/run/nencache, /var/lib/nencache"),
            "{bad}: {msg}"
        );
    }
    let long = format!("/run/nencache/{}", "x".repeat(80));
    assert!(
        matches!(check(&long), Err(SpecError::SocketDirTooLong(_))),
        "{:?}",
        check(&long)
    );

    // The operator's own prefixes replace the defaults.
    let custom = Policy::new(
        ["/srv/cache".to_string()],
        "helper:1".into(),
        PullPolicy::IfNotPresent,
    )
    .unwrap();
    let dir = |d: &str| with_spec(&format!("socketDir: {d}"));
    assert!(validate(&dir("/srv/cache/x"), &custom).is_ok());
    let err = validate(&dir("/run/nencache"), &custom).unwrap_err();
    assert!(err.to_string().contains("/srv/cache"), "{err}");
    // And must themselves be sound.
    for bad in [
        vec![],
        vec!["/".to_string()],
        vec!["relative".to_string()],
        vec!["/srv/../etc".to_string()],
        vec!["/srv/cache/".to_string()],
    ] {
        assert!(
            Policy::new(bad.clone(), "h:1".into(), PullPolicy::Always).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn the_privileged_helper_runs_the_operators_image_never_the_clusters() {
    let ncc = fixture("full.yaml");
    let policy = Policy::new(
        ["/var/lib/nencache".to_string()],
        "registry.internal/nencache-agent@sha256:abc".into(),
        PullPolicy::Never,
    )
    .unwrap();
    let r = build(&ncc, &validate(&ncc, &policy).unwrap(), &policy);
    let pod = r.daemon_set.spec.template.spec.unwrap();
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.name, "prepare-socket-dir");
    assert_eq!(
        init.image.as_deref(),
        Some("registry.internal/nencache-agent@sha256:abc")
    );
    assert_eq!(init.image_pull_policy.as_deref(), Some("Never"));
    assert_eq!(
        init.args.as_ref().unwrap().last().unwrap(),
        "/var/lib/nencache/llama"
    );
    // The agent itself, unprivileged, runs the cluster's image.
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example.com/nencache-agent:1.2.3")
    );
    // By default the helper is the agent image of the operator's own version.
    let init = &built(&ncc)
        .daemon_set
        .spec
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()[0];
    assert_eq!(init.image.as_deref(), Some(DEFAULT_IMAGE));
    assert_eq!(init.image_pull_policy.as_deref(), Some("IfNotPresent"));
}

#[test]
fn a_change_of_the_agent_configuration_changes_the_pod_template() {
    let hash_of = |r: &Resources| {
        r.daemon_set
            .spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let base = built(&with_spec("{}"));
    let h = hash_of(&base);
    assert_eq!(h, config_hash(base.config_map.data.as_ref().unwrap()));
    assert_eq!(h.len(), 64, "{h}");
    assert!(h.chars().all(|c| c.is_ascii_hexdigit()), "{h}");
    assert_eq!(hash_of(&built(&with_spec("{}"))), h, "stable");
    for changed in [
        "logLevel: debug",
        "tiers: {host: {size: 2Gi}}",
        "tiers: {nvme: {size: 1Gi, hostPath: /var/lib/nencache/nvme}}",
        "tiers: {disk: {size: 1Gi, hostPath: /var/lib/nencache/disk}}",
        "metrics: {port: 9999}",
        "socketDir: /run/nencache/b",
    ] {
        let r = built(&with_spec(changed));
        assert_ne!(
            r.config_map.data, base.config_map.data,
            "{changed} changes the configuration"
        );
        assert_ne!(hash_of(&r), h, "{changed}");
    }
    // Not part of the agent's configuration: the hash stays (the template changes anyway).
    let tolerated = built(&with_spec("tolerations: [{key: a, operator: Exists}]"));
    assert_eq!(hash_of(&tolerated), h);
    // The key/value boundaries count.
    let split = |k: &str, v: &str| {
        config_hash(&std::collections::BTreeMap::from([(
            k.to_string(),
            v.to_string(),
        )]))
    };
    assert_ne!(split("ab", "c"), split("a", "bc"));
}

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let generated = serde_yaml_ng::to_string(&NenCacheCluster::crd()).unwrap();
    let path = format!(
        "{}/../crds/nencachecluster.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "crds/nencachecluster.yaml is stale: run `cargo run -p nencache-operator --bin crdgen > crds/nencachecluster.yaml`"
    );
}

#[test]
fn the_operator_reference_documents_every_spec_field() {
    let crd = serde_json::to_value(NenCacheCluster::crd()).unwrap();
    let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let doc = std::fs::read_to_string(format!(
        "{}/../docs/operator.md",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut missing = Vec::new();
    for (field, schema) in props.as_object().unwrap() {
        if !doc.contains(&format!("`{field}")) {
            missing.push(field.clone());
        }
        // Nested fields of NenCache's own types; Kubernetes' types (affinity, resources, ...)
        // are documented upstream.
        if !["tiers", "compat", "peers", "metrics"].contains(&field.as_str()) {
            continue;
        }
        for sub in schema["properties"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if !doc.contains(&format!("`{field}.{sub}"))
                && !doc.contains(&format!("{field}.{sub}`"))
            {
                missing.push(format!("{field}.{sub}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/operator.md does not document: {missing:?}"
    );
}

#[test]
fn the_schema_checks_what_it_can_before_the_reconciler_sees_it() {
    let crd = serde_json::to_value(NenCacheCluster::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let rules = &spec["peers"]["x-kubernetes-validations"];
    assert_eq!(rules[0]["rule"], "!self.enabled || has(self.tlsSecret)");
    let pattern = spec["tiers"]["properties"]["host"]["properties"]["size"]["pattern"]
        .as_str()
        .unwrap();
    assert_eq!(pattern, "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$");
    assert_eq!(spec["metrics"]["properties"]["port"]["minimum"], 1.0);
    // The reconciler's parser accepts exactly the sizes the pattern admits, for these samples.
    for ok in ["1", "512Mi", "8Gi", "1Ti", "4k", "2G"] {
        assert!(
            nencache_operator::build::parse_bytes("x", ok).is_ok(),
            "{ok}"
        );
    }
    for bad in ["", "1.5Gi", "8GiB", "lots", "-1"] {
        assert!(
            nencache_operator::build::parse_bytes("x", bad).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn compat_listeners_get_ports_config_and_a_node_local_service() {
    let r = built(&with_spec("compat: {lmPort: 65432, redisPort: 6379}"));
    let config = &r.config_map.data.as_ref().unwrap()["agent.yaml"];
    assert!(
        config
            .contains("compat:\n  lm:\n    tcp: 0.0.0.0:65432\n  redis:\n    tcp: 0.0.0.0:6379\n"),
        "{config}"
    );
    // The agent reads it as its listeners.
    let s = agent_settings(&r).unwrap();
    assert_eq!(s.compat.lm_tcp, Some("0.0.0.0:65432".parse().unwrap()));
    assert_eq!(s.compat.redis_tcp, Some("0.0.0.0:6379".parse().unwrap()));
    let container = &r.daemon_set.spec.template.spec.as_ref().unwrap().containers[0];
    let ports: Vec<(String, i32)> = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("metrics".into(), 9464),
            ("lm".into(), 65432),
            ("redis".into(), 6379)
        ]
    );
    let svc = r.compat_service.expect("a compat Service");
    let spec = svc.spec.unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("cache-agent-compat"));
    assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.selector, r.daemon_set.spec.selector.match_labels);
    let ports: Vec<(String, i32)> = spec
        .ports
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(ports, [("lm".into(), 65432), ("redis".into(), 6379)]);
    // Without compat ports: no Service, no section.
    let r = built(&with_spec("{}"));
    assert!(r.compat_service.is_none());
    assert!(!r.config_map.data.unwrap()["agent.yaml"].contains("compat"));
}
