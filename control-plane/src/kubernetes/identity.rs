//! Kubernetes mode's `Certify` authentication: the sidecar presents its pod's projected
//! ServiceAccount token (audience [`AUDIENCE`]); the control plane asks the API server
//! (`authentication.k8s.io/v1` TokenReview) who it is. The namespace and service account of
//! the SVID come from the review — never from the CSR or the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::Client;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// The audience a sidecar's projected ServiceAccount token must be issued for.
pub const AUDIENCE: &str = "meshflow";

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server did not authenticate the token (expired, wrong audience, deleted
    /// service account, bad signature…); its reason when it gave one.
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but not as a service account.
    #[error("token belongs to {0:?}, not a service account")]
    NotServiceAccount(String),
    /// The TokenReview call itself failed (the API server unreachable or failing).
    #[error("TokenReview failed: {0}")]
    Api(#[from] kube::Error),
    /// Too many reviews in flight: the caller should retry later.
    #[error("too many Certify calls in flight; retry")]
    Busy,
}

/// TokenReviews in flight at most ([`TokenReviewer`]).
pub const MAX_REVIEWS_IN_FLIGHT: usize = 32;

/// How long a refused token is refused again without asking the API server.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

/// Refused tokens remembered at most (by SHA-256).
const MAX_REMEMBERED_REFUSALS: usize = 10_000;

/// [`review`] with the bounds an unauthenticated endpoint needs: only JWT-shaped tokens are
/// sent to the API server, at most [`MAX_REVIEWS_IN_FLIGHT`] at once (a caller waits up to a
/// second for a slot, then gets [`ReviewError::Busy`]), and a refused token is refused again
/// for [`REFUSAL_MEMORY`] without a review — so a flood of bad tokens costs the API server
/// little.
pub struct TokenReviewer {
    client: Client,
    permits: Semaphore,
    refused: Mutex<HashMap<[u8; 32], Instant>>,
}

impl TokenReviewer {
    /// A reviewer asking `client`'s API server.
    pub fn new(client: Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            permits: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            refused: Mutex::default(),
        })
    }

    /// Reviews `token`; see [`review`].
    ///
    /// # Errors
    /// As [`review`], plus [`ReviewError::Unauthenticated`] for a token that is not a JWT
    /// (three base64url parts) or was refused within [`REFUSAL_MEMORY`], and
    /// [`ReviewError::Busy`].
    pub async fn review(&self, token: &str) -> Result<(String, String), ReviewError> {
        let parts: Vec<&str> = token.split('.').collect();
        let base64url = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if parts.len() != 3 || !parts.iter().all(base64url) {
            return Err(ReviewError::Unauthenticated(
                "not a JWT (a ServiceAccount token has three base64url parts)".into(),
            ));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            refused.retain(|_, until| *until > Instant::now());
            if refused.contains_key(&digest) {
                return Err(ReviewError::Unauthenticated(
                    "refused by the API server moments ago".into(),
                ));
            }
        }
        let _permit = tokio::time::timeout(Duration::from_secs(1), self.permits.acquire())
            .await
            .map_err(|_| ReviewError::Busy)?
            .map_err(|_| ReviewError::Busy)?;
        let result = review(&self.client, token).await;
        if matches!(
            result,
            Err(ReviewError::Unauthenticated(_) | ReviewError::NotServiceAccount(_))
        ) {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            if refused.len() < MAX_REMEMBERED_REFUSALS {
                refused.insert(digest, Instant::now() + REFUSAL_MEMORY);
            }
        }
        result
    }
}

/// Reviews `token` for [`AUDIENCE`] and returns its (namespace, service account).
///
/// # Errors
/// [`ReviewError`] when the API server does not vouch for it as a service account's token
/// for this audience.
pub async fn review(client: &Client, token: &str) -> Result<(String, String), ReviewError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![AUDIENCE.to_string()]),
        },
        ..Default::default()
    };
    let reviewed = match api.create(&PostParams::default(), &review).await {
        Ok(reviewed) => reviewed,
        // The API server refused the review request itself (too large, malformed): the token
        // is bad, not the API server.
        Err(kube::Error::Api(status))
            if (400..500).contains(&status.code) && status.code != 429 =>
        {
            return Err(ReviewError::Unauthenticated(status.message))
        }
        Err(e) => return Err(e.into()),
    };
    let status = reviewed.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(ReviewError::Unauthenticated(
            status.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    // An API server that does not know audiences answers without them: insist.
    if !status.audiences.iter().flatten().any(|a| a == AUDIENCE) {
        return Err(ReviewError::Unauthenticated(format!(
            "token is not for audience {AUDIENCE:?}"
        )));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let mut parts = username.splitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa))
            if !ns.is_empty() && !sa.is_empty() =>
        {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => Err(ReviewError::NotServiceAccount(username)),
    }
}
