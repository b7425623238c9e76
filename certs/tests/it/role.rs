//! The one decision of what a finished handshake may do.

use std::time::{Duration, SystemTime};

use postern_certs::testdata::{alice, client_ca, client_verifier, issue, other_ca};
use postern_certs::{Role, RoleError, VerifyError, connection_role};
use postern_proto::{ALPN_ENROLL, ALPN_TUNNEL};

#[test]
fn the_tunnel_requires_a_valid_certificate() {
    let now = SystemTime::now();
    let verifier = client_verifier();
    let good = issue(&client_ca(), &alice(now), now, Duration::from_secs(3600)).chain;
    let foreign = issue(&other_ca(), &alice(now), now, Duration::from_secs(3600)).chain;

    match connection_role(Some(ALPN_TUNNEL), Some(&good), &verifier, now) {
        Ok(Role::Tunnel(client)) => assert_eq!(client.identity.user.subject(), "alice-0001"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        connection_role(Some(ALPN_TUNNEL), None, &verifier, now),
        Err(RoleError::IdentityRequired)
    );
    assert_eq!(
        connection_role(Some(ALPN_TUNNEL), Some(&[]), &verifier, now),
        Err(RoleError::IdentityRequired)
    );
    assert!(matches!(
        connection_role(Some(ALPN_TUNNEL), Some(&foreign), &verifier, now),
        Err(RoleError::Verify(VerifyError::Untrusted(_)))
    ));
    let later = now + Duration::from_secs(7200);
    assert!(matches!(
        connection_role(Some(ALPN_TUNNEL), Some(&good), &verifier, later),
        Err(RoleError::Verify(VerifyError::Expired(_)))
    ));
}

#[test]
fn enrollment_needs_no_certificate_and_other_protocols_get_nothing() {
    let now = SystemTime::now();
    let verifier = client_verifier();
    assert_eq!(
        connection_role(Some(ALPN_ENROLL), None, &verifier, now),
        Ok(Role::Enroll)
    );
    assert_eq!(
        connection_role(Some(b"h3"), None, &verifier, now),
        Err(RoleError::NoProtocol)
    );
    assert_eq!(
        connection_role(None, None, &verifier, now),
        Err(RoleError::NoProtocol)
    );
}
