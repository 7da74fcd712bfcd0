//! `[amqp.tls]`: the CA and client certificate files, read through `broker_tls_files`.

use super::broker_tls_files::{self as tls, BrokerTls, IdentityError};
use super::document::Node;
use super::environment::ENV_AMQP_URL;
use super::{invalid, ConfigError};

/// `[amqp.tls]`: refused with an `amqp://` URL, where it would be ignored and leave the
/// operator believing the connection encrypted. Every file is read and checked now.
pub(super) fn broker_tls(
    node: &Node<'_>,
    url: &str,
    url_from_env: bool,
) -> Result<Option<BrokerTls>, ConfigError> {
    if node.table.is_none() {
        return Ok(None);
    }
    node.only(&["ca_file", "client_cert_file", "client_key_file"])?;
    let encrypted = url
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("amqps"));
    if !encrypted {
        let from = if url_from_env {
            format!(" (from the {ENV_AMQP_URL} environment variable)")
        } else {
            String::new()
        };
        return Err(invalid(
            node.path.clone(),
            format!(
                "is set, but amqp.url{from} is amqp://, which is not encrypted: use amqps:// \
                 (RabbitMQ listens for TLS on 5671 by default), or remove [amqp.tls]"
            ),
        ));
    }
    let ca = node
        .path("ca_file")?
        .map(|path| tls::read_ca_file(&path).map_err(|why| invalid(node.key("ca_file"), why)))
        .transpose()?;
    let client = match (
        node.path("client_cert_file")?,
        node.path("client_key_file")?,
    ) {
        (Some(cert), Some(key)) => Some(tls::read_client_identity(&cert, &key).map_err(
            |error| match error {
                IdentityError::Cert(why) => invalid(node.key("client_cert_file"), why),
                IdentityError::Key(why) => invalid(node.key("client_key_file"), why),
            },
        )?),
        (Some(_), None) => {
            return Err(invalid(
                node.key("client_key_file"),
                "is missing: client_cert_file needs the private key that goes with it",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                node.key("client_cert_file"),
                "is missing: client_key_file needs the certificate that goes with it",
            ))
        }
        (None, None) => None,
    };
    Ok(Some(BrokerTls { ca, client }))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::tests::{accepted, credentials, no_env, refusal, MAPPING};
    use crate::config::{toml_str, Settings};

    /// Throwaway TLS files in a directory of their own: a CA, a client certificate it signed
    /// with its key, the key of another certificate, and a file that is not PEM.
    struct TlsFiles {
        dir: PathBuf,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        other_key: PathBuf,
        not_pem: PathBuf,
    }

    const KEY_MARKER: &str = "do-not-quote-this-key-line";

    impl TlsFiles {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "listrak-worker-config-{test}-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["listrak-worker".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            let write = |name: &str, text: &str| {
                let path = dir.join(name);
                std::fs::write(&path, text).unwrap();
                path
            };
            TlsFiles {
                ca: write("ca.pem", &ca.pem()),
                cert: write("client.pem", &cert.pem()),
                key: write("client.key", &key.serialize_pem()),
                other_key: write("other.key", &other_key.serialize_pem()),
                not_pem: write("not.pem", &format!("{KEY_MARKER}\n")),
                dir,
            }
        }
    }

    impl Drop for TlsFiles {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn path_str(path: &Path) -> String {
        toml_str(&path.to_string_lossy())
    }

    fn amqps_with(tls_keys: &str) -> String {
        format!(
            "[amqp]\nurl = \
             \"amqps://worker:pw@rabbit.internal:5671/%2f\"\n[amqp.tls]\n{tls_keys}\n{MAPPING}"
        )
    }

    #[test]
    fn tls_files_are_read_and_handed_to_the_connection() {
        let files = TlsFiles::new("read");
        let settings = accepted(&amqps_with(&format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key)
        )));
        let tls = settings.amqp.tls.expect("[amqp.tls] is set");
        assert_eq!(tls.ca.as_ref().unwrap().path, files.ca);
        let lapin = tls.lapin_config();
        assert_eq!(
            lapin.cert_chain.as_deref(),
            Some(std::fs::read_to_string(&files.ca).unwrap().as_str())
        );
        match lapin.identity {
            Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key }) => {
                assert_eq!(pem, std::fs::read(&files.cert).unwrap());
                assert_eq!(key, std::fs::read(&files.key).unwrap());
            }
            other => panic!("expected the PEM client identity, got {other:?}"),
        }
    }

    #[test]
    fn amqps_without_tls_settings_uses_the_system_roots() {
        let settings = accepted(&format!(
            "[amqp]\nurl = \"amqps://worker:pw@rabbit.internal:5671/%2f\"\n{MAPPING}"
        ));
        assert_eq!(settings.amqp.tls, None);
    }

    #[test]
    fn a_ca_file_alone_is_enough() {
        let files = TlsFiles::new("ca-alone");
        let settings = accepted(&amqps_with(&format!("ca_file = {}", path_str(&files.ca))));
        let tls = settings.amqp.tls.unwrap();
        assert!(tls.ca.is_some());
        assert!(tls.client.is_none());
        assert!(tls.lapin_config().identity.is_none());
    }

    #[test]
    fn bad_tls_settings_are_refused_naming_the_key() {
        let files = TlsFiles::new("refused");
        let (ca, cert, key) = (
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key),
        );
        let missing = path_str(&files.dir.join("missing.pem"));
        let not_pem = path_str(&files.not_pem);
        let other_key = path_str(&files.other_key);
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "ca_file_that_does_not_exist",
                amqps_with(&format!("ca_file = {missing}")),
                "amqp.tls.ca_file",
                "cannot read",
            ),
            (
                "ca_file_without_a_certificate",
                amqps_with(&format!("ca_file = {not_pem}")),
                "amqp.tls.ca_file",
                "no PEM certificate",
            ),
            (
                "ca_file_holding_a_key",
                amqps_with(&format!("ca_file = {key}")),
                "amqp.tls.ca_file",
                "no PEM certificate",
            ),
            (
                "empty_ca_file_path",
                amqps_with("ca_file = \"\""),
                "amqp.tls.ca_file",
                "is empty",
            ),
            (
                "certificate_without_its_key",
                amqps_with(&format!("client_cert_file = {cert}")),
                "amqp.tls.client_key_file",
                "is missing",
            ),
            (
                "key_without_its_certificate",
                amqps_with(&format!("client_key_file = {key}")),
                "amqp.tls.client_cert_file",
                "is missing",
            ),
            (
                "client_certificate_that_does_not_exist",
                amqps_with(&format!(
                    "client_cert_file = {missing}\nclient_key_file = {key}"
                )),
                "amqp.tls.client_cert_file",
                "cannot read",
            ),
            (
                "key_of_another_certificate",
                amqps_with(&format!(
                    "client_cert_file = {cert}\nclient_key_file = {other_key}"
                )),
                "amqp.tls.client_key_file",
                "does not belong to the certificate",
            ),
            (
                "key_file_that_is_not_a_key",
                amqps_with(&format!(
                    "client_cert_file = {cert}\nclient_key_file = {not_pem}"
                )),
                "amqp.tls.client_key_file",
                "no PEM private key",
            ),
            (
                "unknown_tls_key",
                amqps_with(&format!("cafile = {ca}")),
                "amqp.tls.cafile",
                "not a known key",
            ),
            (
                "tls_settings_with_a_plain_url",
                format!(
                    "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n[amqp.tls]\nca_file \
                     = {ca}\n{MAPPING}"
                ),
                "amqp.tls",
                "not encrypted",
            ),
            (
                "tls_table_without_keys_and_the_default_url",
                format!("[amqp.tls]\n{MAPPING}"),
                "amqp.tls",
                "use amqps://",
            ),
        ];
        for (behaviour, text, expected_key, mentions) in cases {
            let (key, reason) = refusal(&text, credentials);
            assert_eq!(key, expected_key, "{behaviour}: {reason}");
            assert!(reason.contains(mentions), "{behaviour}: {reason}");
            assert!(!reason.contains(KEY_MARKER), "{behaviour}: {reason}");
        }
    }

    #[test]
    fn tls_settings_with_a_plain_url_from_the_environment_say_where_it_came_from() {
        let files = TlsFiles::new("env-url");
        let text = amqps_with(&format!("ca_file = {}", path_str(&files.ca)));
        let (key, reason) = refusal(&text, |name| match name {
            ENV_AMQP_URL => Some("amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            other => credentials(other),
        });
        assert_eq!(key, "amqp.tls");
        assert!(reason.contains("AMQP_URL"), "{reason}");
    }

    #[test]
    fn the_client_key_never_reaches_debug_or_check() {
        let files = TlsFiles::new("key-hidden");
        let settings = accepted(&amqps_with(&format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            path_str(&files.ca),
            path_str(&files.cert),
            path_str(&files.key)
        )));
        let key_pem = std::fs::read_to_string(&files.key).unwrap();
        let key_body = key_pem.lines().nth(1).expect("a base64 line");
        let debug = format!("{settings:?}");
        assert!(!debug.contains(key_body), "{debug}");
        assert!(debug.contains("client.key"), "{debug}");
        let printed = settings.redacted_toml();
        assert!(!printed.contains(key_body), "{printed}");

        let reloaded = Settings::from_toml(&printed, no_env).unwrap();
        assert_eq!(reloaded.amqp.tls, settings.amqp.tls);
    }
}
