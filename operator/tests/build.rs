//! The pure build step, from YAML fixtures of `NenCacheCluster` to the objects it owns; and
//! the generated CRD against the checked-in `crds/` file.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use kube::CustomResourceExt;
use nencache_agent::config::ServeArgs;
use nencache_operator::{
    build::{CONFIG_HASH_ANNOTATION, Policy, Resources, SpecError, build, config_hash, validate},
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

#[test]
fn the_generated_agent_config_is_accepted_by_the_agent() {
    for (name, capacity, lock) in [
        ("minimal.yaml", 1u64 << 30, false),
        ("full.yaml", 8 << 30, true),
    ] {
        let ncc = fixture(name);
        let r = built(&ncc);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, &r.config_map.data.as_ref().unwrap()["agent.yaml"]).unwrap();
        let s = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve(None)
        .unwrap();
        assert_eq!(s.engine.capacity, capacity);
        assert_eq!(s.engine.lock_memory, lock);
        assert!(s.socket.starts_with(&ncc.spec.socket_dir));
        assert_eq!(s.socket.file_name().unwrap(), "agent.sock");
        assert_eq!(s.admin_addr.unwrap().port(), ncc.spec.metrics.port);
    }
}

#[test]
fn invalid_specs_are_refused_with_the_field_named() {
    let cases = [
        ("tiers: {host: {size: lots}}", "tiers.host.size"),
        ("tiers: {host: {size: 1Mi}}", "at least 64Mi"),
        (
            "tiers: {nvme: {size: 1Ti, hostPath: /mnt/nvme}}",
            "tiers.nvme",
        ),
        ("peers: {enabled: true, tlsSecret: peers-tls}", "peers"),
        ("compat: {redisPort: 6379}", "compat"),
        ("socketDir: run/nencache", "absolute"),
    ];
    for (spec, needle) in cases {
        let err = validate(&with_spec(spec), &Policy::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "{spec}: {err}");
    }
    assert!(matches!(
        validate(&with_spec("tiers: {gpu: {size: 4Gi}}"), &Policy::default()),
        Err(SpecError::Unsupported(_))
    ));
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
