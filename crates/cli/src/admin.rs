//! Talking to a triremed admin listener: address checks, connecting, and
//! turning gRPC statuses into the errors users see.

use std::time::Duration;

use anyhow::anyhow;
use tonic::transport::{Channel, Endpoint};
use trireme_proto::v1::node_service_client::NodeServiceClient;
use trireme_proto::v1::volume_service_client::VolumeServiceClient;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Clap value parser for `--admin`: accepts `host:port` and `[v6]:port`.
///
/// Checked up front because a malformed address would otherwise surface as an
/// obscure URI error from the transport.
pub fn admin_arg(input: &str) -> Result<String, String> {
    let bad = |why: &str| format!("invalid --admin \"{input}\": {why} (expected host:port, e.g. 127.0.0.1:7100)");
    let (host, port) = input.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("port must be 1-65535")),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[') {
        let v6 = inner.strip_suffix(']').ok_or_else(|| bad("unbalanced '['"))?;
        v6.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address inside [ ]"))?;
    } else if host.contains(':') {
        return Err(bad("IPv6 addresses must be written as [addr]:port"));
    } else if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return Err(bad("host has characters not allowed in a host name"));
    }
    // The transport parses the address as a URI authority; make sure it
    // agrees so any failure later really is about reaching the server.
    Endpoint::from_shared(format!("http://{input}")).map_err(|_| bad("not a valid address"))?;
    Ok(input.to_owned())
}

/// Connects eagerly so an unreachable daemon is reported as such rather than
/// as an `Unavailable` status from the first request.
pub async fn connect(addr: &str, connect_timeout: Duration) -> anyhow::Result<Channel> {
    let unreachable = |cause: String| anyhow!("cannot reach triremed admin at {addr}: {cause}");
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(error_chain(&e)))?
        .connect_timeout(connect_timeout)
        .timeout(REQUEST_TIMEOUT);
    endpoint.connect().await.map_err(|e| unreachable(error_chain(&e)))
}

pub async fn volume_client(addr: &str) -> anyhow::Result<VolumeServiceClient<Channel>> {
    Ok(VolumeServiceClient::new(connect(addr, CONNECT_TIMEOUT).await?))
}

pub async fn node_client(addr: &str) -> anyhow::Result<NodeServiceClient<Channel>> {
    Ok(NodeServiceClient::new(connect(addr, CONNECT_TIMEOUT).await?))
}

/// `<status message> (<code name>)`: the server's words, unchanged, so users
/// and tests see exactly what the daemon said.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    let message = if status.message().is_empty() {
        status.code().description()
    } else {
        status.message()
    };
    anyhow!("{message} ({:?})", status.code())
}

/// Transport errors wrap their real cause several layers deep ("transport
/// error" alone tells the user nothing), so join the whole chain, skipping
/// layers that repeat the previous one.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        for ok in [
            "127.0.0.1:7100",
            "localhost:1",
            "node-1.example.com:65535",
            "[::1]:7100",
        ] {
            assert_eq!(admin_arg(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "7100",
            ":7100",
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:port",
            "::1:7100",
            "[::1:7100",
            "[nope]:7100",
            "http://127.0.0.1:7100",
            "a b:7100",
            "host/x:7100",
        ] {
            let err = admin_arg(bad).expect_err(bad);
            assert!(err.starts_with(&format!("invalid --admin \"{bad}\"")), "{err}");
        }
    }

    #[test]
    fn status_errors_name_the_code() {
        let err = status_error(tonic::Status::not_found("volume \"nope\" not found"));
        assert_eq!(err.to_string(), "volume \"nope\" not found (NotFound)");
        let err = status_error(tonic::Status::new(tonic::Code::AlreadyExists, ""));
        assert!(err.to_string().ends_with("(AlreadyExists)"), "{err}");
    }
}
