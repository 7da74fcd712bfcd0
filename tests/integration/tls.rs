//! TLS: `amqps://` to the broker with a private CA and a client certificate, and HTTPS to
//! Listrak with the system roots.
//!
//! The shared RabbitMQ only listens for plain AMQP, and other tests use it, so it is left
//! as it is: each test puts a TLS-terminating proxy in front of it, in this process, with
//! certificates made for the test. The worker speaks TLS to the proxy, which checks the
//! client certificate when asked to; the broker sees plain AMQP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use listrak_worker::config::Settings;
use listrak_worker::edges::broker;
use listrak_worker::edges::listrak::{install_crypto_provider, ListrakClient};
use listrak_worker::edges::telemetry::Metrics;
use listrak_worker::tools::fake::Faults;
use listrak_worker::tools::sample::{self, TrafficShape};

use crate::support::{amqp_url, settings_text, unique_queue, Harness, Knobs};

/// A certificate authority made for one test.
struct Authority {
    cert: Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names`, signed by this authority, and its key.
    fn issue(&self, names: &[&str]) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert, key)
    }
}

/// Everything a test needs: the broker's CA and certificate (for `localhost`), a client CA
/// and a client certificate, and a CA nobody uses; the worker's side written to files.
struct Pki {
    dir: PathBuf,
    broker_ca: Authority,
    server: (Certificate, KeyPair),
    client_ca: Authority,
    client: (Certificate, KeyPair),
    broker_ca_file: PathBuf,
    client_cert_file: PathBuf,
    client_key_file: PathBuf,
    unrelated_ca_file: PathBuf,
}

impl Pki {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_queue(&format!("tls-{test}")));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let broker_ca = Authority::new("test broker CA");
        let server = broker_ca.issue(&["localhost"]);
        let client_ca = Authority::new("test client CA");
        let client = client_ca.issue(&["listrak-worker"]);
        Pki {
            broker_ca_file: write("broker-ca.pem", broker_ca.cert.pem()),
            client_cert_file: write("client.pem", client.0.pem()),
            client_key_file: write("client.key", client.1.serialize_pem()),
            unrelated_ca_file: write(
                "unrelated-ca.pem",
                Authority::new("test unrelated CA").cert.pem(),
            ),
            dir,
            broker_ca,
            server,
            client_ca,
            client,
        }
    }

    /// The proxy's side: the broker certificate, and client certificates required or not.
    fn server_config(&self, client_auth: ClientAuth) -> ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required => {
                let mut roots = RootCertStore::empty();
                roots.add(self.client_ca.cert.der().clone()).unwrap();
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let (cert, key) = &self.server;
        builder
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy)]
enum ClientAuth {
    None,
    Required,
}

/// How one TLS handshake with the proxy ended.
#[derive(Debug, Clone)]
enum Handshake {
    /// With the DER of the client certificate, when one was presented.
    Accepted {
        client_cert: Option<Vec<u8>>,
    },
    Refused(String),
}

/// Terminates TLS on a port of its own and forwards the plain bytes to `upstream` (or, with
/// none, only completes handshakes); records every handshake.
struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    async fn start(config: ServerConfig, upstream: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let record = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((incoming, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(incoming).await {
                        Ok(tls) => tls,
                        Err(error) => {
                            record
                                .lock()
                                .unwrap()
                                .push(Handshake::Refused(error.to_string()));
                            return;
                        }
                    };
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|cert| cert.to_vec());
                    record
                        .lock()
                        .unwrap()
                        .push(Handshake::Accepted { client_cert });
                    if let Some(upstream) = upstream {
                        if let Ok(mut plain) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            task,
        }
    }

    /// In front of the broker the other tests use.
    async fn for_broker(config: ServerConfig) -> Self {
        let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
        let upstream = tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port))
            .await
            .unwrap()
            .next()
            .expect("the broker's address");
        Self::start(config, Some(upstream)).await
    }

    /// The broker's URL with the proxy in its place: same credentials and vhost, `amqps://`
    /// to `localhost`, the name in the proxy's certificate.
    fn amqps_url(&self) -> String {
        let url = amqp_url();
        let rest = url.split_once("://").expect("a URL").1;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let userinfo = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        format!("amqps://{userinfo}localhost:{}{path}", self.addr.port())
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }

    /// The first `count` handshakes, once the proxy has recorded them (it may learn of a
    /// refusal a moment after the client gave up).
    async fn wait_handshakes(&self, count: usize) -> Vec<Handshake> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let handshakes = self.handshakes();
            if handshakes.len() >= count || tokio::time::Instant::now() > deadline {
                return handshakes;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.to_str().expect("a UTF-8 path"))
}

/// Settings for the worker over `url`, with these `[amqp.tls]` keys (none: no table).
fn amqps_settings(url: &str, tls_keys: Option<String>) -> Settings {
    let knobs = Knobs {
        worker_amqp_url: Some(url.to_owned()),
        amqp_tls: tls_keys,
        ..Knobs::default()
    };
    let text = settings_text(
        &unique_queue("tls"),
        "http://127.0.0.1:9/email/v1",
        "http://127.0.0.1:9/OAuth2/Token",
        &knobs,
    );
    Settings::from_toml(&text, |_| None).expect("valid test settings")
}

/// Runs the worker through the proxy on events the test publishes directly, and checks that
/// Listrak ends in the state the events imply, with nothing dead-lettered.
async fn events_applied_over_amqps(test: &str, proxy: &TlsProxy, tls_keys: String) {
    let traffic = sample::generate(TrafficShape {
        events: 400,
        people: 80,
        poison_every: 0,
        ..TrafficShape::default()
    });
    let knobs = Knobs {
        worker_amqp_url: Some(proxy.amqps_url()),
        amqp_tls: Some(tls_keys),
        ..Knobs::default()
    };
    let mut h = Harness::new(test, Faults::default(), knobs).await;
    h.publish(&traffic.bodies).await;
    h.start_worker();
    h.wait_for(
        "every event applied over amqps",
        Duration::from_secs(30),
        |h| h.fake.contacts() == traffic.expected,
    )
    .await;
    h.wait_acked(traffic.bodies.len() as u64, Duration::from_secs(10))
        .await;
    assert!(h.take_dead_letters().await.is_empty());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_over_amqps_trusts_the_ca_file_and_applies_every_event() {
    let pki = Pki::new("ca");
    let proxy = TlsProxy::for_broker(pki.server_config(ClientAuth::None)).await;
    events_applied_over_amqps(
        "tls-ca",
        &proxy,
        format!("ca_file = {}", toml_path(&pki.broker_ca_file)),
    )
    .await;
    let handshakes = proxy.handshakes();
    assert!(
        !handshakes.is_empty(),
        "the worker's connection went through the proxy"
    );
    assert!(
        handshakes
            .iter()
            .all(|h| matches!(h, Handshake::Accepted { client_cert: None })),
        "{handshakes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_presents_its_client_certificate_to_a_broker_that_requires_one() {
    let pki = Pki::new("client-cert");
    let proxy = TlsProxy::for_broker(pki.server_config(ClientAuth::Required)).await;
    events_applied_over_amqps(
        "tls-client-cert",
        &proxy,
        format!(
            "ca_file = {}\nclient_cert_file = {}\nclient_key_file = {}",
            toml_path(&pki.broker_ca_file),
            toml_path(&pki.client_cert_file),
            toml_path(&pki.client_key_file)
        ),
    )
    .await;
    let handshakes = proxy.handshakes();
    assert!(
        !handshakes.is_empty(),
        "the worker's connection went through the proxy"
    );
    let client_cert = pki.client.0.der().to_vec();
    for handshake in &handshakes {
        match handshake {
            Handshake::Accepted {
                client_cert: Some(presented),
            } => assert_eq!(*presented, client_cert),
            other => panic!("every connection presents the client certificate: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_the_worker_cannot_verify_or_authenticate_are_refused() {
    let pki = Pki::new("refused");
    let ca_only = format!("ca_file = {}", toml_path(&pki.broker_ca_file));
    // (behaviour, what the proxy asks, the worker's [amqp.tls], the worker's error, the proxy's)
    let cases = [
        (
            "broker_certificate_from_a_ca_the_worker_does_not_trust",
            ClientAuth::None,
            Some(format!("ca_file = {}", toml_path(&pki.unrelated_ca_file))),
            "invalid peer certificate: UnknownIssuer",
            "eof",
        ),
        (
            "private_ca_without_a_ca_file_is_not_among_the_system_roots",
            ClientAuth::None,
            None,
            "invalid peer certificate: UnknownIssuer",
            "eof",
        ),
        (
            "broker_requires_a_client_certificate_and_none_is_configured",
            ClientAuth::Required,
            Some(ca_only),
            "CertificateRequired",
            "peer sent no certificates",
        ),
    ];
    for (behaviour, client_auth, tls_keys, worker_error, proxy_error) in cases {
        let proxy = TlsProxy::for_broker(pki.server_config(client_auth)).await;
        let settings = amqps_settings(&proxy.amqps_url(), tls_keys);
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            broker::connect(&settings.amqp, "listrak-worker tls test"),
        )
        .await
        .unwrap_or_else(|_| panic!("{behaviour}: no answer within 10s"));
        let error = connected
            .expect_err(&format!("{behaviour}: the connection was opened"))
            .to_string();
        assert!(error.contains(worker_error), "{behaviour}: {error}");
        let handshakes = proxy.wait_handshakes(1).await;
        assert!(
            matches!(handshakes.as_slice(), [Handshake::Refused(why)] if why.contains(proxy_error)),
            "{behaviour}: {handshakes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listrak_https_verifies_the_server_certificate_against_the_system_roots() {
    let pki = Pki::new("https");
    let server = TlsProxy::start(pki.server_config(ClientAuth::None), None).await;
    let port = server.addr.port();

    // The server completes a handshake with a client that trusts its CA...
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add(pki.broker_ca.cert.der().clone()).unwrap();
    let trusting = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(trusting))
        .connect(
            ServerName::try_from("localhost").unwrap(),
            TcpStream::connect(server.addr).await.unwrap(),
        )
        .await
        .expect("a client that trusts the test CA completes the handshake");

    // ...and the Listrak client, which trusts only the system roots, refuses it.
    let knobs = Knobs::default();
    let text = settings_text(
        &unique_queue("https"),
        &format!("https://localhost:{port}/email/v1"),
        &format!("https://localhost:{port}/OAuth2/Token"),
        &knobs,
    );
    let settings = Settings::from_toml(&text, |_| None).unwrap();
    let client = ListrakClient::new(&settings.listrak, Metrics::new(1)).expect("the client builds");
    let reason = client
        .authenticate()
        .await
        .expect_err("a certificate from an unknown CA is refused");
    assert!(
        reason.contains("invalid peer certificate: UnknownIssuer"),
        "{reason}"
    );

    let handshakes = server.wait_handshakes(2).await;
    assert!(
        matches!(
            handshakes.as_slice(),
            [Handshake::Accepted { .. }, Handshake::Refused(why)] if why.contains("UnknownCA")
        ),
        "the client aborted the handshake because it does not know the CA: {handshakes:?}"
    );
}
