//! Writes a new test PKI into `certs/testdata/`, replacing the committed one.

use std::path::Path;
use std::time::SystemTime;

use postern_certs::store::{WriteMode, write_public, write_secret};
use postern_certs::testdata::FIXTURE_LIFETIME;
use postern_certs::{ClientCa, Generated, ServerCa};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let now = SystemTime::now();
    let write = |name: &str, generated: &Generated| -> Result<(), Box<dyn std::error::Error>> {
        write_public(
            &dir.join(format!("{name}.pem")),
            &generated.cert_pem,
            WriteMode::Replace,
        )?;
        write_secret(
            &dir.join(format!("{name}.key")),
            generated.key_pem.expose(),
            WriteMode::Replace,
        )?;
        Ok(())
    };
    let (_, client) = ClientCa::generate("test", now, FIXTURE_LIFETIME)?;
    write("client-ca", &client)?;
    let (_, other) = ClientCa::generate("untrusted test", now, FIXTURE_LIFETIME)?;
    write("other-ca", &other)?;
    let (server_ca, server_ca_files) = ServerCa::generate("test", now, FIXTURE_LIFETIME)?;
    write("server-ca", &server_ca_files)?;
    write(
        "server",
        &server_ca.issue_server("localhost", now, FIXTURE_LIFETIME)?,
    )?;
    eprintln!("wrote a new test PKI to {}", dir.display());
    Ok(())
}
