//! A JWT issuer for tests: an ECDSA P-256 key (rcgen), its JWKS (RFC 7517) and ES256 tokens
//! signed with jsonwebtoken. Shared by the policies tests and the e2e tests (`#[path]`).

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

/// An issuer with one signing key.
pub struct TestIssuer {
    /// The `iss` its tokens carry.
    pub issuer: String,
    kid: String,
    key: rcgen::KeyPair,
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

impl TestIssuer {
    /// A fresh key for `issuer`, published under key id `kid`.
    pub fn new(issuer: &str, kid: &str) -> Self {
        Self {
            issuer: issuer.to_string(),
            kid: kid.to_string(),
            key: rcgen::KeyPair::generate().expect("P-256 key"),
        }
    }

    /// The public key as a JWKS JSON string.
    pub fn jwks(&self) -> String {
        // Uncompressed SEC1 point: 0x04 || X (32 bytes) || Y (32 bytes).
        let raw = self.key.public_key_raw();
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]})
        .to_string()
    }

    /// An ES256 token with `iss` set to this issuer plus `claims` (an object).
    pub fn token(&self, claims: serde_json::Value) -> String {
        let mut body = serde_json::json!({"iss": self.issuer});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), claims.as_object()) {
            body.extend(extra.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        encode(
            &header,
            &body,
            &EncodingKey::from_ec_der(&self.key.serialize_der()),
        )
        .expect("sign")
    }

    /// A valid token for `sub` with audience `aud`, valid for an hour.
    pub fn valid(&self, sub: &str, aud: &str) -> String {
        self.token(serde_json::json!({"sub": sub, "aud": aud, "exp": now() + 3600}))
    }
}

/// An unsigned token (`alg: none`, RFC 7519 §6) with `claims`.
pub fn none_token(claims: serde_json::Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// An HS256 token signed with `secret` (for algorithm-confusion checks).
pub fn hs256_token(claims: serde_json::Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}
