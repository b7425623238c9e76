//! Client certificates are accepted exactly when a trusted client CA issued them for now.

use std::time::{Duration, SystemTime};

use postern_certs::testdata::{
    self, CLIENT_CA_KEY, CLIENT_CA_PEM, alice, client_ca, client_verifier, other_ca,
};
use postern_certs::{ClientCa, ClientVerifier, VerifyError, VerifyLimits};
use rcgen::{
    CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType,
};
use rustls_pki_types::CertificateDer;

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn leaf(ca: &ClientCa, lifetime: Duration) -> CertificateDer<'static> {
    testdata::issue(ca, &alice(now()), now(), lifetime)
        .chain
        .remove(0)
}

#[test]
fn a_fresh_certificate_yields_its_identity() {
    let identity = alice(now());
    let cert = testdata::issue(&client_ca(), &identity, now(), 8 * HOUR)
        .chain
        .remove(0);
    let verified = client_verifier().verify(&cert, now()).unwrap();
    assert_eq!(verified.identity, identity);
    assert_eq!(verified.not_before, now());
    assert_eq!(verified.not_after, now() + 8 * HOUR);
    assert_eq!(verified.serial.len(), 32);
    assert_eq!(verified.fingerprint.len(), 64);
}

#[test]
fn another_ca_is_refused_even_with_the_same_name() {
    let cert = leaf(&other_ca(), HOUR);
    assert!(matches!(
        client_verifier().verify(&cert, now()),
        Err(VerifyError::Untrusted(_))
    ));

    // A CA with the trusted CA's exact name but another key.
    let (impostor, _) = ClientCa::generate("test", now(), 10 * HOUR).unwrap();
    let cert = leaf(&impostor, HOUR);
    assert!(matches!(
        client_verifier().verify(&cert, now()),
        Err(VerifyError::Untrusted(_))
    ));
}

#[test]
fn validity_is_enforced_with_bounded_skew() {
    let verifier = client_verifier();
    let skew = VerifyLimits::default().max_clock_skew;
    let cert = leaf(&client_ca(), HOUR);
    assert!(
        verifier.verify(&cert, now() - skew).is_ok(),
        "a clock slightly behind is tolerated"
    );
    assert!(
        verifier.verify(&cert, now() + HOUR + skew).is_ok(),
        "a clock slightly ahead is tolerated"
    );
    assert_eq!(
        verifier.verify(&cert, now() - skew - Duration::from_secs(1)),
        Err(VerifyError::NotYetValid(now()))
    );
    assert_eq!(
        verifier.verify(&cert, now() + HOUR + skew + Duration::from_secs(1)),
        Err(VerifyError::Expired(now() + HOUR))
    );
}

#[test]
fn long_lived_certificates_are_refused() {
    let cert = leaf(&client_ca(), 25 * HOUR);
    assert!(matches!(
        client_verifier().verify(&cert, now()),
        Err(VerifyError::LifetimeTooLong { .. })
    ));
    let lenient = ClientVerifier::new(
        &[client_ca().certificate().clone()],
        VerifyLimits {
            max_lifetime: 48 * HOUR,
            ..VerifyLimits::default()
        },
    )
    .unwrap();
    assert!(lenient.verify(&cert, now()).is_ok());
}

#[test]
fn any_changed_byte_breaks_the_signature() {
    let cert = leaf(&client_ca(), HOUR);
    let at = cert
        .windows(b"alice-0001".len())
        .position(|w| w == b"alice-0001")
        .unwrap();
    let mut tampered = cert.to_vec();
    tampered[at] = b'm'; // mlice-0001
    let result = client_verifier().verify(&CertificateDer::from(tampered), now());
    assert!(
        matches!(result, Err(VerifyError::Untrusted(_))),
        "{result:?}"
    );
}

#[test]
fn rotation_trusts_a_set_of_cas() {
    let (next, _) = ClientCa::generate("next", now(), 100 * HOUR).unwrap();
    let verifier = ClientVerifier::new(
        &[
            client_ca().certificate().clone(),
            next.certificate().clone(),
        ],
        VerifyLimits::default(),
    )
    .unwrap();
    assert!(verifier.verify(&leaf(&client_ca(), HOUR), now()).is_ok());
    assert!(verifier.verify(&leaf(&next, HOUR), now()).is_ok());
    assert!(verifier.verify(&leaf(&other_ca(), HOUR), now()).is_err());
}

/// Signs a leaf with the trusted client CA's key, bypassing `ClientCa::issue`, to check that the
/// verifier itself insists on the profile.
fn raw_leaf(edit: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
    let good = client_verifier()
        .verify(&leaf(&client_ca(), HOUR), now())
        .unwrap();
    let ca_key = KeyPair::from_pem(CLIENT_CA_KEY).unwrap();
    let issuer = Issuer::from_ca_cert_pem(CLIENT_CA_PEM, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.not_before = now().into();
    params.not_after = (now() + HOUR).into();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(good.identity.user.uri().try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // Copy the extension of a good certificate.
    let good_der = leaf(&client_ca(), HOUR);
    let (_, parsed) = x509_parser::parse_x509_certificate(&good_der).unwrap();
    let ext = parsed
        .extensions()
        .iter()
        .find(|e| !e.critical && e.oid.to_id_string().starts_with("1.2.840.113556"))
        .unwrap();
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        postern_certs::AUTH_CONTEXT_OID,
        ext.value.to_vec(),
    )];
    edit(&mut params);
    params.signed_by(&key, &issuer).unwrap().der().clone()
}

type Edit = Box<dyn FnOnce(&mut CertificateParams)>;

#[test]
fn the_profile_is_checked_after_the_signature() {
    assert!(
        client_verifier().verify(&raw_leaf(|_| {}), now()).is_ok(),
        "the unedited profile verifies"
    );

    let cases: Vec<(&str, Edit, VerifyError)> = vec![
        (
            "no extension",
            Box::new(|p| p.custom_extensions.clear()),
            VerifyError::BadIdentity("there must be exactly one Postern extension"),
        ),
        // webpki refuses unknown critical extensions before anything else looks.
        (
            "critical extension",
            Box::new(|p| p.custom_extensions[0].set_criticality(true)),
            VerifyError::Malformed,
        ),
        (
            "two extensions",
            Box::new(|p| {
                let e = p.custom_extensions[0].clone();
                p.custom_extensions.push(e)
            }),
            VerifyError::BadIdentity("there must be exactly one Postern extension"),
        ),
        (
            "garbage extension",
            Box::new(|p| {
                p.custom_extensions = vec![CustomExtension::from_oid_content(
                    postern_certs::AUTH_CONTEXT_OID,
                    vec![0x30, 0x00],
                )]
            }),
            VerifyError::BadIdentity("the Postern extension is malformed"),
        ),
        (
            "no EKU",
            Box::new(|p| p.extended_key_usages.clear()),
            VerifyError::NotClientAuth,
        ),
        (
            "two URIs",
            Box::new(|p| {
                let s = p.subject_alt_names[0].clone();
                p.subject_alt_names.push(s)
            }),
            VerifyError::BadIdentity("the subject alternative name must be exactly one URI"),
        ),
        (
            "email SAN",
            Box::new(|p| {
                p.subject_alt_names
                    .push(SanType::Rfc822Name("alice@example.org".try_into().unwrap()))
            }),
            VerifyError::BadIdentity("the subject alternative name must be exactly one URI"),
        ),
        (
            "non-canonical URI",
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::URI(
                    "https://idp.example.org#alice%2D0001".try_into().unwrap(),
                )]
            }),
            VerifyError::BadIdentity("the URI is not a Postern user id"),
        ),
    ];
    assert!(!cases.is_empty());
    for (name, edit, expected) in cases {
        assert_eq!(
            client_verifier().verify(&raw_leaf(edit), now()),
            Err(expected),
            "{name}"
        );
    }

    let server_eku =
        raw_leaf(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]);
    assert!(
        client_verifier().verify(&server_eku, now()).is_err(),
        "server EKU"
    );
    let ca_leaf = raw_leaf(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
    assert!(
        client_verifier().verify(&ca_leaf, now()).is_err(),
        "CA as end entity"
    );
}

#[test]
fn an_expired_ca_invalidates_what_it_signed() {
    let (ca, files) = ClientCa::generate("short", now(), 2 * HOUR).unwrap();
    let verifier =
        ClientVerifier::new(&[ca.certificate().clone()], VerifyLimits::default()).unwrap();
    // Signed with the CA key directly: `issue` refuses to outlive the CA.
    let issuer = Issuer::from_ca_cert_der(
        ca.certificate(),
        KeyPair::from_pem(files.key_pem.expose()).unwrap(),
    )
    .unwrap();
    let mut params = CertificateParams::default();
    params.not_before = (now() + HOUR).into();
    params.not_after = (now() + 4 * HOUR).into();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap();
    assert_eq!(
        verifier.verify(cert.der(), now() + 3 * HOUR),
        Err(VerifyError::CaExpired(now() + 2 * HOUR))
    );
}
