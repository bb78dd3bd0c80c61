//! The webhook's own PKI, so that no cert-manager is needed.
//!
//! The operator keeps a CA and a serving certificate for its webhook Service in one Secret
//! (type `kubernetes.io/tls`: `tls.crt`, `tls.key`, and `ca.crt`, the CA bundle). Every
//! replica calls [`ensure`]: the first to find the Secret missing, or within `renew_before`
//! of expiry, issues a new pair and writes it with optimistic concurrency (create, or replace
//! at the read `resourceVersion`); a replica that loses that race reads the winner's. A
//! renewal keeps the previous CA in the bundle, so certificates other replicas still serve
//! stay trusted until they reload. [`patch_ca_bundle`] writes the bundle into the webhook
//! configuration's `clientConfig.caBundle`. [`refresh`], run periodically, does both in the
//! order that keeps the API server trusting what is served: the CA bundle (new and old CA)
//! first, and only then the new serving certificate.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

/// Secret key of the serving certificate (PEM).
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the serving certificate's private key (PEM, PKCS#8).
pub const TLS_KEY: &str = "tls.key";
/// Secret key of the CA bundle (PEM, newest CA first).
pub const CA_CRT: &str = "ca.crt";
/// Annotation on the Secret holding the serving certificate's expiry (RFC 3339).
pub const NOT_AFTER_ANNOTATION: &str = "nencache.io/not-after";

/// What certificates are issued for, and how long they live.
#[derive(Debug, Clone)]
pub struct CertSettings {
    /// The webhook Service's name.
    pub service: String,
    /// The namespace of the Service (and of the Secret).
    pub namespace: String,
    /// Lifetime of a newly issued CA and certificate.
    pub validity: Duration,
    /// Issue a new pair when the current one expires within this.
    pub renew_before: Duration,
}

impl CertSettings {
    /// One year of validity, renewed 30 days before expiry.
    #[must_use]
    pub fn new(service: &str, namespace: &str) -> Self {
        Self {
            service: service.into(),
            namespace: namespace.into(),
            validity: Duration::from_secs(365 * 24 * 3600),
            renew_before: Duration::from_secs(30 * 24 * 3600),
        }
    }

    /// The DNS names the API server may use for the Service.
    #[must_use]
    pub fn dns_names(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        vec![
            s.clone(),
            format!("{s}.{ns}"),
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
        ]
    }
}

/// A certificate failure.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Issuing failed.
    #[error("issuing the webhook certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// An API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// A validity bound outside what a certificate can hold.
    #[error("certificate time {0} is out of range")]
    Time(Timestamp),
    /// Other replicas kept replacing the Secret.
    #[error("the webhook certificate Secret kept changing under us")]
    Contended,
    /// The new serving certificate could not be loaded.
    #[error(transparent)]
    Serve(#[from] crate::https::TlsError),
}

/// A serving certificate, its key and the CA bundle that verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// CA certificates (PEM), the one that signed `cert_pem` first.
    pub ca_pem: String,
    /// The serving certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// When the serving certificate expires.
    pub not_after: Timestamp,
}

fn to_offset(t: Timestamp) -> Result<time::OffsetDateTime, CertError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|_| CertError::Time(t))
}

/// The first PEM block of `pem` (the newest CA of a bundle).
fn first_pem_block(pem: &str) -> Option<&str> {
    const END: &str = "-----END CERTIFICATE-----";
    let end = pem.find(END)? + END.len();
    Some(pem[..end].trim())
}

/// Issues a fresh CA and a serving certificate for `settings`' Service, valid from an hour
/// before `now` (clock skew) for `settings.validity`. `previous_ca` (PEM) is kept after the
/// new CA in the bundle.
///
/// # Errors
/// When rcgen cannot issue the certificates.
pub fn issue(
    settings: &CertSettings,
    now: Timestamp,
    previous_ca: Option<&str>,
) -> Result<Bundle, CertError> {
    let lifetime = i64::try_from(settings.validity.as_secs()).unwrap_or(i64::MAX / 2);
    let not_before = Timestamp::from_second(now.as_second() - 3600).unwrap_or(now);
    let not_after =
        Timestamp::from_second(now.as_second().saturating_add(lifetime)).unwrap_or(Timestamp::MAX);

    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("{} webhook CA", settings.service),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = to_offset(not_before)?;
    ca.not_after = to_offset(not_after)?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(settings.dns_names())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        format!("{}.{}.svc", settings.service, settings.namespace),
    );
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = to_offset(not_before)?;
    leaf.not_after = to_offset(not_after)?;
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;

    let mut ca_pem = ca_cert.pem();
    if let Some(prev) = previous_ca.and_then(first_pem_block) {
        ca_pem.push_str(prev);
        ca_pem.push('\n');
    }
    Ok(Bundle {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

impl Bundle {
    /// Whether the serving certificate must be replaced at `now`.
    #[must_use]
    pub fn needs_renewal(&self, now: Timestamp, renew_before: Duration) -> bool {
        let margin = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX / 2);
        now.as_second().saturating_add(margin) >= self.not_after.as_second()
    }

    /// The Secret holding this bundle.
    #[must_use]
    pub fn to_secret(&self, name: &str, namespace: &str) -> Secret {
        let data = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".into(),
                    "nencache-operator".into(),
                )])),
                annotations: Some(BTreeMap::from([(
                    NOT_AFTER_ANNOTATION.into(),
                    self.not_after.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                (CA_CRT.into(), data(&self.ca_pem)),
                (TLS_CRT.into(), data(&self.cert_pem)),
                (TLS_KEY.into(), data(&self.key_pem)),
            ])),
            ..Secret::default()
        }
    }

    /// Reads a bundle back from its Secret; `None` when anything is missing or unreadable
    /// (the caller then issues a new one).
    #[must_use]
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
        let not_after = secret
            .metadata
            .annotations
            .as_ref()?
            .get(NOT_AFTER_ANNOTATION)?
            .parse()
            .ok()?;
        let b = Self {
            ca_pem: text(CA_CRT)?,
            cert_pem: text(TLS_CRT)?,
            key_pem: text(TLS_KEY)?,
            not_after,
        };
        let all_pem = [&b.ca_pem, &b.cert_pem, &b.key_pem]
            .iter()
            .all(|s| s.contains("-----BEGIN "));
        all_pem.then_some(b)
    }
}

/// Returns the current bundle from the Secret `name`, issuing and storing a new one when it
/// is missing, unreadable or due for renewal. `serving` is the bundle this replica serves, if
/// any: when the Secret was lost its CA stays in the new bundle, so that what replicas still
/// serve stays trusted until they reload.
///
/// # Errors
/// A failed API call, a failed issue, or a Secret that other writers keep replacing.
pub async fn ensure(
    api: &Api<Secret>,
    name: &str,
    settings: &CertSettings,
    serving: Option<&Bundle>,
) -> Result<Bundle, CertError> {
    let kube = |what| move |source| CertError::Kube { what, source };
    for _ in 0..5 {
        let now = Timestamp::now();
        let current = api.get_opt(name).await.map_err(kube("get_secret"))?;
        let existing = current.as_ref().and_then(Bundle::from_secret);
        if let Some(b) = &existing
            && !b.needs_renewal(now, settings.renew_before)
        {
            return Ok(b.clone());
        }
        let previous = existing.as_ref().or(serving).map(|b| b.ca_pem.as_str());
        let fresh = issue(settings, now, previous)?;
        let mut secret = fresh.to_secret(name, &settings.namespace);
        let written = match current {
            None => api.create(&PostParams::default(), &secret).await,
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version;
                api.replace(name, &PostParams::default(), &secret).await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = name, not_after = %fresh.not_after, "issued webhook certificate");
                return Ok(fresh);
            }
            // Another replica wrote first (409 AlreadyExists or Conflict): read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube("write_secret")(e)),
        }
    }
    Err(CertError::Contended)
}

/// Writes `ca_pem` into `clientConfig.caBundle` of every webhook in the configuration `name`
/// that lacks it. Returns whether anything changed; a missing configuration is not an error
/// (the operator may run without its chart) and changes nothing.
///
/// # Errors
/// A failed API call.
pub async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> Result<bool, CertError> {
    let kube = |what| move |source| CertError::Kube { what, source };
    let Some(config) = api
        .get_opt(name)
        .await
        .map_err(kube("get_webhook_config"))?
    else {
        tracing::warn!(
            config = name,
            "MutatingWebhookConfiguration not found; CA bundle not written"
        );
        return Ok(false);
    };
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    let stale: Vec<_> = config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&wanted))
        .map(|w| {
            json!({
                "name": w.name,
                "clientConfig": {
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
                },
            })
        })
        .collect();
    if stale.is_empty() {
        return Ok(false);
    }
    // `webhooks` merges by name, so only the CA bundles change.
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Strategic(json!({ "webhooks": stale })),
    )
    .await
    .map_err(kube("patch_webhook_config"))?;
    tracing::info!(
        config = name,
        "CA bundle written to the webhook configuration"
    );
    Ok(true)
}

/// One periodic check of a serving replica: renews the bundle in the Secret `secret` when due
/// (or picks up the one another replica issued), writes its CA bundle into the webhook
/// configuration `config`, and only once that is written serves the new certificate from
/// `store`. The bundle keeps the previous CA, so the API server trusts the certificates served
/// before and after the swap; swapping first would leave it calling a certificate it does not
/// trust yet. Returns the bundle served now.
///
/// # Errors
/// A failed API call (nothing is swapped then; the next check retries), or a certificate the
/// store cannot load (the current one stays).
pub async fn refresh(
    secrets: &Api<Secret>,
    secret: &str,
    configs: &Api<MutatingWebhookConfiguration>,
    config: &str,
    settings: &CertSettings,
    serving: &Bundle,
    store: &crate::https::CertStore,
) -> Result<Bundle, CertError> {
    let bundle = ensure(secrets, secret, settings, Some(serving)).await?;
    patch_ca_bundle(configs, config, &bundle.ca_pem).await?;
    if bundle != *serving {
        store.set(&bundle.cert_pem, &bundle.key_pem)?;
        tracing::info!(not_after = %bundle.not_after, "webhook certificate reloaded");
    }
    Ok(bundle)
}
