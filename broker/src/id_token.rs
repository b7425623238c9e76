//! Verifying ID tokens from the identity provider.
//!
//! [`verify`] is pure: a token, the issuer's keys, what is expected, and `now` in; verified
//! claims or a specific error out. It refuses what a careful relying party refuses: `alg: none`
//! and symmetric algorithms, keys named by the token itself (`jku`, `x5u`, `jwk`, `x5c`),
//! access tokens (`typ`), critical headers it does not know, an issuer that is not byte-equal,
//! an audience without the client, a mismatched `azp`, expiry, `nbf`/`iat` in the future, a
//! missing subject and oversized tokens. [`Keys`] fetches and caches the issuer's JWKS.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Mutex, RwLock};

/// Largest ID token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;

/// Clock difference tolerated for `exp`, `nbf` and `iat`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Least time between two fetches of the JWKS.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

/// Keys older than this are fetched again before they are used.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(3600);

/// Keys that could not be fetched again for this long verify nothing: a withdrawn key must not
/// live on because the issuer's key endpoint is unreachable.
pub const MAX_STALE_KEY_AGE: Duration = Duration::from_secs(24 * 3600);

/// Algorithms accepted: asymmetric only.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What a token must be for.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The configured issuer; `iss` must be byte-equal.
    pub issuer: &'a str,
    /// The broker's client id; `aud` must contain it and `azp`, when present, equal it.
    pub client_id: &'a str,
}

/// The claims of a verified ID token that Postern uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Issuer.
    pub issuer: String,
    /// Subject.
    pub subject: String,
    /// When the person authenticated; `iat` when the IdP did not say.
    pub auth_time: SystemTime,
    /// Whether `auth_time` was in the token (rather than taken from `iat`).
    pub auth_time_reported: bool,
    /// Authentication methods.
    pub amr: Vec<String>,
    /// Authentication context class.
    pub acr: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Whether the IdP verified the email address.
    pub email_verified: bool,
    /// Display name.
    pub name: Option<String>,
    /// Groups (`groups` claim), when the IdP sends them.
    pub groups: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Larger than [`MAX_TOKEN_LEN`].
    #[error("the ID token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not three base64url parts with a JSON header and payload.
    #[error("the ID token is not a signed JWT: {0}")]
    Malformed(&'static str),
    /// `alg: none`.
    #[error("the ID token is not signed (alg \"none\")")]
    Unsigned,
    /// A symmetric or unknown algorithm.
    #[error("the ID token's algorithm `{0}` is not an accepted asymmetric algorithm")]
    Algorithm(String),
    /// The header names a key source or carries a key.
    #[error("the ID token's header carries `{0}`, which is never trusted")]
    KeyInHeader(&'static str),
    /// The header marks it as another kind of token.
    #[error("the token is of type `{0}`, not an ID token")]
    WrongType(String),
    /// The header has critical extensions.
    #[error("the ID token has critical header parameters, which are not supported")]
    Critical,
    /// No key of the issuer matches.
    #[error("no key of the issuer matches the ID token (kid {0:?})")]
    UnknownKey(Option<String>),
    /// The signature does not verify.
    #[error("the ID token's signature does not verify")]
    BadSignature,
    /// A required claim is missing or of the wrong type.
    #[error("the ID token lacks a valid `{0}` claim")]
    Missing(&'static str),
    /// `iss` is not the configured issuer.
    #[error("the ID token's issuer `{0}` is not the configured issuer")]
    Issuer(String),
    /// `aud` does not contain the client id.
    #[error("the ID token is not meant for this broker (aud)")]
    Audience,
    /// `azp` is not the client id, or missing with several audiences.
    #[error("the ID token was issued to another party (azp)")]
    AuthorizedParty,
    /// `exp` has passed.
    #[error("the ID token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future.
    #[error("the ID token is not valid yet ({0} in the future)")]
    NotYetValid(&'static str),
    /// A claim policy decides on cannot be carried whole in a certificate.
    #[error("the ID token's `{0}` cannot be used: {1}")]
    Unusable(&'static str, String),
    /// Fetching the issuer's keys failed.
    #[error("cannot fetch the issuer's keys: {0}")]
    Jwks(String),
}

/// Verifies `token` against `keys` for `expected` at `now`.
pub fn verify(
    token: &str,
    keys: &[Jwk],
    expected: &Expected<'_>,
    now: SystemTime,
) -> Result<Claims, TokenError> {
    let header = check_header(token)?;
    let key = select_key(keys, &header)?;
    let decoding =
        DecodingKey::from_jwk(key).map_err(|_| TokenError::UnknownKey(header.kid.clone()))?;
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(token, &decoding, &validation).map_err(|e| match e
        .kind()
    {
        jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
        jsonwebtoken::errors::ErrorKind::InvalidKeyFormat
        | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
            TokenError::UnknownKey(header.kid.clone())
        }
        _ => TokenError::Malformed("the payload is not a JSON object"),
    })?;
    check_claims(&data.claims, expected, now)
}

/// The header fields that matter, after the checks that need no key.
#[derive(Debug)]
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn check_header(token: &str) -> Result<Header, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("it does not have three parts"));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("the header is not base64url"))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|_| TokenError::Malformed("the header is not a JSON object"))?;
    for name in ["jku", "x5u", "jwk", "x5c"] {
        if header.contains_key(name) {
            return Err(TokenError::KeyInHeader(name));
        }
    }
    if header.contains_key("crit") {
        return Err(TokenError::Critical);
    }
    if let Some(typ) = header.get("typ") {
        let typ = typ.as_str().unwrap_or_default();
        let bare = typ
            .strip_prefix("application/")
            .unwrap_or(typ)
            .to_ascii_lowercase();
        if bare != "jwt" {
            return Err(TokenError::WrongType(typ.to_owned()));
        }
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::Malformed("the header has no `alg`"))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::Unsigned);
    }
    let alg = ALGORITHMS
        .iter()
        .copied()
        .find(|a| format!("{a:?}") == alg)
        .ok_or_else(|| TokenError::Algorithm(alg.chars().take(16).collect()))?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed("`kid` is not a string")),
    };
    Ok(Header { alg, kid })
}

/// The issuer's key for this header: by `kid`, or the only key that fits the algorithm.
fn select_key<'k>(keys: &'k [Jwk], header: &Header) -> Result<&'k Jwk, TokenError> {
    let fits = |key: &&Jwk| {
        key_fits(key, header.alg)
            && key
                .common
                .key_algorithm
                .is_none_or(|ka| format!("{ka:?}") == format!("{:?}", header.alg))
    };
    let candidates: Vec<&Jwk> = match &header.kid {
        Some(kid) => keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
            .filter(fits)
            .collect(),
        None => keys.iter().filter(fits).collect(),
    };
    match candidates.as_slice() {
        [key] => Ok(key),
        _ => Err(TokenError::UnknownKey(header.kid.clone())),
    }
}

fn key_fits(key: &Jwk, alg: Algorithm) -> bool {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
    if matches!(
        key.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return false;
    }
    match (&key.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => {
            okp.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

fn check_claims(
    claims: &Value,
    expected: &Expected<'_>,
    now: SystemTime,
) -> Result<Claims, TokenError> {
    let claims = claims
        .as_object()
        .ok_or(TokenError::Malformed("the payload is not a JSON object"))?;
    let string = |name: &'static str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let time = |name: &'static str| -> Result<Option<SystemTime>, TokenError> {
        match claims.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_f64()
                .filter(|t| t.is_finite() && *t >= 0.0 && *t < 253_402_300_800.0)
                .map(|t| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64)))
                .ok_or(TokenError::Missing(name)),
        }
    };

    let issuer = string("iss").ok_or(TokenError::Missing("iss"))?;
    if issuer.as_bytes() != expected.issuer.as_bytes() {
        return Err(TokenError::Issuer(issuer.chars().take(200).collect()));
    }
    let subject = string("sub").ok_or(TokenError::Missing("sub"))?;
    if subject.len() > postern_certs::MAX_ID_PART_LEN {
        return Err(TokenError::Missing("sub"));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).collect(),
        _ => return Err(TokenError::Missing("aud")),
    };
    if !audiences.contains(&expected.client_id) {
        return Err(TokenError::Audience);
    }
    match claims.get("azp") {
        Some(Value::String(azp)) if azp == expected.client_id => {}
        None if audiences.len() == 1 => {}
        _ => return Err(TokenError::AuthorizedParty),
    }
    if let Some(typ) = string("typ") {
        // Keycloak marks its tokens in the payload: "ID" for ID tokens, "Bearer" for access.
        if !typ.eq_ignore_ascii_case("id") {
            return Err(TokenError::WrongType(typ.chars().take(32).collect()));
        }
    }
    let exp = time("exp")?.ok_or(TokenError::Missing("exp"))?;
    if exp + CLOCK_SKEW <= now {
        return Err(TokenError::Expired);
    }
    let iat = time("iat")?.ok_or(TokenError::Missing("iat"))?;
    if iat > now + CLOCK_SKEW {
        return Err(TokenError::NotYetValid("iat"));
    }
    if time("nbf")?.is_some_and(|nbf| nbf > now + CLOCK_SKEW) {
        return Err(TokenError::NotYetValid("nbf"));
    }
    let auth_time_claim = time("auth_time")?;
    if auth_time_claim.is_some_and(|t| t > now + CLOCK_SKEW) {
        return Err(TokenError::NotYetValid("auth_time"));
    }
    // Lists that policy decides on are taken whole or refused: a silently shortened list of
    // groups would make `forbid … in Group::"…"` miss.
    let list = |name: &'static str,
                max: usize,
                max_len: usize|
     -> Result<Vec<String>, TokenError> {
        let unusable = |why: String| TokenError::Unusable(name, why);
        let items: Vec<&Value> = match claims.get(name) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().collect(),
            Some(one @ Value::String(_)) => vec![one],
            Some(_) => return Err(unusable("it is not a list of strings".into())),
        };
        if items.len() > max {
            return Err(unusable(format!(
                "it has {} values; a certificate carries at most {max}",
                items.len()
            )));
        }
        items
            .into_iter()
            .map(|item| match item.as_str() {
                Some(s)
                    if !s.is_empty() && s.len() <= max_len && !s.chars().any(char::is_control) =>
                {
                    Ok(s.to_owned())
                }
                _ => Err(unusable(format!(
                    "a value is not a printable string of 1 to {max_len} bytes"
                ))),
            })
            .collect()
    };
    // Entra ID leaves `groups` out of a token for people in many groups and says so here.
    if claims
        .get("_claim_names")
        .and_then(Value::as_object)
        .is_some_and(|names| names.contains_key("groups"))
    {
        return Err(TokenError::Unusable(
            "groups",
            "the identity provider left the groups out (too many; `_claim_names`): send only the groups policy uses".into(),
        ));
    }
    // Some IdPs send booleans as strings.
    let email_verified = match claims.get("email_verified") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    let text = |name: &'static str, max: usize| {
        string(name)
            .filter(|s| s.len() <= max && !s.chars().any(char::is_control))
            .map(str::to_owned)
    };
    let acr = match string("acr") {
        None => None,
        Some(acr)
            if acr.len() <= postern_certs::MAX_TEXT_LEN && !acr.chars().any(char::is_control) =>
        {
            Some(acr.to_owned())
        }
        Some(_) => {
            return Err(TokenError::Unusable(
                "acr",
                format!(
                    "it is longer than {} bytes or unprintable",
                    postern_certs::MAX_TEXT_LEN
                ),
            ));
        }
    };
    Ok(Claims {
        issuer: issuer.to_owned(),
        subject: subject.to_owned(),
        auth_time: auth_time_claim.unwrap_or(iat),
        auth_time_reported: auth_time_claim.is_some(),
        amr: list("amr", postern_certs::MAX_AMR, postern_certs::MAX_AMR_LEN)?,
        acr,
        // Display attributes that do not fit are left out; policy sees them absent.
        email: text("email", postern_certs::MAX_EMAIL_LEN),
        email_verified,
        name: text("name", postern_certs::MAX_TEXT_LEN),
        groups: list(
            "groups",
            postern_certs::MAX_GROUPS,
            postern_certs::MAX_GROUP_LEN,
        )?,
    })
}

/// The issuer's signing keys: fetched from `jwks_uri`, cached, and fetched again when a token
/// names a key the cache does not hold — by one task at a time, and not more often than every
/// few seconds, so that tokens cannot make the broker hammer the IdP.
#[derive(Debug)]
pub struct Keys {
    uri: String,
    http: reqwest::Client,
    cache: RwLock<KeyCache>,
    /// Held while fetching, so that one task at a time fetches.
    fetching: Mutex<()>,
}

/// The keys as last fetched.
#[derive(Debug, Default)]
struct KeyCache {
    keys: Vec<Jwk>,
    /// When the last fetch ended, successful or not.
    fetched: Option<Instant>,
    /// When keys were last fetched successfully.
    fresh: Option<Instant>,
    /// Counts fetches, so that a task that waited for another's fetch knows it happened.
    generation: u64,
    /// Why the last fetch failed, if it did.
    last_error: Option<String>,
}

impl Keys {
    /// Keys at `uri`, fetched when first needed.
    pub fn new(uri: String, http: reqwest::Client) -> Self {
        Self {
            uri,
            http,
            cache: RwLock::new(KeyCache::default()),
            fetching: Mutex::new(()),
        }
    }

    /// Verifies `token`: with the cached keys, fetched again first when they are older than
    /// [`MAX_KEY_AGE`] (a key the issuer withdrew stops working then; if the issuer cannot be
    /// reached, the old keys serve until [`MAX_STALE_KEY_AGE`]), and once more when the token
    /// names a key not yet known.
    pub async fn verify(
        &self,
        token: &str,
        expected: &Expected<'_>,
        now: SystemTime,
    ) -> Result<Claims, TokenError> {
        let (stale, generation) = {
            let cache = self.cache.read().await;
            let stale = cache.fresh.is_none_or(|at| at.elapsed() > MAX_KEY_AGE);
            (stale, cache.generation)
        };
        if stale {
            self.refresh(generation).await;
        }
        let (first, generation) = {
            let cache = self.cache.read().await;
            // Keys that could not be fetched again for this long are not trusted any more.
            if cache
                .fresh
                .is_none_or(|at| at.elapsed() > MAX_STALE_KEY_AGE)
            {
                return Err(TokenError::Jwks(cache.last_error.clone().unwrap_or_else(
                    || "the issuer's keys could not be fetched".to_owned(),
                )));
            }
            (verify(token, &cache.keys, expected, now), cache.generation)
        };
        match first {
            Err(TokenError::UnknownKey(kid)) => {
                self.refresh(generation).await;
                let cache = self.cache.read().await;
                match verify(token, &cache.keys, expected, now) {
                    // Say why the keys could not be had, rather than that the key is unknown.
                    Err(TokenError::UnknownKey(_)) if cache.last_error.is_some() => Err(
                        TokenError::Jwks(cache.last_error.clone().unwrap_or_default()),
                    ),
                    Err(TokenError::UnknownKey(_)) => Err(TokenError::UnknownKey(kid)),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// Fetches the keys unless another task did since `seen`, or a fetch ended less than
    /// [`MIN_REFETCH_INTERVAL`] ago. A failed fetch keeps the keys there were.
    async fn refresh(&self, seen: u64) {
        let _fetching = self.fetching.lock().await;
        {
            let cache = self.cache.read().await;
            if cache.generation != seen
                || cache
                    .fetched
                    .is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL)
            {
                return;
            }
        }
        let result = self.fetch().await;
        let mut cache = self.cache.write().await;
        cache.generation += 1;
        cache.fetched = Some(Instant::now());
        match result {
            Ok(keys) => {
                cache.keys = keys;
                cache.fresh = cache.fetched;
                cache.last_error = None;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot fetch the identity provider's keys");
                cache.last_error = Some(err);
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Jwk>, String> {
        let error = |e: &dyn std::fmt::Display| e.to_string();
        let response = self
            .http
            .get(&self.uri)
            .send()
            .await
            .map_err(|e| error(&e))?;
        if !response.status().is_success() {
            return Err(error(&format!(
                "{} answered {}",
                self.uri,
                response.status()
            )));
        }
        let body = crate::oidc::read_limited(response, MAX_JWKS_LEN)
            .await
            .map_err(|e| error(&e))?;
        parse_jwks(&body).map_err(|e| error(&e))
    }
}

/// The usable keys of a JWKS document; keys of unknown types are skipped, not fatal.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
        .collect())
}

#[cfg(test)]
mod tests;
