//! `nencache-operator`: runs the `NenCacheCluster` controller and its admin endpoint until
//! SIGTERM or SIGINT.

use std::{net::SocketAddr, sync::Arc};

use clap::Parser;
use nencache_operator::controller::{Observed, admin_router, run};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level)?)
        .init();
    let client = kube::Client::try_default().await?;
    let observed = Arc::new(Observed::default());
    let listener = tokio::net::TcpListener::bind(args.admin_addr).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = admin_router(observed.clone());
    let mut rx = stop_rx.clone();
    let admin = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
    });
    let signal = async {
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
    };
    run(client, observed, signal).await;
    let _ = stop_tx.send(true);
    admin.await??;
    Ok(())
}
