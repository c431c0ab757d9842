//! The HTTP client that sends webhooks, and the guard that keeps it off special addresses.
//!
//! Guarantee, unless `ALLOW_PRIVATE_ENDPOINTS=true`: the client opens no connection to an address
//! that [`special_address::classify`] refuses, whatever the stored endpoint URL (checked when it
//! was accepted or not: written while private endpoints were allowed, or straight into the
//! database). A refusal is the delivery's error, "refused: …".
//!
//! Why this holds: the client connects to exactly one of
//! 1. the URL's host when it is an IP literal. reqwest (hyper-util's connector) does not resolve
//!    literals, so the literal *is* the connected address: [`WebhookClient::post`] checks it
//!    before a request exists. `post` hands reqwest the `Url` it parsed and checked, so no second
//!    parser can read the host differently.
//! 2. an address the client's resolver returned for a name: [`GuardedResolver`] drops refused
//!    addresses and fails when none is left, so the connector never sees one.
//! 3. the proxy, when `WEBHOOK_PROXY` is set: the operator's choice, not checked (it is usually on
//!    a private network). The target is then checked in `post`: a literal as in 1, a name is
//!    resolved here and refused if *any* of its addresses is refused, because the proxy picks one.
//!    The proxy resolves the name again and is trusted to find the same addresses.
//!
//! Nothing else connects anywhere: redirects are not followed (`Policy::none`), proxies from the
//! environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`) are ignored (`no_proxy`), and the
//! reqwest client is private to this module, so every request goes through `post`.
//! (reqwest 0.12's `connector_layer` would sit at the connection itself, but its request type is
//! sealed: a layer cannot read the destination, so it cannot do this check.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::special_address::{self, SpecialAddress};
use crate::Config;

/// What to tell an operator who means to reach such addresses.
const HINT: &str = "set ALLOW_PRIVATE_ENDPOINTS=true to allow private and special addresses";

/// Why a webhook was not sent.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("refused: '{0}' is not an http(s) URL with a host")]
    Url(String),
    #[error("refused: {0} ({HINT})")]
    Address(SpecialAddress),
    #[error("refused: {host} resolves to a special address: {special} ({HINT})")]
    Name {
        host: String,
        special: SpecialAddress,
    },
    #[error("cannot resolve {host}: {error}")]
    Unresolved { host: String, error: std::io::Error },
}

/// The webhook HTTP client: keeps connections alive, follows no redirects, ignores proxies from
/// the environment, and checks every address it connects to (see the module documentation).
pub struct WebhookClient {
    http: reqwest::Client,
    allow_private: bool,
    /// Whether requests go through `WEBHOOK_PROXY`.
    proxied: bool,
}

impl WebhookClient {
    /// The client for `config`; fails on an unusable `WEBHOOK_PROXY`.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        let proxy = match config.webhook_proxy.as_deref() {
            Some(text) => {
                let url = url::Url::parse(text)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                    .context("WEBHOOK_PROXY must be an http:// or https:// URL with a host")?;
                Some(url)
            }
            None => None,
        };
        let allow_private = config.allow_private_endpoints;
        let builder = reqwest::Client::builder()
            .timeout(config.delivery_timeout)
            .connect_timeout(config.delivery_timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(config.endpoint_concurrency.max(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("outbox-consumer/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private,
                proxy_host: proxy.as_ref().and_then(|u| u.host_str()).map(str::to_owned),
            }));
        let builder = match &proxy {
            // No NO_PROXY list: with a proxy, every webhook goes through it.
            Some(url) => builder.proxy(reqwest::Proxy::all(url.as_str())?),
            None => builder,
        };
        Ok(WebhookClient {
            http: builder.build()?,
            allow_private,
            proxied: proxy.is_some(),
        })
    }

    /// A POST to `url`, once its target passed the guard: an IP literal is checked here, a name
    /// by the resolver when connecting, or here (every address) when a proxy is used.
    pub async fn post(&self, url: &str) -> Result<reqwest::RequestBuilder, Refused> {
        let parsed = url::Url::parse(url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| Refused::Url(url.to_owned()))?;
        if !self.allow_private {
            self.check_target(&parsed).await?;
        }
        Ok(self.http.post(parsed))
    }

    async fn check_target(&self, url: &url::Url) -> Result<(), Refused> {
        let refuse = |ip: IpAddr| special_address::classify(ip).map_or(Ok(()), Err);
        match url.host() {
            Some(url::Host::Ipv4(ip)) => refuse(IpAddr::V4(ip)).map_err(Refused::Address),
            Some(url::Host::Ipv6(ip)) => refuse(IpAddr::V6(ip)).map_err(Refused::Address),
            Some(url::Host::Domain(host)) if self.proxied => {
                let port = url.port_or_known_default().unwrap_or(80);
                let found = tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|error| Refused::Unresolved {
                        host: host.to_owned(),
                        error,
                    })?;
                for address in found {
                    refuse(address.ip()).map_err(|special| Refused::Name {
                        host: host.to_owned(),
                        special,
                    })?;
                }
                Ok(())
            }
            // Checked by the resolver, at every connection.
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Refused::Url(url.to_string())),
        }
    }
}

/// Resolves the names the client connects to, dropping refused addresses unless they are allowed,
/// so that a public name cannot be pointed at internal services after the endpoint was created.
/// The proxy's own name (the only name resolved when a proxy is set) is not filtered.
struct GuardedResolver {
    allow_private: bool,
    proxy_host: Option<String>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let filter = !self.allow_private && self.proxy_host.as_deref() != Some(host.as_str());
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !filter {
                return Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs);
            }
            let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found
                .into_iter()
                .partition(|a| special_address::classify(a.ip()).is_none());
            if allowed.is_empty() {
                let error = match refused
                    .first()
                    .and_then(|a| special_address::classify(a.ip()))
                {
                    Some(special) => Refused::Name { host, special },
                    None => Refused::Unresolved {
                        host,
                        error: std::io::Error::other("no address found"),
                    },
                };
                return Err(error.into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
