//! The verifier against locally signed tokens: each way a token can be wrong is refused with
//! its own error.

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;

use super::*;

const RSA_KEY: &[u8] = include_bytes!("../../testdata/id-token-rsa.key");
const RSA_PUBLIC: &[u8] = include_bytes!("../../testdata/id-token-rsa.pub.pem");
const EC_KEY: &[u8] = include_bytes!("../../testdata/id-token-ec.key");
const JWKS: &[u8] = include_bytes!("../../testdata/id-token-jwks.json");

const ISSUER: &str = "https://idp.example.org/realms/acme";
const CLIENT: &str = "postern";

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn keys() -> Vec<Jwk> {
    let keys = parse_jwks(JWKS).unwrap();
    assert_eq!(keys.len(), 2);
    keys
}

fn expected() -> Expected<'static> {
    Expected {
        issuer: ISSUER,
        client_id: CLIENT,
    }
}

fn claims() -> Value {
    let t = 1_800_000_000u64;
    json!({
        "iss": ISSUER, "sub": "248289761001", "aud": CLIENT,
        "iat": t - 10, "exp": t + 300, "auth_time": t - 20,
        "amr": ["pwd", "otp"], "acr": "urn:acme:mfa",
        "email": "alice@example.org", "email_verified": true,
        "name": "Alice", "groups": ["staff", "mail"],
    })
}

fn rs256(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap()
}

fn with(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut claims = claims();
    edit(claims.as_object_mut().unwrap());
    rs256(&claims)
}

fn check(token: &str) -> Result<Claims, TokenError> {
    verify(token, &keys(), &expected(), now())
}

fn unsigned(header: &Value, claims: &Value) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!("{}.{}.", part(header), part(claims))
}

#[test]
fn a_good_token_gives_its_claims() {
    let verified = check(&rs256(&claims())).unwrap();
    assert_eq!(verified.subject, "248289761001");
    assert_eq!(verified.amr, ["pwd", "otp"]);
    assert_eq!(verified.acr.as_deref(), Some("urn:acme:mfa"));
    assert_eq!(verified.groups, ["staff", "mail"]);
    assert!(verified.email_verified && verified.auth_time_reported);
    assert_eq!(
        verified.auth_time,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 - 20)
    );

    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".into());
    let ec = encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
    )
    .unwrap();
    assert!(check(&ec).is_ok(), "ES256 works too");
    // Without kid, the only key fitting the algorithm is used.
    let ec = encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
    )
    .unwrap();
    assert!(check(&ec).is_ok());
}

#[test]
fn auth_time_falls_back_to_iat() {
    let verified = check(&with(|c| {
        c.remove("auth_time");
    }))
    .unwrap();
    assert!(!verified.auth_time_reported);
    assert_eq!(
        verified.auth_time,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 - 10)
    );
}

#[test]
fn alg_none_is_refused() {
    let token = unsigned(&json!({"alg": "none", "typ": "JWT"}), &claims());
    assert_eq!(check(&token), Err(TokenError::Unsigned));
    let token = unsigned(&json!({"alg": "None"}), &claims());
    assert_eq!(check(&token), Err(TokenError::Unsigned));
}

#[test]
fn hs256_with_the_public_key_as_secret_is_refused() {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let token = encode(&header, &claims(), &EncodingKey::from_secret(RSA_PUBLIC)).unwrap();
    assert_eq!(check(&token), Err(TokenError::Algorithm("HS256".into())));
}

#[test]
fn a_wrong_issuer_is_refused_even_when_close() {
    for iss in [
        "https://evil.example.org",
        "https://idp.example.org/realms/acm",
        "https://idp.example.org/realms/acme/",
        "https://IDP.example.org/realms/acme",
        "https://idp.example.org/realms/ACME",
    ] {
        let token = with(|c| {
            c.insert("iss".into(), json!(iss));
        });
        assert_eq!(check(&token), Err(TokenError::Issuer(iss.into())), "{iss}");
    }
}

#[test]
fn the_audience_must_name_the_client() {
    let token = with(|c| {
        c.insert("aud".into(), json!("someone-else"));
    });
    assert_eq!(check(&token), Err(TokenError::Audience));
    let token = with(|c| {
        c.insert("aud".into(), json!(["someone-else", "postern-x"]));
    });
    assert_eq!(check(&token), Err(TokenError::Audience));
    let token = with(|c| {
        c.insert("aud".into(), json!([CLIENT, "api"]));
        c.insert("azp".into(), json!(CLIENT));
    });
    assert!(check(&token).is_ok());
}

#[test]
fn azp_must_be_the_client() {
    let token = with(|c| {
        c.insert("azp".into(), json!("someone-else"));
    });
    assert_eq!(check(&token), Err(TokenError::AuthorizedParty));
    // Several audiences without azp: who was it issued to?
    let token = with(|c| {
        c.insert("aud".into(), json!([CLIENT, "api"]));
    });
    assert_eq!(check(&token), Err(TokenError::AuthorizedParty));
}

#[test]
fn time_claims_are_checked_with_a_small_skew() {
    let t = 1_800_000_000u64;
    let token = with(|c| {
        c.insert("exp".into(), json!(t - 61));
    });
    assert_eq!(check(&token), Err(TokenError::Expired));
    let token = with(|c| {
        c.insert("exp".into(), json!(t - 30));
    });
    assert!(check(&token).is_ok(), "within the skew");
    let token = with(|c| {
        c.insert("nbf".into(), json!(t + 120));
    });
    assert_eq!(check(&token), Err(TokenError::NotYetValid("nbf")));
    let token = with(|c| {
        c.insert("iat".into(), json!(t + 120));
    });
    assert_eq!(check(&token), Err(TokenError::NotYetValid("iat")));
    let token = with(|c| {
        c.remove("exp");
    });
    assert_eq!(check(&token), Err(TokenError::Missing("exp")));
}

#[test]
fn an_unknown_kid_is_refused() {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rotated-away".into());
    let token = encode(
        &header,
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap();
    assert_eq!(
        check(&token),
        Err(TokenError::UnknownKey(Some("rotated-away".into())))
    );
    // The RSA key's kid with an EC algorithm does not select it.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".into());
    let token = encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
    )
    .unwrap();
    assert_eq!(
        check(&token),
        Err(TokenError::UnknownKey(Some("rsa-1".into())))
    );
}

#[test]
fn keys_named_by_the_token_are_never_used() {
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.jku = Some("https://evil.example.org/jwks".into());
    assert_eq!(
        check(&encode(&header, &claims(), &rsa).unwrap()),
        Err(TokenError::KeyInHeader("jku"))
    );
    let mut header = Header::new(Algorithm::RS256);
    header.x5u = Some("https://evil.example.org/cert".into());
    assert_eq!(
        check(&encode(&header, &claims(), &rsa).unwrap()),
        Err(TokenError::KeyInHeader("x5u"))
    );
    let mut header = Header::new(Algorithm::RS256);
    header.x5c = Some(vec!["MIIB".into()]);
    assert_eq!(
        check(&encode(&header, &claims(), &rsa).unwrap()),
        Err(TokenError::KeyInHeader("x5c"))
    );
    let token = unsigned(&json!({"alg": "RS256", "jwk": {"kty": "RSA"}}), &claims());
    assert_eq!(check(&token), Err(TokenError::KeyInHeader("jwk")));
}

#[test]
fn access_tokens_are_refused() {
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    header.typ = Some("at+jwt".into());
    assert_eq!(
        check(&encode(&header, &claims(), &rsa).unwrap()),
        Err(TokenError::WrongType("at+jwt".into()))
    );
    header.typ = Some("application/at+jwt".into());
    assert!(matches!(
        check(&encode(&header, &claims(), &rsa).unwrap()),
        Err(TokenError::WrongType(_))
    ));
    let token = with(|c| {
        c.insert("typ".into(), json!("Bearer"));
    });
    assert_eq!(check(&token), Err(TokenError::WrongType("Bearer".into())));
}

#[test]
fn tampering_breaks_the_signature() {
    let token = rs256(&claims());
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let (header, _) = signed.split_once('.').unwrap();
    let mut evil = claims();
    evil["sub"] = json!("admin");
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
    assert_eq!(
        check(&format!("{header}.{payload}.{signature}")),
        Err(TokenError::BadSignature)
    );
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[10] ^= 1;
    let signature = URL_SAFE_NO_PAD.encode(bytes);
    assert_eq!(
        check(&format!("{signed}.{signature}")),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn a_missing_subject_is_refused() {
    let token = with(|c| {
        c.remove("sub");
    });
    assert_eq!(check(&token), Err(TokenError::Missing("sub")));
    let token = with(|c| {
        c.insert("sub".into(), json!(""));
    });
    assert_eq!(check(&token), Err(TokenError::Missing("sub")));
}

#[test]
fn oversized_and_malformed_tokens_are_refused_before_parsing() {
    let token = with(|c| {
        c.insert("padding".into(), json!("x".repeat(MAX_TOKEN_LEN)));
    });
    assert_eq!(check(&token), Err(TokenError::TooLarge));
    assert!(matches!(check("a.b"), Err(TokenError::Malformed(_))));
    assert!(matches!(check("!!.b.c"), Err(TokenError::Malformed(_))));
    assert!(matches!(check("a.b.c.d"), Err(TokenError::Malformed(_))));
    let token = unsigned(&json!({"alg": "RS256", "crit": ["exp"]}), &claims());
    assert_eq!(check(&token), Err(TokenError::Critical));
}

#[test]
fn unusable_jwks_entries_are_skipped() {
    let keys = parse_jwks(br#"{"keys":[{"kty":"RSA","n":1},"not a key",{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#).unwrap();
    assert!(keys.len() < 3, "a string is no key");
    assert!(
        keys.iter().any(|k| matches!(
            k.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)
        )),
        "the usable key survives its unusable neighbours"
    );
    assert!(parse_jwks(b"[]").is_err());
}

/// A JWKS endpoint on 127.0.0.1 that counts its requests.
async fn jwks_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            // Slow enough that concurrent verifications overlap the fetch.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                JWKS.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(JWKS).await;
        }
    });
    (format!("http://{addr}/jwks"), count)
}

#[tokio::test]
async fn keys_are_fetched_once_for_many_tokens_and_not_again_for_unknown_kids() {
    let (uri, fetches) = jwks_server().await;
    let keys = std::sync::Arc::new(Keys::new(uri, reqwest::Client::new()));
    let token = rs256(&claims());
    let mut checks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (keys, token) = (keys.clone(), token.clone());
        checks.spawn(async move { keys.verify(&token, &expected(), now()).await });
    }
    while let Some(result) = checks.join_next().await {
        assert!(result.unwrap().is_ok());
    }
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A key the issuer does not have: fetched again at most once in the interval, not per token.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("unknown".into());
    let stranger = encode(
        &header,
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
    )
    .unwrap();
    for _ in 0..5 {
        assert_eq!(
            keys.verify(&stranger, &expected(), now()).await,
            Err(TokenError::UnknownKey(Some("unknown".into())))
        );
    }
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn lists_policy_decides_on_are_taken_whole_or_refused() {
    let many: Vec<String> = (0..33).map(|i| format!("group-{i}")).collect();
    let token = with(|c| {
        c.insert("groups".into(), json!(many));
    });
    assert!(matches!(
        check(&token),
        Err(TokenError::Unusable("groups", _))
    ));
    let token = with(|c| {
        c.insert("groups".into(), json!(["staff", "x".repeat(129)]));
    });
    assert!(matches!(
        check(&token),
        Err(TokenError::Unusable("groups", _))
    ));
    let token = with(|c| {
        c.insert("groups".into(), json!(["staff", 7]));
    });
    assert!(matches!(
        check(&token),
        Err(TokenError::Unusable("groups", _))
    ));
    // Entra ID's group overage: the groups are elsewhere, so they are not known here.
    let token = with(|c| {
        c.remove("groups");
        c.insert("_claim_names".into(), json!({"groups": "src1"}));
    });
    assert!(matches!(
        check(&token),
        Err(TokenError::Unusable("groups", _))
    ));
    let token = with(|c| {
        c.insert("amr".into(), json!(["pwd", "x".repeat(33)]));
    });
    assert!(matches!(check(&token), Err(TokenError::Unusable("amr", _))));
    let token = with(|c| {
        c.insert("acr".into(), json!("x".repeat(129)));
    });
    assert!(matches!(check(&token), Err(TokenError::Unusable("acr", _))));
    // Exactly at the limits is fine.
    let most: Vec<String> = (0..32).map(|i| format!("{i:0>128}")).collect();
    let token = with(|c| {
        c.insert("groups".into(), json!(most));
    });
    assert_eq!(check(&token).unwrap().groups.len(), 32);
}
