//! The broker as OAuth client of the organisation's OpenID provider: discovery, the device
//! authorization grant (RFC 8628), refresh, userinfo and revocation.
//!
//! Tokens travel between the IdP and the broker only. Every IdP error becomes an [`IdpError`]
//! whose message a person can act on; the enrollment code turns it into a failure code.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreRevocableToken, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::http::StatusCode;
use openidconnect::{
    AccessToken, AdditionalProviderMetadata, ClientId, ClientSecret, DeviceAuthorizationUrl,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse, IssuerUrl,
    OAuth2TokenResponse, ProviderMetadata, RefreshToken, RequestTokenError, RevocationUrl, Scope,
    SubjectIdentifier, TokenResponse, UserInfoError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::{MAX_DEVICE_CODE_LIFETIME, Oidc};
use crate::id_token::Keys;

/// Time allowed for one HTTP request to the IdP.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Largest answer read from the IdP (discovery, tokens, userinfo, errors).
const MAX_BODY: usize = 256 * 1024;

/// Shortest wait between two polls of the token endpoint.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A request to the IdP in flight.
type HttpCall = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'static>>;

/// Why an HTTP request to the IdP failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, TLS, timeouts.
    #[error(transparent)]
    Request(#[from] reqwest::Error),
    /// The answer is unusable (too large, malformed).
    #[error("{0}")]
    Answer(String),
}

/// The IdP as configured; discovered on first use and again after a failed discovery.
#[derive(Debug)]
pub struct Idp {
    config: Oidc,
    http: reqwest::Client,
    client_secret: Option<ClientSecret>,
    discovered: Mutex<Discovery>,
}

/// The result of discovery: kept when it worked, remembered briefly when it failed, so that
/// logins queued behind a failing attempt fail at once instead of each waiting for a timeout.
#[derive(Debug, Default)]
struct Discovery {
    done: Option<Arc<Discovered>>,
    failed: Option<(Instant, IdpError)>,
}

/// How long a failed discovery is answered from memory before it is tried again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);

/// What discovery found.
#[derive(Debug)]
pub struct Discovered {
    client: Client,
    revocation: Option<RevocationUrl>,
    /// The issuer's signing keys.
    pub keys: Keys,
}

type Client = CoreClient<
    EndpointSet,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

#[derive(Clone, Debug, Deserialize, Serialize)]
struct ExtraMetadata {
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    revocation_endpoint: Option<RevocationUrl>,
}

impl AdditionalProviderMetadata for ExtraMetadata {}

type Metadata = ProviderMetadata<
    ExtraMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// A device authorization in progress.
pub struct DeviceAuthorization {
    response: CoreDeviceAuthorizationResponse,
}

/// Tokens from the token endpoint. Its `Debug` shows none of them.
pub struct Tokens {
    /// The ID token, compact JWT, when the IdP returned one.
    pub id_token: Option<String>,
    /// The refresh token, when the IdP returned one.
    pub refresh_token: Option<String>,
    access_token: AccessToken,
}

/// Why a request to the IdP failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    /// The IdP could not be reached or did not answer in time.
    #[error("the identity provider at {0} cannot be reached: {1}")]
    Unavailable(String, String),
    /// Discovery failed or lacks what the broker needs.
    #[error("the identity provider's discovery document is unusable: {0}")]
    Discovery(String),
    /// The person refused the request.
    #[error("the login was refused at the identity provider")]
    AccessDenied,
    /// The device code expired before approval.
    #[error("the code was not approved in time")]
    Expired,
    /// The refresh token is no longer valid (revoked, expired, or the session ended at the IdP).
    #[error("the identity provider no longer accepts this login ({0})")]
    InvalidGrant(String),
    /// The IdP refused the broker's client (registration or secret).
    #[error("the identity provider refused the broker's client registration: {0}")]
    Client(String),
    /// The IdP answered for another subject than the login's.
    #[error("the identity provider answered for another person ({0})")]
    OtherPerson(String),
    /// Any other error answer or an unparsable one.
    #[error("the identity provider answered with an error: {0}")]
    Other(String),
}

impl Idp {
    /// An IdP client for `config`; reads the client secret and CA files now, so that a bad
    /// path is a start-up error.
    pub fn new(config: &Oidc) -> Result<Self, String> {
        let client_secret = config
            .client_secret_file
            .as_deref()
            .map(read_secret)
            .transpose()?
            .map(ClientSecret::new);
        let mut builder = reqwest::Client::builder()
            // Following redirects would let a token endpoint send credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("postern-broker/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = &config.ca_file {
            let certificates =
                postern_certs::store::read_certificates(ca_file).map_err(|e| e.to_string())?;
            builder = builder.tls_built_in_root_certs(false);
            for der in certificates {
                let certificate = reqwest::Certificate::from_der(&der).map_err(|e| {
                    format!("`{}`: not a usable CA certificate: {e}", ca_file.display())
                })?;
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot set up HTTPS to the identity provider: {e}"))?;
        Ok(Self {
            config: config.clone(),
            http,
            client_secret,
            discovered: Mutex::new(Discovery::default()),
        })
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The broker's client id.
    pub fn client_id(&self) -> &str {
        &self.config.client_id
    }

    /// Discovery, done once; a failure is answered from memory for [`DISCOVERY_RETRY`], then
    /// tried again.
    pub async fn discovered(&self) -> Result<Arc<Discovered>, IdpError> {
        let mut slot = self.discovered.lock().await;
        if let Some(discovered) = &slot.done {
            return Ok(discovered.clone());
        }
        if let Some((at, err)) = &slot.failed
            && at.elapsed() < DISCOVERY_RETRY
        {
            return Err(err.clone());
        }
        match self.discover().await {
            Ok(discovered) => {
                let discovered = Arc::new(discovered);
                *slot = Discovery {
                    done: Some(discovered.clone()),
                    failed: None,
                };
                Ok(discovered)
            }
            Err(err) => {
                slot.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// The HTTP client the OAuth library calls: bodies read up to a limit, no redirects.
    fn http(&self) -> impl Fn(HttpRequest) -> HttpCall + '_ {
        |request| Box::pin(call(self.http.clone(), request))
    }

    async fn discover(&self) -> Result<Discovered, IdpError> {
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| IdpError::Discovery(format!("the issuer URL is invalid: {e}")))?;
        let metadata = Metadata::discover_async(issuer, &self.http())
            .await
            .map_err(|e| match e {
                openidconnect::DiscoveryError::Request(e) => {
                    IdpError::Unavailable(self.config.issuer.clone(), error_chain(&e))
                }
                other => IdpError::Discovery(error_chain(&other)),
            })?;
        let extra = metadata.additional_metadata().clone();
        let device = extra.device_authorization_endpoint.ok_or_else(|| {
            IdpError::Discovery(
                "it names no device_authorization_endpoint: enable the device authorization grant (RFC 8628) at the IdP"
                    .into(),
            )
        })?;
        let jwks_uri = metadata.jwks_uri().url().to_string();
        // Tokens, secrets and keys travel only as the issuer itself may be reached.
        let mut endpoints = vec![jwks_uri.clone(), device.url().to_string()];
        endpoints.extend(metadata.token_endpoint().map(|u| u.url().to_string()));
        endpoints.extend(metadata.userinfo_endpoint().map(|u| u.url().to_string()));
        endpoints.extend(
            extra
                .revocation_endpoint
                .as_ref()
                .map(|u| u.url().to_string()),
        );
        for endpoint in &endpoints {
            crate::config::check_idp_url(endpoint).map_err(IdpError::Discovery)?;
        }
        let client = CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.config.client_id.clone()),
            self.client_secret.clone(),
        )
        .set_device_authorization_url(device);
        Ok(Discovered {
            client,
            revocation: extra.revocation_endpoint,
            keys: Keys::new(jwks_uri, self.http.clone()),
        })
    }

    /// Starts a device authorization.
    pub async fn start_device(&self) -> Result<DeviceAuthorization, IdpError> {
        let discovered = self.discovered().await?;
        let scopes = self
            .config
            .scopes
            .iter()
            .filter(|s| *s != "openid")
            .map(|s| Scope::new(s.clone()));
        let response: CoreDeviceAuthorizationResponse = discovered
            .client
            .exchange_device_code()
            .add_scopes(scopes)
            .request_async(&self.http())
            .await
            .map_err(|e| token_error(&self.config.issuer, e))?;
        Ok(DeviceAuthorization { response })
    }

    /// Polls the token endpoint until the person approves, refuses, or the code expires,
    /// honouring `interval` (5 s when absent) and `slow_down`, and backing off on network
    /// errors. `on_poll` runs before each wait.
    pub async fn finish_device(
        &self,
        device: &DeviceAuthorization,
        on_poll: impl Fn() + Send + Sync,
    ) -> Result<Tokens, IdpError> {
        let discovered = self.discovered().await?;
        let request = discovered
            .client
            .exchange_device_access_token(&device.response)
            .map_err(|e| IdpError::Discovery(e.to_string()))?
            .set_max_backoff_interval(Duration::from_secs(30));
        let on_poll = &on_poll;
        let response: CoreTokenResponse = request
            .request_async(
                &self.http(),
                |wait| async move {
                    on_poll();
                    // An IdP that says `interval: 0` does not get a tight loop.
                    tokio::time::sleep(wait.max(MIN_POLL_INTERVAL)).await;
                },
                Some(device.expires_in()),
            )
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(response) => match response.error() {
                    openidconnect::DeviceCodeErrorResponseType::AccessDenied => {
                        IdpError::AccessDenied
                    }
                    openidconnect::DeviceCodeErrorResponseType::ExpiredToken => IdpError::Expired,
                    openidconnect::DeviceCodeErrorResponseType::Basic(basic) => {
                        basic_error(basic, response.error_description())
                    }
                    other => {
                        IdpError::Other(describe(other.as_ref(), response.error_description()))
                    }
                },
                RequestTokenError::Request(e) => {
                    IdpError::Unavailable(self.config.issuer.clone(), error_chain(&e))
                }
                other => IdpError::Other(error_chain(&other)),
            })?;
        Ok(Tokens::from(&response))
    }

    /// Exchanges a refresh token for new tokens.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Tokens, IdpError> {
        let discovered = self.discovered().await?;
        let token = RefreshToken::new(refresh_token.to_owned());
        let response: CoreTokenResponse = discovered
            .client
            .exchange_refresh_token(&token)
            .map_err(|e| IdpError::Discovery(e.to_string()))?
            .request_async(&self.http())
            .await
            .map_err(|e| token_error(&self.config.issuer, e))?;
        Ok(Tokens::from(&response))
    }

    /// Asks the userinfo endpoint who `tokens` belong to, insisting on `subject`: the check a
    /// renewal makes when the IdP returned no new ID token.
    pub async fn userinfo(&self, tokens: &Tokens, subject: &str) -> Result<(), IdpError> {
        let discovered = self.discovered().await?;
        let request = discovered
            .client
            .user_info(
                tokens.access_token.clone(),
                Some(SubjectIdentifier::new(subject.to_owned())),
            )
            .map_err(|_| {
                IdpError::Discovery(
                    "the IdP returned no new ID token on refresh and has no userinfo endpoint"
                        .into(),
                )
            })?;
        let _claims: openidconnect::core::CoreUserInfoClaims = request
            .request_async(&self.http())
            .await
            .map_err(|e| match e {
                UserInfoError::Request(e) => {
                    IdpError::Unavailable(self.config.issuer.clone(), error_chain(&e))
                }
                UserInfoError::Response(status, _, _)
                    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
                {
                    IdpError::InvalidGrant(format!("userinfo answered {status}"))
                }
                UserInfoError::Response(status, _, _) if status.is_server_error() => {
                    IdpError::Unavailable(
                        self.config.issuer.clone(),
                        format!("userinfo answered {status}"),
                    )
                }
                UserInfoError::ClaimsVerification(e) => {
                    IdpError::OtherPerson(format!("userinfo: {}", error_chain(&e)))
                }
                other => IdpError::Other(format!("userinfo: {}", error_chain(&other))),
            })?;
        Ok(())
    }

    /// Revokes a refresh token where the IdP offers revocation (RFC 7009). Returns whether it
    /// did.
    pub async fn revoke(&self, refresh_token: &str) -> Result<bool, IdpError> {
        let discovered = self.discovered().await?;
        let Some(url) = discovered.revocation.clone() else {
            return Ok(false);
        };
        let client = discovered.client.clone().set_revocation_url(url);
        client
            .revoke_token(CoreRevocableToken::from(RefreshToken::new(
                refresh_token.to_owned(),
            )))
            .map_err(|e| IdpError::Discovery(e.to_string()))?
            .request_async(&self.http())
            .await
            .map_err(|e| match e {
                RequestTokenError::Request(e) => {
                    IdpError::Unavailable(self.config.issuer.clone(), error_chain(&e))
                }
                other => IdpError::Other(error_chain(&other)),
            })?;
        Ok(true)
    }
}

impl DeviceAuthorization {
    /// Where the person goes.
    pub fn verification_uri(&self) -> &str {
        self.response.verification_uri().as_str()
    }

    /// The same page with the code filled in, when offered.
    pub fn verification_uri_complete(&self) -> Option<&str> {
        self.response
            .verification_uri_complete()
            .map(|uri| uri.secret().as_str())
    }

    /// The code the person types.
    pub fn user_code(&self) -> &str {
        self.response.user_code().secret()
    }

    /// How long the code is valid, capped at [`MAX_DEVICE_CODE_LIFETIME`].
    pub fn expires_in(&self) -> Duration {
        self.response.expires_in().min(MAX_DEVICE_CODE_LIFETIME)
    }
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("verification_uri", &self.verification_uri())
            .field("expires_in", &self.expires_in())
            .finish_non_exhaustive()
    }
}

impl From<&CoreTokenResponse> for Tokens {
    fn from(response: &CoreTokenResponse) -> Self {
        Self {
            id_token: response.id_token().map(ToString::to_string),
            refresh_token: response.refresh_token().map(|t| t.secret().clone()),
            access_token: response.access_token().clone(),
        }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("id_token", &self.id_token.as_ref().map(|_| "<redacted>"))
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// Sends `request` with `client` and reads an answer of at most [`MAX_BODY`] bytes.
async fn call(client: reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request)?;
    let response = client.execute(request).await?;
    let mut builder = openidconnect::http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = read_limited(response, MAX_BODY)
        .await
        .map_err(HttpError::Answer)?;
    builder
        .body(body)
        .map_err(|e| HttpError::Answer(e.to_string()))
}

/// Reads a response body of at most `limit` bytes.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn read_secret(path: &Path) -> Result<String, String> {
    if postern_certs::store::readable_by_others(path).unwrap_or(false) {
        tracing::warn!(path = %path.display(), "the client secret file is readable by other users; run `chmod 600` on it");
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the client secret `{}`: {e}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() || secret.len() > MAX_BODY {
        return Err(format!(
            "the client secret file `{}` is empty or too large",
            path.display()
        ));
    }
    Ok(secret.to_owned())
}

fn token_error<RE: std::error::Error + 'static>(
    issuer: &str,
    error: RequestTokenError<
        RE,
        openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    >,
) -> IdpError {
    match error {
        RequestTokenError::ServerResponse(response) => {
            basic_error(response.error(), response.error_description())
        }
        RequestTokenError::Request(e) => IdpError::Unavailable(issuer.to_owned(), error_chain(&e)),
        other => IdpError::Other(error_chain(&other)),
    }
}

fn basic_error(
    error: &openidconnect::core::CoreErrorResponseType,
    description: Option<&String>,
) -> IdpError {
    use openidconnect::core::CoreErrorResponseType as E;
    let text = describe(error.as_ref(), description);
    match error {
        E::InvalidGrant => IdpError::InvalidGrant(text),
        E::InvalidClient | E::UnauthorizedClient | E::UnsupportedGrantType | E::InvalidScope => {
            IdpError::Client(text)
        }
        _ => IdpError::Other(text),
    }
}

/// `error` and the IdP's description, cut short and made printable.
fn describe(error: &str, description: Option<&String>) -> String {
    let text = match description {
        Some(d) => format!("{error}: {d}"),
        None => error.to_owned(),
    };
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
