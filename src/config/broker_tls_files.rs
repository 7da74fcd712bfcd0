//! TLS to the broker: the CA and client certificate files of `[amqp.tls]`, read and checked
//! once at start, and what lapin is handed for every `amqps://` connection.
//!
//! The server's certificate is verified against the system roots (rustls-platform-verifier,
//! as for HTTPS to Listrak) plus the certificates of `ca_file`; the host name checked is the
//! one in `amqp.url`. A client certificate is presented when the broker asks for one.

use std::fmt;
use std::path::{Path, PathBuf};

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The validated contents of `[amqp.tls]`. Holds the private key: `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BrokerTls {
    /// CA certificates trusted on top of the system roots, for a broker whose certificate
    /// a private CA signed; with the PEM text it held.
    pub ca: Option<PemFile>,
    /// The certificate (chain) and key the worker presents when the broker asks for one.
    pub client: Option<ClientIdentity>,
}

/// A file of PEM certificates and its text, read once.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pem: String,
}

/// A client certificate and its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_file: PemFile,
    pub key_file: PathBuf,
    /// The key's PEM text; never printed.
    key_pem: Vec<u8>,
}

/// Why a TLS file was refused, and which of the two client files it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    Cert(String),
    Key(String),
}

impl BrokerTls {
    /// What lapin needs for a connection: the extra roots and the client identity.
    pub fn lapin_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            cert_chain: self.ca.as_ref().map(|ca| ca.pem.clone()),
            identity: self.client.as_ref().map(|client| OwnedIdentity::PKCS8 {
                pem: client.cert_file.pem.clone().into_bytes(),
                key: client.key_pem.clone(),
            }),
        }
    }
}

impl fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerTls")
            .field("ca_file", &self.ca.as_ref().map(|ca| &ca.path))
            .field(
                "client_cert_file",
                &self.client.as_ref().map(|c| &c.cert_file.path),
            )
            .field(
                "client_key_file",
                &self.client.as_ref().map(|c| &c.key_file),
            )
            .finish()
    }
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.path, f)
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_file", &self.cert_file.path)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// Reads a CA file: PEM certificates, each one rustls can use as a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<PemFile, String> {
    let (file, certs) = read_certificates(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|error| {
            format!(
                "certificate {} of {} cannot be a trusted root: {error}",
                index + 1,
                path.display()
            )
        })?;
    }
    Ok(file)
}

/// Reads a client certificate and its key, and checks that they belong together.
pub fn read_client_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<ClientIdentity, IdentityError> {
    let (cert_file, certs) = read_certificates(cert_path).map_err(IdentityError::Cert)?;
    let key_pem = std::fs::read(key_path).map_err(|error| {
        IdentityError::Key(format!("cannot read {}: {error}", key_path.display()))
    })?;
    // The parser's own message is left out: it could quote a line of the key.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        IdentityError::Key(format!(
            "{} holds no PEM private key (PKCS#8 \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC \
             PRIVATE KEY\")",
            key_path.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider).map_err(|error| {
        IdentityError::Key(match error {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key in {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => format!("{} cannot be used: {other}", key_path.display()),
        })
    })?;
    Ok(ClientIdentity {
        cert_file,
        key_file: key_path.to_owned(),
        key_pem,
    })
}

/// A file of PEM certificates: at least one, and nothing that is not valid PEM.
fn read_certificates(path: &Path) -> Result<(PemFile, Vec<CertificateDer<'static>>), String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{} is not valid PEM ({error})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let file = PemFile {
        path: path.to_owned(),
        pem,
    };
    Ok((file, certs))
}
