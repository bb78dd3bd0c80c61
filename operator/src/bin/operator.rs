//! `nencache-operator`: serves the pod-injection webhook on every replica, runs the
//! `NenCacheCluster` controller on the replica that holds the leader Lease, and serves its
//! admin endpoint, until SIGTERM or SIGINT.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration, coordination::v1::Lease,
    core::v1::Secret,
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, events::Reporter, reflector, watcher},
};
use nencache_operator::{
    build::Policy,
    certs::{self, CertSettings},
    controller::{Observed, admin_router, run},
    crd::{DEFAULT_IMAGE, NenCacheCluster, PullPolicy},
    https::{self, CertStore},
    leader::{Elector, LeaseSettings},
    webhook,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(
    name = "nencache-operator",
    version,
    about = "Reconciles NenCacheCluster resources into node-local agents"
)]
struct Args {
    /// Admin address for /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_ADMIN_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    admin_addr: SocketAddr,
    /// Log filter.
    #[arg(long, env = "NENCACHE_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Namespace the operator runs in (its Lease, webhook Service and Secret live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nencache-system")]
    namespace: String,
    /// This replica's name, for the Lease and Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Serve the pod-injection webhook.
    #[arg(long, env = "NENCACHE_OPERATOR_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    webhook: bool,
    /// HTTPS address of the webhook.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_WEBHOOK_ADDR",
        default_value = "0.0.0.0:9443"
    )]
    webhook_addr: SocketAddr,
    /// The webhook's Service (its certificate is issued for this name).
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_WEBHOOK_SERVICE",
        default_value = "nencache-webhook"
    )]
    webhook_service: String,
    /// Secret holding the webhook's CA and serving certificate (created when missing).
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_WEBHOOK_SECRET",
        default_value = "nencache-webhook-tls"
    )]
    webhook_secret: String,
    /// MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_WEBHOOK_CONFIG",
        default_value = "nencache"
    )]
    webhook_config: String,
    /// Run the controller only while holding the leader Lease.
    #[arg(long, env = "NENCACHE_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_LEASE",
        default_value = "nencache-operator"
    )]
    lease_name: String,
    /// Host directories a NenCacheCluster's socketDir and storage tiers' hostPaths may be in
    /// (or be), comma-separated; clusters asking for anything else are refused
    /// (ConfigValid=False) and not injected.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_HOST_PATH_PREFIXES",
        value_delimiter = ',',
        default_value = "/run/nencache,/var/lib/nencache"
    )]
    host_path_prefixes: Vec<String>,
    /// Image of the privileged helper (the agents' init containers that hand the socket
    /// directory and the storage tiers' directories to the agent's user); never a cluster's
    /// own image.
    #[arg(long, env = "NENCACHE_OPERATOR_HELPER_IMAGE", default_value = DEFAULT_IMAGE)]
    helper_image: String,
    /// Pull policy of the helper image: IfNotPresent, Always or Never.
    #[arg(
        long,
        env = "NENCACHE_OPERATOR_HELPER_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_parser = parse_pull_policy
    )]
    helper_image_pull_policy: PullPolicy,
}

fn parse_pull_policy(s: &str) -> Result<PullPolicy, String> {
    match s {
        "IfNotPresent" => Ok(PullPolicy::IfNotPresent),
        "Always" => Ok(PullPolicy::Always),
        "Never" => Ok(PullPolicy::Never),
        _ => Err(format!("{s:?} is not IfNotPresent, Always or Never")),
    }
}

/// Resolves once `rx` turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

/// Starts the webhook: certificate, cluster cache, HTTPS server, and the renewal loop.
async fn start_webhook(
    args: &Args,
    client: &Client,
    policy: &Policy,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let settings = CertSettings::new(&args.webhook_service, &args.namespace);
    let bundle = certs::ensure(&secrets, &args.webhook_secret, &settings, None)
        .await
        .context("webhook certificate")?;
    if let Err(e) = certs::patch_ca_bundle(&configs, &args.webhook_config, &bundle.ca_pem).await {
        tracing::warn!(error = %e, "writing the CA bundle failed; retried at the next check");
    }
    let store = CertStore::new(&bundle.cert_pem, &bundle.key_pem)?;
    let config = store.server_config()?;

    let (reader, writer) = reflector::store::<NenCacheCluster>();
    let watch = watcher(
        Api::<NenCacheCluster>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects();
    let mut stop_watch = stop.clone();
    tokio::spawn(async move {
        let mut watch = std::pin::pin!(watch);
        loop {
            tokio::select! {
                _ = stop_watch.wait_for(|s| *s) => return,
                next = watch.next() => match next {
                    Some(Err(e)) => tracing::warn!(error = %e, "watching NenCacheClusters"),
                    Some(Ok(_)) => {}
                    None => return,
                },
            }
        }
    });
    reader.wait_until_ready().await?;

    let listener = tokio::net::TcpListener::bind(args.webhook_addr).await?;
    tracing::info!(addr = %args.webhook_addr, "webhook serving");
    let server = tokio::spawn(https::serve(
        listener,
        config,
        webhook::router(reader, policy.clone()),
        stopped(stop.clone()),
    ));

    // Renew before expiry and pick up certificates other replicas issued: the CA bundle is
    // written before the new certificate is served (see certs::refresh).
    let (name, config_name, mut current) = (
        args.webhook_secret.clone(),
        args.webhook_config.clone(),
        bundle,
    );
    let mut stop_renew = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_renew.wait_for(|s| *s) => return,
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
            }
            match certs::refresh(
                &secrets,
                &name,
                &configs,
                &config_name,
                &settings,
                &current,
                &store,
            )
            .await
            {
                Ok(b) => current = b,
                Err(e) => {
                    tracing::warn!(error = %e, "checking the webhook certificate; retried at the next check")
                }
            }
        }
    });
    Ok(server)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level)?)
        .init();
    let policy = Policy::new(
        args.host_path_prefixes.iter().map(|p| p.trim().to_string()),
        args.helper_image.clone(),
        args.helper_image_pull_policy,
    )
    .map_err(|e| anyhow::anyhow!("invalid --host-path-prefixes or --helper-image: {e}"))?;
    tracing::info!(
        host_path_prefixes = ?policy.host_path_prefixes(),
        helper_image = %policy.helper_image,
        "policy"
    );
    let client = Client::try_default().await?;
    let identity = args.pod_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "nencache-operator".into(), |h| h.trim().to_string())
    });
    let observed = Arc::new(Observed::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        signal().await;
        let _ = on_signal.send(true);
    });

    let listener = tokio::net::TcpListener::bind(args.admin_addr).await?;
    let admin = tokio::spawn(
        axum::serve(listener, admin_router(observed.clone()))
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let webhook = if args.webhook {
        Some(start_webhook(&args, &client, &policy, &stop_rx).await?)
    } else {
        None
    };
    observed.set_ready(true);

    let reporter = Reporter {
        controller: "nencache-operator".into(),
        instance: Some(identity.clone()),
    };
    let controller = run(
        client.clone(),
        reporter,
        policy,
        observed.clone(),
        stopped(stop_rx.clone()),
    );
    let outcome = if args.leader_elect {
        let elector = Elector::new(
            Api::<Lease>::namespaced(client, &args.namespace),
            LeaseSettings::new(&args.lease_name, &identity),
        );
        match elector.acquire(stopped(stop_rx.clone())).await {
            Ok(true) => elector.lead(controller).await.map_err(anyhow::Error::from),
            Ok(false) => Ok(()),
            Err(e) => Err(e.into()),
        }
    } else {
        controller.await;
        Ok(())
    };
    // Lost leadership ends the process (its pod restarts as a standby), as a signal does.
    observed.set_ready(false);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "stopping");
    }
    let _ = stop_tx.send(true);
    if let Some(w) = webhook {
        w.await?;
    }
    admin.await??;
    outcome
}
