//! Kubernetes mode's `Certify` authentication: the sidecar presents its pod's projected
//! ServiceAccount token (audience [`AUDIENCE`]); the control plane asks the API server
//! (`authentication.k8s.io/v1` TokenReview) who it is. The namespace and service account of
//! the SVID come from the review — never from the CSR or the request.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::Client;

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
    /// The TokenReview call itself failed.
    #[error("TokenReview failed: {0}")]
    Api(#[from] kube::Error),
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
    let reviewed = api.create(&PostParams::default(), &review).await?;
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
