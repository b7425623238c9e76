//! What the CAs sign, and what they refuse to sign.

use std::time::{Duration, SystemTime};

use postern_certs::testdata::{alice, client_ca, client_verifier, server_ca, server_credential};
use postern_certs::{
    AuthContext, Bundle, BundleService, ClientCa, Identity, Issuance, IssueError, KeyRequest,
    PublicKey, RandomId, ServerCa, UserId, inspect_unverified, pem_block,
};

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn the_csr_contributes_only_its_key() {
    let now = SystemTime::now();
    // A request that asks for a CA certificate with a chosen name.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut asked = rcgen::CertificateParams::new(vec!["evil.example".into()]).unwrap();
    asked.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    asked.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    asked
        .distinguished_name
        .push(rcgen::DnType::CommonName, "root");
    let csr = asked.serialize_request(&key).unwrap().pem().unwrap();

    let identity = alice(now);
    let cert = client_ca()
        .issue(
            &identity,
            &PublicKey::from_csr_pem(csr.as_bytes()).unwrap(),
            now,
            HOUR,
        )
        .unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    assert!(!parsed.is_ca());
    assert_eq!(parsed.subject().iter().count(), 0, "empty subject");
    assert!(!pem_block("CERTIFICATE", &cert).contains("evil"));
    assert_eq!(
        client_verifier().verify(&cert, now).unwrap().identity,
        identity
    );
}

#[test]
fn issuance_cannot_outlive_the_ca() {
    let now = SystemTime::now();
    let (ca, _) = ClientCa::generate("short", now, 2 * HOUR).unwrap();
    let key = PublicKey::from_csr_pem(KeyRequest::generate().unwrap().csr_pem.as_bytes()).unwrap();
    assert!(ca.issue(&alice(now), &key, now, HOUR).is_ok());
    assert!(matches!(
        ca.issue(&alice(now), &key, now, 3 * HOUR),
        Err(IssueError::OutlivesCa { .. })
    ));
    let forever = Duration::from_secs(u64::MAX / 4);
    assert!(
        ca.issue(&alice(now), &key, now, forever).is_err(),
        "no panic past the year 9999"
    );
}

#[test]
fn identities_over_the_limits_are_not_issued() {
    let now = SystemTime::now();
    let key = PublicKey::from_csr_pem(KeyRequest::generate().unwrap().csr_pem.as_bytes()).unwrap();
    let mut identity = alice(now);
    identity.groups = (0..100).map(|i| format!("group-{i}")).collect();
    assert!(matches!(
        client_ca().issue(&identity, &key, now, HOUR),
        Err(IssueError::Identity(_))
    ));
}

#[test]
fn admin_issuance_is_marked() {
    let now = SystemTime::now();
    let identity = Identity {
        user: UserId::new("postern-admin:gw.example.org", "backup@example.org").unwrap(),
        email: Some("backup@example.org".into()),
        name: None,
        groups: vec!["machines".into()],
        auth: AuthContext {
            issuance: Issuance::Admin,
            amr: vec![],
            acr: None,
            auth_time: now,
            lineage: RandomId::generate().unwrap(),
            device: RandomId::generate().unwrap(),
        },
    };
    let key = PublicKey::from_csr_pem(KeyRequest::generate().unwrap().csr_pem.as_bytes()).unwrap();
    let cert = client_ca().issue(&identity, &key, now, HOUR).unwrap();
    assert_eq!(
        client_verifier()
            .verify(&cert, now)
            .unwrap()
            .identity
            .auth
            .issuance,
        Issuance::Admin
    );
}

#[test]
fn server_certificates_name_the_host() {
    let now = SystemTime::now();
    let (ca, _) = ServerCa::generate("gw", now, 100 * HOUR).unwrap();
    for host in ["gw.example.org", "192.0.2.7", "::1"] {
        let generated = ca.issue_server(host, now, HOUR).unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(generated.cert_pem.as_bytes())
            .unwrap();
        let cert: rustls_pki_types::CertificateDer = der;
        let name = rustls_pki_types::ServerName::try_from(host).unwrap();
        let ee = webpki::EndEntityCert::try_from(&cert).unwrap();
        ee.verify_is_valid_for_subject_name(&name).unwrap();
    }
    assert!(matches!(
        ca.issue_server("not a host", now, HOUR),
        Err(IssueError::BadHostName(_))
    ));
    assert_eq!(server_credential().0.len(), 1);
    assert!(server_ca().certificate().len() > 100);
}

#[test]
fn bundles_round_trip_and_check_their_key() {
    let now = SystemTime::now();
    let request = KeyRequest::generate().unwrap();
    let key = PublicKey::from_csr_pem(request.csr_pem.as_bytes()).unwrap();
    let cert = client_ca().issue(&alice(now), &key, now, HOUR).unwrap();
    let bundle = Bundle {
        broker: "localhost:4433".into(),
        server_name: "localhost".into(),
        server_cas: vec![server_ca().certificate().clone()],
        certificate: cert.clone(),
        key: Some(request.key_pem.clone()),
        services: [(
            "imap".parse().unwrap(),
            BundleService {
                port: 993,
                protocol: postern_proto::ServiceKind::Imap,
            },
        )]
        .into(),
        login: Some(postern_certs::Login {
            sealed: Some(postern_certs::Sealed::new(vec![1, 2, 3, 250])),
            session_ends: SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        }),
    };
    let text = bundle.to_toml();
    assert!(
        text.contains("session_ends = \"2030-03-17T17:46:40Z\""),
        "{text}"
    );
    assert!(text.starts_with("# Postern identity bundle."));
    let read = Bundle::from_toml(&text).unwrap();
    assert_eq!(read, bundle);
    assert!(read.credential().is_ok());
    assert_eq!(
        inspect_unverified(&read.certificate).unwrap().identity,
        alice_like(&read)
    );

    let other = KeyRequest::generate().unwrap();
    let mismatched = text.replace(request.key_pem.expose(), other.key_pem.expose());
    assert!(
        Bundle::from_toml(&mismatched)
            .unwrap_err()
            .to_string()
            .contains("does not belong")
    );
    assert!(Bundle::from_toml("format = \"postern-bundle/9\"").is_err());
    assert!(
        format!("{:?}", bundle).contains("SecretPem(..)"),
        "the key is redacted in Debug"
    );
}

fn alice_like(bundle: &Bundle) -> Identity {
    inspect_unverified(&bundle.certificate).unwrap().identity
}
