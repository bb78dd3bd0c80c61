//! End-to-end checks of NenCache on a real cluster: the Helm chart installed, a
//! `NenCacheCluster` applied, its agents ready, and an injected pod that puts and gets a value
//! through the node's agent socket. The test installs into, and afterwards deletes from,
//! whatever cluster the kubeconfig points at, so it is opt-in: `tests/cluster.rs` runs it only
//! with `NENCACHE_E2E=1` ([`OPT_IN`]) and otherwise says why it skipped, without reading the
//! kubeconfig; `e2e/kind.sh` sets up kind and opts in.
//!
//! Settings come from the environment: `NENCACHE_E2E=1` to run at all, `E2E_AGENT_IMAGE` and
//! `E2E_OPERATOR_IMAGE` (the images the cluster can pull or has loaded; the agent image is
//! also the operator's helper image), `E2E_KEEP=1` to leave everything installed, and `HELM`
//! for the helm binary (default: `helm` on the PATH).

use std::{future::Future, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use kube::Client;

/// Images and names the run uses.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Agent image (`repository:tag`).
    pub agent_image: String,
    /// Operator image repository.
    pub operator_repository: String,
    /// Operator image tag.
    pub operator_tag: String,
    /// Namespace of the operator.
    pub operator_namespace: String,
    /// Namespace of the cluster and the test pod.
    pub namespace: String,
    /// Leave everything installed afterwards.
    pub keep: bool,
    /// The helm binary.
    pub helm: PathBuf,
}

impl Settings {
    /// Reads the settings from the environment.
    ///
    /// # Errors
    /// When `E2E_OPERATOR_IMAGE` has no tag.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let operator = var("E2E_OPERATOR_IMAGE", "nencache-operator:e2e");
        let (repo, tag) = operator
            .rsplit_once(':')
            .context("E2E_OPERATOR_IMAGE needs a tag (repository:tag)")?;
        Ok(Self {
            agent_image: var("E2E_AGENT_IMAGE", "nencache-agent:e2e"),
            operator_repository: repo.into(),
            operator_tag: tag.into(),
            operator_namespace: "nencache-system".into(),
            namespace: "nencache-e2e".into(),
            keep: std::env::var("E2E_KEEP").is_ok_and(|v| v == "1"),
            helm: std::env::var_os("HELM").map_or_else(|| PathBuf::from("helm"), PathBuf::from),
        })
    }
}

/// The environment variable that opts in to running against a cluster (value `1`).
pub const OPT_IN: &str = "NENCACHE_E2E";

/// `Ok` when the run opted in with `NENCACHE_E2E=1`; otherwise why the tests skip.
///
/// # Errors
/// The reason to skip, for the test to print.
pub fn opted_in() -> Result<(), String> {
    match std::env::var(OPT_IN) {
        Ok(v) if v == "1" => Ok(()),
        _ => Err(format!(
            "{OPT_IN}=1 is not set; the end-to-end test installs the chart into the cluster the \
             kubeconfig points at and deletes a namespace and the release afterwards, so it \
             runs only when asked (e2e/kind.sh asks)"
        )),
    }
}

/// The cluster to run against: `Ok(None)` (after printing why) unless the run opted in
/// ([`opted_in`]); the kubeconfig is not even read then.
///
/// # Errors
/// When the run opted in but the cluster cannot be reached: asked for, the test must run.
pub async fn opted_in_cluster() -> anyhow::Result<Option<Client>> {
    if let Err(why) = opted_in() {
        eprintln!("skipped: {why}");
        return Ok(None);
    }
    reachable_cluster()
        .await
        .map(Some)
        .map_err(|why| anyhow::anyhow!("{OPT_IN}=1, but {why}"))
}

/// A client for the cluster the kubeconfig names, or why there is none: no kubeconfig, or an
/// API server that does not answer within five seconds. Call it only after [`opted_in`].
pub async fn reachable_cluster() -> Result<Client, String> {
    let has_config = std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("HOME").is_some_and(|h| PathBuf::from(h).join(".kube/config").exists());
    if !has_config {
        return Err("no kubeconfig (set KUBECONFIG or create ~/.kube/config)".into());
    }
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("the kubeconfig does not give a client: {e}"))?;
    eprintln!("running against the API server at {}", config.cluster_url);
    let client = Client::try_from(config)
        .map_err(|e| format!("the kubeconfig does not give a client: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(format!("the API server refused us: {e}")),
        Err(_) => Err("the API server did not answer within 5 s".into()),
    }
}

/// Runs helm with `args`, failing with its output when it fails.
///
/// # Errors
/// When helm cannot start or exits non-zero.
pub fn helm(s: &Settings, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(&s.helm)
        .args(args)
        .output()
        .with_context(|| format!("running {}", s.helm.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("helm {}: {text}", args.join(" "));
    }
    Ok(text)
}

/// Polls `check` every two seconds until it returns `Some`, or fails after `limit`.
///
/// # Errors
/// When `limit` passes first (naming `what`), or `check` fails.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
