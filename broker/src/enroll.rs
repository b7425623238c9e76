//! Enrollment (`postern-enroll/1`): the one protocol a client without a certificate may speak.
//!
//! On a connection verified only on the broker's side, the agent asks who the broker is
//! (`Hello`), logs a person in (`Login`: the broker runs the device authorization grant at the
//! IdP, verifies the ID token, asks Cedar `enroll`, signs the agent's CSR), renews (`Renew`:
//! the sealed refresh token and a proof of the old key; Cedar `renew`), or logs out. Streams are
//! served one at a time per connection, requests are size-capped before parsing, and pending
//! logins are limited per source address and in total. Every attempt is audited.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use postern_certs::{
    AuthContext, ClientCa, Identity, Issuance, LoginFlow, PublicKey, RandomId, UserId,
};
use postern_policy::{Action, Authentication, Decision, LoginFacts, Principal};
use postern_proto::{
    DeviceCode, FailCode, Failure, Issued, MAX_SEALED_LEN, PROOF_EXPORTER_LABEL,
    PROOF_EXPORTER_LEN, ProofOf, Reply, Request, ResetCode, Revocation, Welcome, proof_message,
};
use postern_transport::{read_frame, reset_code, write_frame};
use quinn::{Connection, RecvStream, SendStream};
use tracing::{debug, info, warn};

use crate::audit::{Event, Login};
use crate::config::Config;
use crate::id_token::{Claims, Expected, TokenError};
use crate::oidc::{Idp, IdpError};
use crate::seal::{SealKey, SealKeys, SealedLogin};
use crate::serve::{Shared, StartError};

/// Time an agent has to send its request on a new enrollment stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one enrollment connection may open before the broker closes it.
const MAX_STREAMS_PER_CONNECTION: usize = 8;

/// Time an enrollment connection may sit without a stream.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A certificate must have at least this much life left to be worth issuing.
const MIN_LIFETIME: Duration = Duration::from_secs(10);

/// Knowledge, possession and inherence factors as IdPs write them in `amr` (RFC 8176 plus
/// common variants). Only used to word a refusal; policy decides.
const KNOWLEDGE: &[&str] = &["pwd", "password", "pin", "kba"];
const POSSESSION: &[&str] = &["otp", "hwk", "swk", "sms", "tel", "sc"];
const INHERENCE: &[&str] = &["fpt", "face", "iris", "retina", "vbm"];

/// What enrollment needs beyond the shared broker state: the IdP, the seal key, the signing
/// CA, and the count of pending logins.
#[derive(Debug)]
pub struct Enrollment {
    idp: Option<Idp>,
    seal: Option<SealKeys>,
    ca: ClientCa,
    pending_total: AtomicUsize,
    pending_by_source: Mutex<HashMap<IpAddr, usize>>,
    connections: AtomicUsize,
    connections_by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// The result of one enrollment operation, before it is audited and answered.
struct Outcome {
    operation: &'static str,
    reply: Result<Reply, Failure>,
    /// Why it failed, in full, for the audit trail.
    detail: Option<String>,
    identity: Option<Identity>,
    /// The device id, once assigned.
    device: Option<RandomId>,
    decision: Option<Decision>,
    certificate: Option<(String, SystemTime)>,
    session_ends: Option<SystemTime>,
    revoked: Option<bool>,
}

/// Enrollment connections open at once, in total and from one source (an IPv4 address or an
/// IPv6 /64); more are closed at once. Each is cheap (its streams are served one at a time), and
/// logins waiting at the IdP are limited on their own.
const MAX_CONNECTIONS: usize = 4096;
const MAX_CONNECTIONS_PER_SOURCE: usize = 16;

/// Time a new enrollment connection has to open its first stream.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts an open enrollment connection for as long as it lives.
struct ConnectionCount<'a> {
    enrollment: &'a Enrollment,
    source: IpAddr,
}

impl Drop for ConnectionCount<'_> {
    fn drop(&mut self) {
        self.enrollment.connections.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut by_source) = self.enrollment.connections_by_source.lock()
            && let Some(count) = by_source.get_mut(&self.source)
        {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A pending login, counted for as long as it lives.
struct PendingSlot<'a> {
    enrollment: &'a Enrollment,
    source: IpAddr,
}

impl Enrollment {
    /// Loads the IdP settings, the seal key and the signing CA.
    pub(crate) fn from_config(config: &Config, ca: ClientCa) -> Result<Self, StartError> {
        let bad = |path: &std::path::Path, message: String| StartError::BadPki {
            path: path.to_owned(),
            message,
        };
        let (idp, seal) = match &config.oidc {
            None => (None, None),
            Some(oidc) => {
                let idp = Idp::new(oidc).map_err(|message| bad(&config.path, message))?;
                let load = |path: &std::path::Path| {
                    if postern_certs::store::readable_by_others(path).unwrap_or(false) {
                        warn!(path = %path.display(), "the seal key is readable by other users; run `chmod 600` on it");
                    }
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        bad(
                            path,
                            format!(
                                "cannot read the key that seals refresh tokens ({e}); `postern-broker init` writes one, or make one with \
                                 `(printf postern-seal-key-v1:; head -c 32 /dev/urandom | base64) > FILE && chmod 600 FILE`"
                            ),
                        )
                    })?;
                    SealKey::from_file_text(&text).map_err(|e| bad(path, e.to_string()))
                };
                let current = load(&config.login.seal_key)?;
                let retired = config
                    .login
                    .retired_seal_keys
                    .iter()
                    .map(|path| load(path))
                    .collect::<Result<Vec<_>, _>>()?;
                (Some(idp), Some(SealKeys::new(current, retired)))
            }
        };
        Ok(Self {
            idp,
            seal,
            ca,
            pending_total: AtomicUsize::new(0),
            pending_by_source: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            connections_by_source: Mutex::new(HashMap::new()),
        })
    }

    /// The IdP and the seal key, or why logins cannot work here.
    fn configured(&self) -> Result<(&Idp, &SealKeys), Failure> {
        match (&self.idp, &self.seal) {
            (Some(idp), Some(seal)) => Ok((idp, seal)),
            _ => Err(Failure::new(
                FailCode::NotConfigured,
                "this broker has no identity provider configured; ask your admin for an identity bundle (`postern login --bundle FILE`)",
            )),
        }
    }

    /// The IdP's issuer, when login is set up.
    pub(crate) fn issuer(&self) -> Option<&str> {
        self.idp.as_ref().map(Idp::issuer)
    }

    /// Counts a new enrollment connection from `source`, or `None` above the limits.
    fn admit(&self, source: IpAddr) -> Option<ConnectionCount<'_>> {
        let source = source_key(source);
        let mut by_source = self.connections_by_source.lock().ok()?;
        if self.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS
            || by_source.get(&source).copied().unwrap_or(0) >= MAX_CONNECTIONS_PER_SOURCE
        {
            return None;
        }
        *by_source.entry(source).or_insert(0) += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionCount {
            enrollment: self,
            source,
        })
    }

    fn reserve(&self, source: IpAddr, config: &Config) -> Option<PendingSlot<'_>> {
        let source = source_key(source);
        let mut by_source = self.pending_by_source.lock().ok()?;
        if self.pending_total.load(Ordering::Relaxed) >= config.login.max_pending
            || by_source.get(&source).copied().unwrap_or(0) >= config.login.max_pending_per_source
        {
            return None;
        }
        *by_source.entry(source).or_insert(0) += 1;
        self.pending_total.fetch_add(1, Ordering::Relaxed);
        Some(PendingSlot {
            enrollment: self,
            source,
        })
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.enrollment
            .pending_total
            .fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut by_source) = self.enrollment.pending_by_source.lock()
            && let Some(count) = by_source.get_mut(&self.source)
        {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// Where a login comes from, for the per-source limit: the IPv4 address, or the IPv6 /64 (one
/// host usually holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Serves an enrollment connection: its streams one after the other.
pub(crate) async fn serve_connection(
    connection: Connection,
    source: SocketAddr,
    shared: Arc<Shared>,
) {
    debug!(client.addr = %source, "enrollment connection");
    let Some(_counted) = shared.enrollment.admit(source.ip()) else {
        debug!(client.addr = %source, "too many enrollment connections; closing");
        connection.close(0u32.into(), b"busy: try again later");
        return;
    };
    for served in 0..MAX_STREAMS_PER_CONNECTION {
        // A client that connects and asks nothing holds a connection only briefly.
        let idle = if served == 0 {
            FIRST_REQUEST_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            () = tokio::time::sleep(idle) => break,
            () = shared.shutdown.cancelled() => break,
        };
        let Ok((send, recv)) = accepted else {
            return;
        };
        stream(&connection, source, &shared, send, recv).await;
    }
    // Let the agent read the last answer and close; then close anyway.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    connection.close(0u32.into(), b"enrollment done");
}

async fn stream(
    connection: &Connection,
    source: SocketAddr,
    shared: &Shared,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<Request>(&mut recv))
        .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(err)) => {
            debug!(client.addr = %source, error = %err, "malformed enrollment request");
            let failure = Failure::new(FailCode::BadRequest, &format!("malformed request: {err}"));
            let _ = write_frame(&mut send, &Reply::Failed(failure)).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let _ = send.reset(reset_code(ResetCode::ProtocolViolation));
            return;
        }
    };
    // Nothing more is read from the agent on this stream.
    let _ = recv.stop(0u32.into());
    let enrollment = &shared.enrollment;
    let outcome = match request {
        Request::Hello => {
            let welcome = Welcome {
                broker: shared.config.hostname.clone(),
                idp: enrollment.issuer().unwrap_or_default().to_owned(),
                services: shared
                    .config
                    .services
                    .iter()
                    .map(|(name, service)| (name.clone(), service.local_port, service.kind()))
                    .collect(),
            };
            let _ = write_frame(&mut send, &Reply::Welcome(welcome)).await;
            let _ = send.finish();
            return;
        }
        Request::Login { csr } => login(connection, source, shared, &mut send, &csr).await,
        Request::Renew { csr, sealed, proof } => {
            renew(connection, source, shared, &csr, &sealed, &proof).await
        }
        Request::Logout { sealed, proof } => logout(connection, shared, &sealed, &proof).await,
    };
    finish(outcome, source, shared, &mut send).await;
}

/// Audits an outcome, then answers the agent: a certificate reaches the agent only once its
/// issuance is on record.
async fn finish(mut outcome: Outcome, source: SocketAddr, shared: &Shared, send: &mut SendStream) {
    let (code, reason) = match &outcome.reply {
        Ok(_) => (None, None),
        Err(failure) => (
            Some(failure.code().as_str()),
            Some(
                outcome
                    .detail
                    .clone()
                    .unwrap_or_else(|| failure.reason().to_owned()),
            ),
        ),
    };
    let empty = Vec::new();
    let event = Event::Login(Login {
        operation: outcome.operation,
        allowed: outcome.reply.is_ok(),
        source,
        flow: LoginFlow::DeviceCode.as_str(),
        identity: outcome.identity.as_ref(),
        device: outcome
            .identity
            .as_ref()
            .map(|i| i.auth.device)
            .or(outcome.device),
        code,
        reason,
        policies: outcome.decision.as_ref().map_or(&empty, |d| &d.policies),
        policy_errors: outcome.decision.as_ref().map_or(&empty, |d| &d.errors),
        certificate: outcome.certificate.clone(),
        session_ends: outcome.session_ends,
        revoked: outcome.revoked,
    });
    if let Err(err) = shared.audit.record(&event).await {
        warn!(error = %err, "cannot record the enrollment in the audit trail; refusing it");
        outcome.reply = Err(Failure::new(
            FailCode::Internal,
            "the broker cannot write its audit trail; try again later",
        ));
    }
    let user = outcome
        .identity
        .as_ref()
        .map(|i| i.user.to_string())
        .unwrap_or_default();
    let reply = match outcome.reply {
        Ok(reply) => {
            info!(client.addr = %source, user.id = %user, operation = outcome.operation, "enrollment allowed");
            reply
        }
        Err(failure) => {
            info!(client.addr = %source, user.id = %user, operation = outcome.operation, reason = %failure, "enrollment refused");
            Reply::Failed(failure)
        }
    };
    let _ = write_frame(send, &reply).await;
    let _ = send.finish();
}

impl Outcome {
    fn new(operation: &'static str) -> Self {
        Self {
            operation,
            reply: Err(Failure::new(FailCode::Internal, "not finished")),
            detail: None,
            identity: None,
            device: None,
            decision: None,
            certificate: None,
            session_ends: None,
            revoked: None,
        }
    }

    fn failed(mut self, failure: Failure) -> Self {
        self.reply = Err(failure);
        self
    }

    fn fail(mut self, code: FailCode, reason: &str) -> Self {
        self.reply = Err(Failure::new(code, reason));
        self
    }

    fn fail_detailed(mut self, code: FailCode, reason: &str, detail: String) -> Self {
        self.detail = Some(detail);
        self.fail(code, reason)
    }
}

async fn login(
    connection: &Connection,
    source: SocketAddr,
    shared: &Shared,
    send: &mut SendStream,
    csr: &[u8],
) -> Outcome {
    let mut outcome = Outcome::new("enroll");
    // The device id is assigned first, so that every attempt, refused or not, is recorded with
    // the id the device would have had.
    let (Ok(lineage), Ok(device_id)) = (RandomId::generate(), RandomId::generate()) else {
        return outcome.fail(FailCode::Internal, "the broker has no randomness");
    };
    outcome.device = Some(device_id);
    let enrollment = &shared.enrollment;
    let (idp, seal) = match enrollment.configured() {
        Ok(configured) => configured,
        Err(failure) => return outcome.failed(failure),
    };
    let key = match signing_request(csr) {
        Ok(key) => key,
        Err(failure) => return outcome.failed(failure),
    };
    let Some(_slot) = enrollment.reserve(source.ip(), &shared.config) else {
        return outcome.fail(
            FailCode::Busy,
            "too many logins are waiting for approval; finish or cancel the others, or try again in a few minutes",
        );
    };
    let device = match idp.start_device().await {
        Ok(device) => device,
        Err(err) => return idp_failure(outcome, &err),
    };
    let code = DeviceCode {
        verification_uri: device.verification_uri().to_owned(),
        verification_uri_complete: device.verification_uri_complete().map(str::to_owned),
        user_code: device.user_code().to_owned(),
        expires_in: u32::try_from(device.expires_in().as_secs()).unwrap_or(u32::MAX),
    };
    if write_frame(send, &Reply::Device(code)).await.is_err() {
        return outcome.fail(
            FailCode::Internal,
            "the agent left before the code was shown",
        );
    }

    let (polled, mut polls) = tokio::sync::mpsc::unbounded_channel();
    let finish = idp.finish_device(&device, move || {
        let _ = polled.send(());
    });
    tokio::pin!(finish);
    let tokens = loop {
        tokio::select! {
            result = &mut finish => break result,
            Some(()) = polls.recv() => {
                if write_frame(send, &Reply::Pending).await.is_err() {
                    return outcome.fail(FailCode::Cancelled, "the agent cancelled the login");
                }
            }
            _ = connection.closed() => {
                return outcome.fail(FailCode::Cancelled, "the agent cancelled the login");
            }
            () = shared.shutdown.cancelled() => {
                return outcome.fail(FailCode::ShuttingDown, "the broker is restarting; run `postern login` again in a moment");
            }
        }
    };
    let tokens = match tokens {
        Ok(tokens) => tokens,
        Err(err) => return idp_failure(outcome, &err),
    };
    let Some(id_token) = tokens.id_token.as_deref() else {
        return outcome.fail(
            FailCode::IdpError,
            "the identity provider returned no ID token; the admin must let the broker's client use the `openid` scope",
        );
    };
    let now = SystemTime::now();
    let claims = match verify_id_token(idp, id_token, now).await {
        Ok(claims) => claims,
        Err(err) => return refused(outcome, err),
    };
    if !claims.auth_time_reported {
        debug!("the ID token has no auth_time; using iat");
    }
    // The IdP's clock may run up to a minute ahead; no login happened after the broker's now.
    let auth_time = claims.auth_time.min(now);
    let session_ends = whole_seconds(auth_time) + shared.config.login.max_session_age;
    let contents = SealedLogin {
        refresh_token: tokens.refresh_token.clone().unwrap_or_default(),
        issuer: claims.issuer.clone(),
        subject: claims.subject.clone(),
        email: claims.email.clone(),
        email_verified: claims.email_verified,
        name: claims.name.clone(),
        groups: claims.groups.clone(),
        amr: claims.amr.clone(),
        acr: claims.acr.clone(),
        auth_time: unix_seconds(auth_time),
        auth_time_reported: claims.auth_time_reported,
        session_ends: unix_seconds(session_ends),
        lineage: lineage.to_string(),
        device: device_id.to_string(),
        device_key: STANDARD.encode(key.spki_der()),
    };
    let sealable = tokens.refresh_token.is_some();
    certify(
        outcome,
        LoginAction::Enroll,
        source,
        shared,
        seal,
        contents,
        sealable,
        &key,
        now,
    )
}

async fn renew(
    connection: &Connection,
    source: SocketAddr,
    shared: &Shared,
    csr: &[u8],
    sealed: &[u8],
    proof: &[u8],
) -> Outcome {
    let mut outcome = Outcome::new("renew");
    let (idp, seal) = match shared.enrollment.configured() {
        Ok(configured) => configured,
        Err(failure) => return outcome.failed(failure),
    };
    let mut contents = match open_and_prove(connection, seal, sealed, ProofOf::Renew, csr, proof) {
        Ok(contents) => contents,
        Err((code, reason)) => return outcome.fail(code, &reason),
    };
    outcome.identity = identity_of(&contents).ok();
    let key = match signing_request(csr) {
        Ok(key) => key,
        Err(failure) => return outcome.failed(failure),
    };
    if contents.issuer != idp.issuer() {
        return outcome.fail(
            FailCode::LoginRequired,
            &format!(
                "this login is from another identity provider ({}); run `postern login`",
                contents.issuer
            ),
        );
    }
    let now = SystemTime::now();
    // A lower maximum session age applies to logins made before it was lowered.
    let session_ends = unix(contents.session_ends)
        .min(unix(contents.auth_time) + shared.config.login.max_session_age);
    contents.session_ends = unix_seconds(session_ends);
    if session_ends <= now + MIN_LIFETIME {
        return outcome.fail(
            FailCode::LoginRequired,
            &format!(
                "your login from {} has reached the maximum session age; run `postern login` to log in again",
                postern_certs::rfc3339(unix(contents.auth_time))
            ),
        );
    }
    if contents.refresh_token.is_empty() {
        return outcome.fail(
            FailCode::LoginRequired,
            "the identity provider gave no refresh token for this login; run `postern login`",
        );
    }
    // Policy first, on what the login already says: a refused renewal must not spend (and, with
    // rotating refresh tokens, lose) the refresh token. Policy is asked again on the IdP's answer.
    if let Some(identity) = &outcome.identity {
        if let Some(reason) = revoked(shared, identity, &contents) {
            return outcome.fail(FailCode::LoginRequired, &reason);
        }
        let decision = decide(LoginAction::Renew, source, shared, identity, &contents, now);
        if !decision.is_allowed() {
            let reason = refusal_reason(&identity.auth.amr);
            outcome.decision = Some(decision);
            return outcome.fail(FailCode::NotPermitted, &reason);
        }
    }
    let tokens = match idp.refresh(&contents.refresh_token).await {
        Ok(tokens) => tokens,
        Err(err) => return idp_failure(outcome, &err),
    };
    match tokens.id_token.as_deref() {
        Some(id_token) => {
            let claims = match verify_id_token(idp, id_token, now).await {
                Ok(claims) => claims,
                Err(err) => return refused(outcome, err),
            };
            if claims.subject != contents.subject || claims.issuer != contents.issuer {
                return outcome.fail_detailed(
                    FailCode::NotPermitted,
                    "the identity provider answered for another person; run `postern login`",
                    format!("refresh returned subject `{}`", claims.subject),
                );
            }
            // Attributes follow the IdP; how and when the person authenticated does not.
            contents.email = claims.email;
            contents.email_verified = claims.email_verified;
            contents.name = claims.name;
            contents.groups = claims.groups;
        }
        None => {
            if let Err(err) = idp.userinfo(&tokens, &contents.subject).await {
                return idp_failure(outcome, &err);
            }
        }
    }
    if let Some(rotated) = tokens.refresh_token.clone() {
        contents.refresh_token = rotated;
    }
    contents.device_key = STANDARD.encode(key.spki_der());
    certify(
        outcome,
        LoginAction::Renew,
        source,
        shared,
        seal,
        contents,
        true,
        &key,
        now,
    )
}

async fn logout(connection: &Connection, shared: &Shared, sealed: &[u8], proof: &[u8]) -> Outcome {
    let mut outcome = Outcome::new("logout");
    let (idp, seal) = match shared.enrollment.configured() {
        Ok(configured) => configured,
        Err(failure) => return outcome.failed(failure),
    };
    let contents = match open_and_prove(connection, seal, sealed, ProofOf::Logout, &[], proof) {
        Ok(contents) => contents,
        Err((code, reason)) => return outcome.fail(code, &reason),
    };
    outcome.identity = identity_of(&contents).ok();
    let revocation = if contents.issuer != idp.issuer() {
        outcome.detail = Some(format!(
            "the login is from another identity provider ({}); nothing was revoked",
            contents.issuer
        ));
        Revocation::Failed
    } else if contents.refresh_token.is_empty() {
        Revocation::Unsupported
    } else {
        match idp.revoke(&contents.refresh_token).await {
            Ok(true) => Revocation::Revoked,
            Ok(false) => Revocation::Unsupported,
            Err(err) => {
                warn!(error = %err, "cannot revoke the refresh token at the identity provider");
                outcome.detail = Some(format!("revocation failed: {err}"));
                Revocation::Failed
            }
        }
    };
    outcome.revoked = Some(revocation == Revocation::Revoked);
    outcome.reply = Ok(Reply::LoggedOut(revocation));
    outcome
}

/// The key of a signing request: P-256 or Ed25519, signed by itself.
fn signing_request(csr: &[u8]) -> Result<PublicKey, Failure> {
    PublicKey::from_csr_der(csr).map_err(|err| {
        Failure::new(
            FailCode::BadRequest,
            &format!("the signing request is unusable: {err}"),
        )
    })
}

/// Opens a sealed token and checks the agent's proof that it holds the key it was sealed for,
/// signed over this connection's exported keying material.
fn open_and_prove(
    connection: &Connection,
    seal: &SealKeys,
    sealed: &[u8],
    operation: ProofOf,
    csr: &[u8],
    proof: &[u8],
) -> Result<SealedLogin, (FailCode, String)> {
    let contents = seal.open(sealed).map_err(|err| {
        (
            FailCode::LoginRequired,
            format!("the saved login cannot be used with this broker ({err}); run `postern login`"),
        )
    })?;
    let key = STANDARD
        .decode(&contents.device_key)
        .ok()
        .and_then(|der| PublicKey::from_spki_der(&der).ok())
        .ok_or((
            FailCode::Internal,
            "the saved login names no usable key".to_owned(),
        ))?;
    let mut exported = [0u8; PROOF_EXPORTER_LEN];
    connection
        .export_keying_material(&mut exported, PROOF_EXPORTER_LABEL, b"")
        .map_err(|_| {
            (
                FailCode::Internal,
                "cannot export keying material".to_owned(),
            )
        })?;
    key.verify(&proof_message(operation, &exported, csr, sealed), proof)
        .map_err(|_| {
            (
                FailCode::NotPermitted,
                "the request is not signed by the key of the login it renews; run `postern login`"
                    .to_owned(),
            )
        })?;
    Ok(contents)
}

/// Asks Cedar, signs the key, seals the refresh token: the end of a login or a renewal.
#[expect(clippy::too_many_arguments, reason = "the steps share every argument")]
fn certify(
    mut outcome: Outcome,
    action: LoginAction,
    source: SocketAddr,
    shared: &Shared,
    seal: &SealKeys,
    contents: SealedLogin,
    sealable: bool,
    key: &PublicKey,
    now: SystemTime,
) -> Outcome {
    let identity = match identity_of(&contents) {
        Ok(identity) => identity,
        Err(err) => {
            return outcome.fail_detailed(
                FailCode::IdpError,
                "the identity provider's token cannot be carried in a certificate",
                err,
            );
        }
    };
    outcome.identity = Some(identity.clone());
    let session_ends = unix(contents.session_ends);
    outcome.session_ends = Some(session_ends);
    if let Some(reason) = revoked(shared, &identity, &contents) {
        let reason = match action {
            LoginAction::Enroll => format!(
                "{reason}; the identity provider reused a login from before the revocation: sign out there, then run `postern login` again"
            ),
            LoginAction::Renew => reason,
        };
        return outcome.fail(FailCode::LoginRequired, &reason);
    }
    let decision = decide(action, source, shared, &identity, &contents, now);
    let allowed = decision.is_allowed();
    outcome.decision = Some(decision);
    if !allowed {
        let reason = refusal_reason(&identity.auth.amr);
        return outcome.fail(FailCode::NotPermitted, &reason);
    }
    let not_after = (now + shared.config.login.certificate_ttl).min(session_ends);
    let Some(lifetime) = not_after
        .duration_since(now)
        .ok()
        .filter(|l| *l >= MIN_LIFETIME)
    else {
        return outcome.fail(
            FailCode::LoginRequired,
            &format!(
                "the identity provider reused a login from {}, older than this broker's maximum session age; \
                 sign out at the identity provider, then run `postern login` again",
                postern_certs::rfc3339(identity.auth.auth_time)
            ),
        );
    };
    let sealed = if sealable {
        match seal.seal(&contents) {
            Ok(sealed) if sealed.len() <= MAX_SEALED_LEN => Some(sealed),
            Ok(sealed) => {
                return outcome.fail_detailed(
                    FailCode::IdpError,
                    "the identity provider's refresh token is too large to hand to this device; ask your admin",
                    format!(
                        "the sealed login is {} bytes, more than the {MAX_SEALED_LEN} the protocol carries",
                        sealed.len()
                    ),
                );
            }
            Err(err) => {
                return outcome.fail_detailed(
                    FailCode::Internal,
                    "the broker could not seal the login",
                    err.to_string(),
                );
            }
        }
    } else {
        None
    };
    // Nothing is left out to make it fit: policy that forbids by group must see every group.
    let certificate = match shared.enrollment.ca.issue(&identity, key, now, lifetime) {
        Ok(certificate) => certificate,
        Err(postern_certs::IssueError::Identity(err)) => {
            return outcome.fail_detailed(
                FailCode::IdpError,
                "your identity (groups, name) at the identity provider is too large for a certificate; ask your admin \
                 to send only the groups policy uses",
                err.to_string(),
            );
        }
        Err(err) => {
            return outcome.fail_detailed(
                FailCode::Internal,
                "the broker could not sign the certificate",
                err.to_string(),
            );
        }
    };
    if let Ok(inspected) = postern_certs::inspect_unverified(&certificate) {
        outcome.certificate = Some((inspected.serial, inspected.not_after));
    }
    outcome.reply = Ok(Reply::Issued(Issued {
        chain: vec![certificate.to_vec()],
        sealed,
        session_ends: contents.session_ends,
    }));
    outcome
}

/// Which login decision is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginAction {
    Enroll,
    Renew,
}

/// Asks Cedar `enroll` or `renew` about `identity`, the login `login` describes.
fn decide(
    action: LoginAction,
    source: SocketAddr,
    shared: &Shared,
    identity: &Identity,
    login: &SealedLogin,
    now: SystemTime,
) -> Decision {
    let principal = Principal::from_identity(identity);
    let authentication = Authentication::from_identity(identity);
    let device = identity.auth.device.to_string();
    let facts = LoginFacts {
        email_verified: login.email_verified,
        auth_time_reported: login.auth_time_reported,
    };
    let broker = shared.config.hostname.as_str();
    let snapshot = shared.authority.current();
    snapshot.policies.authorize(&postern_policy::Request {
        principal: &principal,
        authentication: &authentication,
        device: &device,
        source: source.ip(),
        now: &shared.authority.zoned(now),
        action: match action {
            LoginAction::Enroll => Action::Enroll {
                broker,
                login: facts,
            },
            LoginAction::Renew => Action::Renew {
                broker,
                login: facts,
            },
        },
    })
}

/// Why `identity`'s login is revoked, if it is: a login from before the user's watermark, or a
/// revoked lineage or device. For a revoked user, a login whose time the IdP did not report is
/// refused too: it could be a single sign-on session from before the revocation.
fn revoked(shared: &Shared, identity: &Identity, login: &SealedLogin) -> Option<String> {
    let user = identity.user.uri();
    let snapshot = shared.authority.current();
    if let Some(entry) = snapshot.revocations.user(&user)
        && !login.auth_time_reported
    {
        return Some(format!(
            "this user's access was revoked at {}, and the identity provider does not say when this login happened, so it may be a session from before; ask your administrator to end the session at the identity provider and lift the revocation (`postern-broker unrevoke`)",
            postern_certs::rfc3339(entry.at)
        ));
    }
    snapshot.revocations.check(&crate::revoke::Subject {
        user: &user,
        auth_time: identity.auth.auth_time,
        issued: identity.auth.auth_time,
        lineage: Some(&identity.auth.lineage),
        device: &identity.auth.device,
    })
}

/// The identity a sealed login stands for.
fn identity_of(contents: &SealedLogin) -> Result<Identity, String> {
    let user = UserId::new(&contents.issuer, &contents.subject).map_err(|e| e.to_string())?;
    let id = |text: &str| text.parse::<RandomId>().map_err(|e| e.to_string());
    Ok(Identity {
        user,
        email: contents.email.clone().filter(|_| contents.email_verified),
        name: contents.name.clone(),
        groups: contents.groups.clone(),
        auth: AuthContext {
            issuance: Issuance::Login(LoginFlow::DeviceCode),
            amr: contents.amr.clone(),
            acr: contents.acr.clone(),
            auth_time: unix(contents.auth_time),
            lineage: id(&contents.lineage)?,
            device: id(&contents.device)?,
        },
    })
}

/// Verifies an ID token for this broker.
async fn verify_id_token(idp: &Idp, token: &str, now: SystemTime) -> Result<Claims, Refused> {
    let discovered = idp.discovered().await.map_err(Refused::Idp)?;
    let expected = Expected {
        issuer: idp.issuer(),
        client_id: idp.client_id(),
    };
    discovered
        .keys
        .verify(token, &expected, now)
        .await
        .map_err(Refused::Token)
}

/// Why an ID token was not accepted.
enum Refused {
    Idp(IdpError),
    Token(TokenError),
}

fn refused(outcome: Outcome, refused: Refused) -> Outcome {
    match refused {
        Refused::Idp(err) => idp_failure(outcome, &err),
        Refused::Token(TokenError::Unusable(claim, why)) => outcome.fail_detailed(
            FailCode::IdpError,
            &format!(
                "the identity provider's `{claim}` for you cannot be used ({why}); ask your admin"
            ),
            format!("ID token refused: `{claim}`: {why}"),
        ),
        Refused::Token(err) => {
            warn!(error = %err, "ID token refused");
            outcome.fail_detailed(
                FailCode::IdpError,
                "the identity provider's answer did not pass the broker's checks; ask your admin to look at the broker's audit trail",
                format!("ID token refused: {err}"),
            )
        }
    }
}

/// Turns an IdP error into a sentence a person can act on.
fn idp_failure(outcome: Outcome, err: &IdpError) -> Outcome {
    let detail = err.to_string();
    match err {
        IdpError::AccessDenied => outcome.fail_detailed(
            FailCode::AccessDenied,
            "the login was refused at the identity provider (\"deny\" or \"abort\" was chosen); run `postern login` to try again",
            detail,
        ),
        IdpError::Expired => outcome.fail_detailed(
            FailCode::Expired,
            "the code was not approved in time; run `postern login` again and approve the new code",
            detail,
        ),
        IdpError::Unavailable(..) => outcome.fail_detailed(
            FailCode::IdpUnavailable,
            "the broker cannot reach the identity provider right now; try again in a few minutes, and tell your admin if it persists",
            detail,
        ),
        IdpError::InvalidGrant(_) => outcome.fail_detailed(
            FailCode::LoginRequired,
            "the identity provider no longer accepts this login (it ended or was revoked there); run `postern login`",
            detail,
        ),
        IdpError::OtherPerson(_) => outcome.fail_detailed(
            FailCode::NotPermitted,
            "the identity provider answered for another person; run `postern login`",
            detail,
        ),
        IdpError::Client(_) | IdpError::Discovery(_) => outcome.fail_detailed(
            FailCode::IdpError,
            "the identity provider refused the broker's request; this is a setup problem for your admin (see the broker's audit trail)",
            detail,
        ),
        IdpError::Other(_) => outcome.fail_detailed(
            FailCode::IdpError,
            "the identity provider answered with an error; try again, and tell your admin if it persists",
            detail,
        ),
    }
}

/// The sentence for a login policy refused: about the second factor when `amr` shows only one
/// kind of factor.
fn refusal_reason(amr: &[String]) -> String {
    let kinds = [KNOWLEDGE, POSSESSION, INHERENCE]
        .iter()
        .filter(|kind| amr.iter().any(|m| kind.contains(&m.as_str())))
        .count();
    if kinds < 2 && !amr.iter().any(|m| m == "mfa") {
        let shown = if amr.is_empty() {
            "no method".to_owned()
        } else {
            amr.join(", ")
        };
        format!(
            "a second factor is required: the identity provider reported only {shown}; log in again and complete the \
             second step (one-time code, security key, …), or ask your admin to enrol a second factor for you"
        )
    } else {
        "this broker's policy does not allow this login; ask your admin (the broker's audit trail names the policy)".to_owned()
    }
}

/// A time from the sealed login. Out of range (which only a forged token could hold) is the
/// epoch: long past, so every check on it fails closed.
fn unix(seconds: u64) -> SystemTime {
    postern_certs::unix_time(seconds).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn whole_seconds(time: SystemTime) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds(time))
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_ipv4_address_or_ipv6_64() {
        let key = |text: &str| source_key(text.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn refusals_name_the_missing_second_factor() {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(refusal_reason(&strings(&["pwd"])).starts_with("a second factor is required"));
        assert!(refusal_reason(&[]).contains("no method"));
        assert!(refusal_reason(&strings(&["pwd", "otp"])).starts_with("this broker's policy"));
        assert!(refusal_reason(&strings(&["mfa"])).starts_with("this broker's policy"));
        assert!(refusal_reason(&strings(&["hwk", "user"])).starts_with("a second factor"));
    }
}
