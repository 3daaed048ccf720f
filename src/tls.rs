//! TLS settings, built once at start-up: pgprism as a TLS server for its clients
//! (`[client-tls]`), and as a TLS client of the databases it connects to, with libpq's
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in their URLs. The handshakes themselves
//! run on the shard runtime (`exec::tls`).
//!
//! `sslmode` means what it means to libpq: `disable` and `allow` connect in plain text
//! (pgprism does not retry `allow` with TLS), `prefer` asks for TLS and goes on in plain text
//! when the server declines, `require` insists on TLS without checking the certificate,
//! `verify-ca` checks the chain against `sslrootcert`, `verify-full` also the host name. Unix
//! socket connections never use TLS (as with libpq).

use std::io;
use std::sync::Arc;

use rustls::client::VerifierBuilderError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, InvalidDnsNameError, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{PgUrl, UrlError};
use crate::exec::net::Stream;

/// ALPN protocol name PostgreSQL 17 registers; older servers ignore it.
const ALPN: &[u8] = b"postgresql";

/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

pub use crate::config::SslMode;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS settings cannot be built; each names the option or file at fault (`what` is the
/// option: `sslrootcert`, `sslcert`, `sslkey`, `client-tls.cert-file`, ...).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    SslMode(#[from] UrlError),
    #[error("sslmode={mode} needs sslrootcert (a PEM file of the CA certificates to trust)")]
    NoRootCert { mode: &'static str },
    #[error("{what} `{path}`")]
    Pem {
        what: &'static str,
        path: String,
        #[source]
        source: pem::Error,
    },
    #[error("{what} `{path}`: no PEM certificate in it")]
    NoCertificate { what: &'static str, path: String },
    #[error("sslrootcert `{path}`")]
    RootCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
    #[error("sslrootcert `{path}`")]
    Verifier {
        path: String,
        #[source]
        source: VerifierBuilderError,
    },
    #[error("no TLS protocol version the crypto provider supports")]
    Versions(#[source] rustls::Error),
    #[error("sslcert/sslkey")]
    ClientCert(#[source] rustls::Error),
    #[error("sslcert and sslkey go together")]
    CertWithoutKey,
    #[error("host `{host}` is not a valid TLS server name")]
    ServerName {
        host: String,
        #[source]
        source: InvalidDnsNameError,
    },
    #[error("the key does not fit the certificate")]
    KeyMismatch(#[source] rustls::Error),
}

fn read_certs(path: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        what,
        path: path.to_string(),
        source,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<_, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_string(),
        });
    }
    Ok(certs)
}

fn read_key(path: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what,
        path: path.to_string(),
        source,
    })
}

/// How pgprism connects to one database: plain, or TLS with this configuration.
#[derive(Clone)]
pub struct Upstream {
    pub mode: SslMode,
    config: Option<Arc<rustls::ClientConfig>>,
    name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sslmode={}", self.mode.name())
    }
}

impl TryFrom<&PgUrl> for Upstream {
    type Error = TlsError;

    /// The TLS side of connections to the database of `url`. Certificate and key files are
    /// read here, so this runs where a part starts (on the main thread, or `pgprism check`),
    /// never on a shard. Without `sslmode`, `prefer`, as with libpq.
    fn try_from(url: &PgUrl) -> Result<Upstream, TlsError> {
        let mode = match &url.sslmode {
            Some(mode) => SslMode::parse(mode)?,
            None => SslMode::Prefer,
        };
        Upstream::new(
            mode,
            &url.host,
            url.sslrootcert.as_deref(),
            url.sslcert.as_deref(),
            url.sslkey.as_deref(),
        )
    }
}

impl Upstream {
    pub fn plain() -> Upstream {
        Upstream {
            mode: SslMode::Disable,
            config: None,
            name: None,
        }
    }

    /// Builds the client side of TLS for a database at `host` (a name, an IP address, or a
    /// Unix socket directory). Errors name the file or value at fault.
    pub fn new(
        mode: SslMode,
        host: &str,
        root_cert: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> Result<Upstream, TlsError> {
        if mode <= SslMode::Allow || host.starts_with('/') {
            return Ok(Upstream {
                mode: SslMode::Disable,
                config: None,
                name: None,
            });
        }
        let provider = provider();
        let algorithms = provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = if mode >= SslMode::VerifyCa {
            let path = root_cert.ok_or(TlsError::NoRootCert { mode: mode.name() })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path, "sslrootcert")? {
                roots.add(cert).map_err(|source| TlsError::RootCert {
                    path: path.to_string(),
                    source,
                })?;
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots.into(),
                provider.clone(),
            )
            .build()
            .map_err(|source| TlsError::Verifier {
                path: path.to_string(),
                source,
            })?;
            Arc::new(Verifier {
                webpki: Some(webpki),
                check_name: mode == SslMode::VerifyFull,
                algorithms,
            })
        } else {
            Arc::new(Verifier {
                webpki: None,
                check_name: false,
                algorithms,
            })
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (cert, key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert, "sslcert")?, read_key(key, "sslkey")?)
                .map_err(TlsError::ClientCert)?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::CertWithoutKey),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        let name =
            ServerName::try_from(host.to_string()).map_err(|source| TlsError::ServerName {
                host: host.to_string(),
                source,
            })?;
        Ok(Upstream {
            mode,
            config: Some(Arc::new(config)),
            name: Some(name),
        })
    }

    /// After connecting: asks for TLS when the mode says so and runs the handshake.
    /// `Ok(true)`: the connection is now encrypted.
    pub async fn negotiate(&self, stream: &mut Stream) -> io::Result<bool> {
        let (Some(config), Some(name)) = (&self.config, &self.name) else {
            return Ok(false);
        };
        stream.write_all(&SSL_REQUEST).await?;
        let mut answer = bytes::BytesMut::with_capacity(1);
        while answer.is_empty() {
            if stream.read_buf(&mut answer, 1).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection after SSLRequest",
                ));
            }
        }
        if !self.accepts(answer[0])? {
            return Ok(false);
        }
        stream
            .start_tls_client(config.clone(), name.clone())
            .await?;
        Ok(true)
    }

    /// The server's one-byte answer to SSLRequest: `Ok(true)` to start TLS, `Ok(false)` to go
    /// on in plain text (`prefer`), an error when the mode insists or the byte is not `S`/`N`.
    fn accepts(&self, answer: u8) -> io::Result<bool> {
        match answer {
            b'S' => Ok(true),
            b'N' if self.mode == SslMode::Prefer => Ok(false),
            b'N' => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "the server does not support TLS, but sslmode={}",
                    self.mode.name()
                ),
            )),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to SSLRequest: byte {other:#04x}"),
            )),
        }
    }
}

impl Upstream {
    /// [`negotiate`](Self::negotiate) for a blocking socket (CDC's own connections): the
    /// TLS session to use, if any; the handshake is done.
    pub fn negotiate_blocking<S: io::Read + io::Write>(
        &self,
        sock: &mut S,
    ) -> io::Result<Option<rustls::ClientConnection>> {
        let (Some(config), Some(name)) = (&self.config, &self.name) else {
            return Ok(None);
        };
        sock.write_all(&SSL_REQUEST)?;
        let mut answer = [0u8; 1];
        sock.read_exact(&mut answer)?;
        if !self.accepts(answer[0])? {
            return Ok(None);
        }
        let mut conn = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        while conn.is_handshaking() {
            conn.complete_io(sock)?;
        }
        Ok(Some(conn))
    }
}

/// Checks the certificate as the mode asks: nothing (`require`), the chain (`verify-ca`), or
/// the chain and the name (`verify-full`). Handshake signatures are always verified, so the
/// peer does hold the key of the certificate it showed.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client-side TLS settings every shard reads at each client's startup; SIGHUP replaces
/// them (certificate rotation) without a restart.
#[derive(Default)]
pub struct ClientTlsSlot {
    current: std::sync::RwLock<(Option<Arc<rustls::ServerConfig>>, bool)>,
}

impl ClientTlsSlot {
    pub fn new(config: Option<Arc<rustls::ServerConfig>>, required: bool) -> ClientTlsSlot {
        ClientTlsSlot {
            current: std::sync::RwLock::new((config, required)),
        }
    }

    /// The server configuration offered to clients (None: `N`), and whether TLS is required.
    pub fn get(&self) -> (Option<Arc<rustls::ServerConfig>>, bool) {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set(&self, config: Option<Arc<rustls::ServerConfig>>, required: bool) {
        match self.current.write() {
            Ok(mut c) => *c = (config, required),
            Err(poisoned) => *poisoned.into_inner() = (config, required),
        }
    }
}

/// Builds what `[client-tls]` asks for: the server configuration (None when disabled) and
/// whether TLS is required. Errors name the key at fault.
pub fn client_side(
    cfg: &crate::config::ClientTlsConfig,
) -> Result<(Option<Arc<rustls::ServerConfig>>, bool), crate::config::ConfigError> {
    use crate::config::ClientTlsMode;
    let mode = cfg.effective_mode()?;
    if mode == ClientTlsMode::Disable {
        return Ok((None, false));
    }
    let config = server_config(&cfg.cert_file, &cfg.key_file)
        .map_err(|e| crate::config::ConfigError::invalid("client-tls.cert-file", &e))?;
    Ok((Some(config), mode == ClientTlsMode::Require))
}

/// pgprism's own TLS server side for clients, from PEM files.
pub fn server_config(
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    // A client that offers ALPN must offer PostgreSQL's (PostgreSQL 17 does the same); clients
    // that offer none are served.
    server_config_for(
        ("client-tls.cert-file", cert_file),
        ("client-tls.key-file", key_file),
        ALPN,
    )
}

/// The admin endpoint's HTTPS server side (`admin.cert-file`, `admin.key-file`), loaded as
/// `[client-tls]` is; it speaks HTTP/1.1 only, which is what it tells ALPN.
pub fn https_server_config(
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_for(
        ("admin.cert-file", cert_file),
        ("admin.key-file", key_file),
        b"http/1.1",
    )
}

/// A TLS server configuration from a PEM chain and key (each with the config key that named
/// it, for errors), offering one ALPN protocol.
fn server_config_for(
    (cert_key, cert_file): (&'static str, &str),
    (key_key, key_file): (&'static str, &str),
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(cert_file, cert_key)?;
    let key = read_key(key_file, key_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::KeyMismatch)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}
